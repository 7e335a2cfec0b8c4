"""Hydra entry point: ``python -m megatron_gvpo.train [group=option] [key=value ...]``.

Also the console script ``megatron-gvpo-train``. Runs the embedded CPU demo by default; under
``torchrun`` every rank runs it. The config is checked whole before any model is built.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

# The schemas every YAML in configs/ starts from must be registered before Hydra composes; that
# imports megatron-core, whose import-time warnings are kept here and replayed into train.log
# once logging is set up (the console shows only what a user can act on).
# torch's CUDA build on a CPU-only machine logs "No CUDA runtime is found" to stderr when
# megatron-core imports torch.utils.cpp_extension: harmless there (we run on the CPU), so that one
# logger stays quiet during the import.
_CPP_EXT = logging.getLogger("torch.utils.cpp_extension")
_CPP_EXT.disabled = True
with warnings.catch_warnings(record=True) as _IMPORT_WARNINGS:
    from megatron_gvpo.trainer.config import register_configs, run_config_from_dict

    register_configs()
_CPP_EXT.disabled = False

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        _run(cfg)
    except Exception:
        # Reported here, redacted: Hydra's own report would print the command-line overrides as
        # given, credentials included ("Error executing job with overrides: [...]").
        from megatron_gvpo.trainer.secrets import redact_text

        sys.stderr.write(redact_text(traceback.format_exc()))
        sys.stderr.flush()
        raise SystemExit(1) from None


def _run(cfg: DictConfig) -> None:
    raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    from megatron_gvpo.trainer.runlock import RunDirError, hold_run_dir

    try:  # already held when Hydra ran our callback (configs/config.yaml); idempotent
        hold_run_dir(raw["trainer"]["run_dir"])
    except RunDirError as e:
        raise SystemExit(f"error: {e}") from None
    _redact_hydra_output()
    from megatron_gvpo.trainer.console import banner, run_summary, setup_logging

    log_path = setup_logging(raw["trainer"]["run_dir"])
    for w in _IMPORT_WARNINGS:  # through the logging set up just now
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    from megatron_gvpo.trainer.checkpoint import resume_point

    try:
        run_cfg = run_config_from_dict(raw)
    except (ValueError, FileNotFoundError) as e:  # a config error: one line naming the key
        from megatron_gvpo.trainer.secrets import redact_text

        print(f"error: {redact_text(str(e))}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    resume = resume_point(run_cfg.trainer.run_dir)  # refuses a newer megatron-core's checkpoint
    if int(os.environ.get("RANK", "0")) == 0:
        print(banner(run_summary(run_cfg, log_path, resume)), flush=True)
    _fit(run_cfg)


def _fit(cfg) -> None:
    """Run (or resume) the job: RL rounds (``trainer/loop.py``), or optimizer steps on
    preference pairs for offline objectives (``trainer/preference.py``)."""
    from megatron_gvpo.trainer.objectives import load_builtin_objectives

    if load_builtin_objectives()[cfg.algorithm.name].offline:
        from megatron_gvpo.trainer.preference import PreferenceTrainer

        PreferenceTrainer(cfg).fit()
    else:
        from megatron_gvpo.trainer.loop import Trainer

        Trainer(cfg).fit()


def _redact_hydra_output() -> None:
    """Hydra has saved the config and overrides under ``<run_dir>/hydra/``: keep no secrets there."""
    from hydra.core.hydra_config import HydraConfig

    from megatron_gvpo.trainer.secrets import redact_hydra_dir

    hc = HydraConfig.get()
    if hc.output_subdir:
        redact_hydra_dir(Path(hc.runtime.output_dir) / hc.output_subdir)


def config_error_line(e: BaseException) -> str:
    """One line for a Hydra composition error: the full key (or ``group=option``) and the reason.

    Hydra wraps OmegaConf's error, which carries ``full_key``, for an unknown key or a value of
    the wrong type; a missing config group option carries the options Hydra searched."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return f"{key}: no such key{_unknown_key_hint(cause, key)}"
    if isinstance(cause, OmegaConfBaseException) and key:
        return f"{key}: {str(getattr(cause, 'msg', None) or cause).splitlines()[0]}"
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, option = e.missing_cfg_file.rpartition("/")
        choices = ", ".join(o for o in e.options if not o.endswith("_schema"))
        return f"{group}={option}: no such option (one of: {choices})"
    return " ".join(str(e).split())


def _unknown_key_hint(cause: Exception, key: str) -> str:
    """`` (did you mean ...?)`` from the section's schema, or from a free-form dict's keys."""
    import difflib

    near = _near_keys(getattr(cause, "object_type", None), key)
    if not near and key.startswith("data."):
        from megatron_gvpo.trainer.data import preference_only_fields

        if key.removeprefix("data.") in preference_only_fields():
            return " (a preference pair's key: it comes with data=preference or data=preference_demo)"
    parent = getattr(cause, "parent_node", None)
    if not near and hasattr(parent, "keys"):  # a free-form dict such as rollout.sglang
        names = [str(k) for k in parent.keys()]
        if not names and key.startswith("rollout.sglang."):
            return " (rollout.sglang.* keys come with rollout=sglang)"
        prefix, _, name = key.rpartition(".")
        near = [f"{prefix}.{n}" for n in difflib.get_close_matches(name, names, n=2, cutoff=0.75)]
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def _near_keys(section: object, key: str) -> list[str]:
    """Keys of the dataclass ``section`` (nested sections included) that ``key`` may have meant:
    the same name one level deeper or higher (a moved key), else a close spelling."""
    import dataclasses
    import difflib
    import typing

    if not dataclasses.is_dataclass(section):
        return []
    prefix, _, name = key.rpartition(".")
    paths, todo = [], [(section, prefix)]
    while todo:
        cls, at = todo.pop()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            paths.append(f"{at}.{f.name}")
            if dataclasses.is_dataclass(hints.get(f.name)):
                todo.append((hints[f.name], f"{at}.{f.name}"))
    same = [p for p in paths if p.rpartition(".")[2] == name]
    leaves = {p.rpartition(".")[2]: p for p in paths}
    return same or [leaves[n] for n in difflib.get_close_matches(name, leaves, n=2, cutoff=0.75)]


def cli() -> None:
    """``python -m megatron_gvpo.train`` and the ``megatron-gvpo-train`` script.

    Hydra reports its own composition errors (an unknown key, a value of the wrong type, a
    missing group option) in several lines and exits 1; here they are one line naming the full
    key, exit 2, like every other config error. ``HYDRA_FULL_ERROR=1`` set by the user keeps
    Hydra's full report."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if os.environ.get("HYDRA_FULL_ERROR"):
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its report
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        from megatron_gvpo.trainer.secrets import redact_text

        print(f"error: {redact_text(config_error_line(e))}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


if __name__ == "__main__":
    cli()
