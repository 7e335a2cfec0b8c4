"""The ``algorithm.*`` fields every loss config has, and the value checks the configs share.

A loss family's config is one frozen dataclass derived from :class:`AlgorithmConfig`: the pure
losses take it as it is, and the trainer registers it as the Hydra schema of ``algorithm=<name>``
(``trainer.objectives.ObjectiveConfig`` is this class). Errors are one-line ValueErrors naming the
key as ``algorithm.<key>``, which the trainer shows as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def finite_number(key: str, value: object) -> float:
    """``value`` as a finite float, or a ValueError naming ``key``."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{key} must be finite, got {value!r}")
    return v


def positive(x: object) -> bool:
    """A finite number > 0 (config checks)."""
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and v > 0


def one_of(key: str, value: object, options: tuple[str, ...]) -> None:
    """A ValueError naming ``key`` unless ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(options)}")


@dataclass(frozen=True)
class AlgorithmConfig:
    """``algorithm.*`` fields every objective has."""

    name: str = ""
    """The registered objective (``algorithm=<name>`` selects its YAML)."""
    temperature: float = 1.0
    """Logprobs of the temperature-scaled policy, as the engine samples (``rollout.temperature``)."""

    def __post_init__(self) -> None:
        if not positive(self.temperature):
            raise ValueError(f"algorithm.temperature must be > 0, got {self.temperature!r}")

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference model must be built."""
        return False

    @property
    def reference_path(self) -> str | None:
        """The reference's weights (``actor_init``: the actor's starting weights)."""
        return None

    def check_run(self) -> None:
        """Checks that only a training run needs (the trainer calls it once the config is
        built; a pure loss, given its inputs, needs none); default: none."""
