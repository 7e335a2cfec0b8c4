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


if __name__ == "__main__":
    main()
