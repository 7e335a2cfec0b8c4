"""Training objectives: one module per algorithm family, a registry keyed by ``algorithm.name``."""

from megatron_gvpo.trainer.objectives.base import (
    OBJECTIVES,
    MicroBatchLoss,
    Objective,
    ObjectiveConfig,
    StepInputs,
    algorithm_config,
    build_objective,
    load_builtin_objectives,
    register_objective,
)

__all__ = [
    "OBJECTIVES",
    "MicroBatchLoss",
    "Objective",
    "ObjectiveConfig",
    "StepInputs",
    "algorithm_config",
    "build_objective",
    "load_builtin_objectives",
    "register_objective",
]
