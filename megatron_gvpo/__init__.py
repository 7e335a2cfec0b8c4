"""megatron_gvpo: GVPO and the GRPO family on Megatron-Core, with SGLang or a local engine.

Importing the package installs one import hook, for CPU-only machines: megatron-core decorates its
fused kernels with ``torch.compile`` at import time, which loads torch's whole compiler stack
(dynamo and inductor, seconds per process) for kernels that only pay off on GPU. Without CUDA
the hook lets ``megatron.core`` import with ``torch.compile`` as the identity, so those functions
run eagerly with the same arithmetic. With CUDA nothing changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


class _EagerMegatronFusersOnCPU(importlib.abc.MetaPathFinder):
    """Runs ``megatron.core``'s first import with ``torch.compile`` as the identity, on CPU."""

    def find_spec(self, name, path=None, target=None):
        if name != "megatron.core":
            return None
        sys.meta_path.remove(self)  # once: the real finders supply the spec
        spec = importlib.util.find_spec(name)
        import torch

        if spec is None or spec.loader is None or torch.cuda.is_available():
            return spec
        exec_module = spec.loader.exec_module

        def exec_eager(module):
            compile_ = torch.compile
            torch.compile = _identity_compile
            try:
                exec_module(module)
            finally:
                torch.compile = compile_

        spec.loader.exec_module = exec_eager
        return spec


def _identity_compile(fn=None, **_):
    """``torch.compile``'s signature, compiling nothing (``@torch.compile(...)`` too)."""
    return fn if fn is not None else (lambda f: f)


if "megatron.core" not in sys.modules:
    sys.meta_path.insert(0, _EagerMegatronFusersOnCPU())
