"""Hydra entry point: ``python -m megatron_gvpo.train [group=option] [key=value ...]``.

Also the console script ``megatron-gvpo-train``. Runs the embedded CPU demo by default; under
``torchrun`` every rank runs it. The config is checked whole before any model is built.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    # megatron-core logs every DDP bucket and optimizer field at INFO; keep the run's own lines.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from megatron_gvpo.trainer.config import run_config_from_dict
    from megatron_gvpo.trainer.loop import train

    _redact_hydra_output()
    raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    train(run_config_from_dict(raw))


def _redact_hydra_output() -> None:
    """Hydra has saved the config and overrides under ``<run_dir>/hydra/``: keep no secrets there."""
    from hydra.core.hydra_config import HydraConfig

    from megatron_gvpo.trainer.secrets import redact_hydra_dir

    hc = HydraConfig.get()
    if hc.output_subdir:
        redact_hydra_dir(Path(hc.runtime.output_dir) / hc.output_subdir)


if __name__ == "__main__":
    main()
