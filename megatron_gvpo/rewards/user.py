"""Load a user reward function from a ``module:function`` (or ``path/to/file.py:function``) spec."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def is_spec(name: str) -> bool:
    """True when ``name`` looks like ``module:function`` rather than a registered reward name."""
    return ":" in name


def _import_file(path: Path, spec: str, what: str) -> ModuleType:
    if not path.is_file():
        raise ValueError(f"{what} {spec!r}: file {str(path)!r} does not exist")
    # a stable, unique module name per file so two files called rewards.py do not collide
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    mod_name = f"_megatron_gvpo_user_reward_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    file_spec = importlib.util.spec_from_file_location(mod_name, path)
    if file_spec is None or file_spec.loader is None:
        raise ValueError(f"{what} {spec!r}: cannot import {str(path)!r}")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[mod_name] = module
    try:
        file_spec.loader.exec_module(module)
    except Exception:
        del sys.modules[mod_name]
        raise
    return module


def load_callable(spec: str, what: str = "reward spec") -> Callable:
    """Import ``module:attr`` (``attr`` may be dotted); errors name ``what`` (the setting), the
    spec and what is missing. Classes are callables too (``rollout.env`` names one)."""
    module_part, sep, attr_part = spec.rpartition(":")
    if not sep or not module_part.strip() or not attr_part.strip():
        raise ValueError(f"{what} {spec!r} must look like 'package.module:function'")
    module_part, attr_part = module_part.strip(), attr_part.strip()
    if module_part.endswith(".py"):
        module = _import_file(Path(module_part), spec, what)
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as e:
            raise ValueError(f"{what} {spec!r}: module {module_part!r} not found ({e})") from e
    obj: object = module
    for part in attr_part.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"{what} {spec!r}: {module_part!r} has no attribute {attr_part!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"{what} {spec!r}: {attr_part!r} is a {type(obj).__name__}, not callable"
        )
    return obj
