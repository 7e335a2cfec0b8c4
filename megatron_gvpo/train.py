"""Hydra entry point: ``python -m megatron_gvpo.train [group=option] [key=value ...]``.

Also the console script ``megatron-gvpo-train``. Runs the embedded CPU demo by default; under
``torchrun`` every rank runs it. The config is checked whole before any model is built.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    # Before megatron-core is imported: its import-time warnings go to train.log, not the screen.
    from megatron_gvpo.trainer.console import banner, run_summary, setup_logging

    log_path = setup_logging(raw["trainer"]["run_dir"])
    from megatron_gvpo.trainer.checkpoint import resume_point
    from megatron_gvpo.trainer.config import run_config_from_dict
    from megatron_gvpo.trainer.loop import train

    run_cfg = run_config_from_dict(raw)
    resume = resume_point(run_cfg.trainer.run_dir)  # refuses a newer megatron-core's checkpoint
    if int(os.environ.get("RANK", "0")) == 0:
        print(banner(run_summary(run_cfg, log_path, resume)), flush=True)
    train(run_cfg)


if __name__ == "__main__":
    main()
