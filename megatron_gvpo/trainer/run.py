"""The job: the driver an objective needs, run (or resumed) to ``trainer.max_steps``."""

from __future__ import annotations

from megatron_gvpo.trainer.config import RunConfig
from megatron_gvpo.trainer.objectives import load_builtin_objectives


def train(cfg: RunConfig) -> None:
    """Run (or resume) the job described by ``cfg``: RL rounds (``trainer/loop.py``), or
    optimizer steps on preference pairs for offline objectives (``trainer/preference.py``)."""
    if load_builtin_objectives()[cfg.algorithm.name].offline:
        from megatron_gvpo.trainer.preference import PreferenceTrainer

        PreferenceTrainer(cfg).fit()
        return
    from megatron_gvpo.trainer.loop import Trainer

    Trainer(cfg).fit()
