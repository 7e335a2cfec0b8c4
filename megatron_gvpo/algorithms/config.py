"""``algorithm.*`` settings as one dataclass, validated before any model is built.

Errors name the Hydra key (``algorithm.beta``) so a user can fix the command line directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_gvpo.algorithms.grpo import (
    DAPOConfig,
    DrGRPOConfig,
    GRPOConfig,
    GSPOConfig,
    PolicyLossConfig,
)
from megatron_gvpo.algorithms.kl import KL_ESTIMATORS

GVPO_FAMILY = ("gvpo", "gr_gvpo")
GRPO_FAMILY = ("grpo", "dr_grpo", "dapo", "gspo")
ALGORITHMS = GVPO_FAMILY + GRPO_FAMILY

# Per-algorithm defaults for the clip and KL fields left unset (None) in the config.
_POLICY_DEFAULTS: dict[str, type[PolicyLossConfig]] = {
    "grpo": GRPOConfig,
    "dr_grpo": DrGRPOConfig,
    "dapo": DAPOConfig,
    "gspo": GSPOConfig,
}


@dataclass
class AlgorithmConfig:
    """Which loss trains the actor, and its hyper-parameters.

    ``beta`` is GVPO's beta (paper: 0.1). ``eps_low``/``eps_high``/``kl_beta`` are the GRPO
    family's clip and KL weight; None takes the algorithm's published default. ``ref_model`` is
    the frozen reference (an HF folder or converted checkpoint), built only when ``kl_beta > 0``.
    ``gr_gvpo`` weights per-domain GVPO losses by Group-Robust alpha (needs a domain per prompt).
    """

    name: str = "gvpo"
    beta: float = 0.1
    eps_low: float | None = None
    eps_high: float | None = None
    kl_beta: float | None = None
    kl_estimator: str = "k3"
    ref_model: str | None = None
    max_response_len: int | None = None  # Dr.GRPO's constant length normaliser
    robust_eta: float = 0.01  # gr_gvpo: alpha step size
    temperature: float = 1.0  # logprobs of the temperature-scaled policy, as the engine samples

    def __post_init__(self) -> None:
        if self.name not in ALGORITHMS:
            raise ValueError(f"algorithm.name={self.name!r} is not one of {', '.join(ALGORITHMS)}")
        if not _positive(self.beta) and self.name in GVPO_FAMILY:
            raise ValueError(f"algorithm.beta must be a finite number > 0, got {self.beta!r}")
        if not _positive(self.temperature):
            raise ValueError(f"algorithm.temperature must be > 0, got {self.temperature!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"algorithm.kl_estimator={self.kl_estimator!r} is not one of "
                f"{', '.join(sorted(KL_ESTIMATORS))}"
            )
        if self.name == "gr_gvpo" and not _positive(self.robust_eta):
            raise ValueError(f"algorithm.robust_eta must be > 0, got {self.robust_eta!r}")
        if self.name in GVPO_FAMILY:
            for key in ("eps_low", "eps_high"):
                if getattr(self, key) is not None:
                    raise ValueError(f"algorithm.{key} has no meaning for {self.name} (no clip)")
            return
        policy = self.policy_loss_config()  # clip ordering and ranges
        if policy.kl_beta > 0 and not self.ref_model:
            raise ValueError(
                f"algorithm.kl_beta={policy.kl_beta} needs a reference model: set "
                "algorithm.ref_model (for example to the initial policy) or algorithm.kl_beta=0"
            )

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference model must be built (GVPO never needs one)."""
        return self.name in GRPO_FAMILY and self.policy_loss_config().kl_beta > 0

    @property
    def needs_domains(self) -> bool:
        return self.name == "gr_gvpo"

    def policy_loss_config(self) -> PolicyLossConfig:
        """The GRPO-family loss config, errors renamed to ``algorithm.*`` keys."""
        cls = _POLICY_DEFAULTS[self.name]
        overrides = {
            k: v
            for k, v in (
                ("eps_low", self.eps_low),
                ("eps_high", self.eps_high),
                ("kl_beta", self.kl_beta),
            )
            if v is not None
        }
        if self.name == "dr_grpo":
            overrides["max_len"] = self.max_response_len
        try:
            return cls(kl_estimator=self.kl_estimator, **overrides)
        except ValueError as e:
            raise ValueError(f"algorithm.{e}") from None


def check_domains(config: AlgorithmConfig, domain_key: str | None) -> None:
    """A group-robust loss needs a domain label per prompt: fail before loading data without one."""
    if config.needs_domains and not domain_key:
        raise ValueError(
            f"algorithm.name={config.name} needs a domain label per prompt: set data.domain_key "
            "to the field that holds it"
        )


def _positive(x: object) -> bool:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and v > 0
