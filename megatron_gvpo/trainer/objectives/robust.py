"""What every group-robust objective (``gr_dpo``, ``gr_ipo``, ``gr_gvpo``) shares: the
``algorithm.robust_*`` fields, alpha over the run's data domains as training state, its one
per-step update, the step's unit weights, the ``robust/`` metrics and the checkpointed state.

The rule and the estimators are specified in ``megatron_gvpo.algorithms.group_robust``; a unit is
a preference pair or a prompt group with k >= 2 responses. Per optimizer step, on every rank with
the same step-wide numbers: :meth:`DomainRobust.step` takes the step's detached per-domain loss
sums and unit counts at theta, moves alpha, and returns the weight of one unit of each domain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron_gvpo.algorithms.group_robust import (
    ESTIMATORS,
    GroupRobustWeights,
    domain_estimates,
    unit_weights,
)

DEFAULT_ROBUST_ETA = 1.0
ALLOCATIONS = ("alpha", "equal")


@dataclass(frozen=True)
class RobustFields:
    """``algorithm.*`` fields of the group-robust objectives (alpha over ``data.domain_key``)."""

    robust_eta: float = DEFAULT_ROBUST_ETA
    """Mirror-ascent step size of alpha (the paper's eta_alpha): each step multiplies alpha_d by
    exp(robust_eta * m_d), m_d the step's estimate of domain d's mean unit loss."""
    robust_estimator: str = "stratified"
    """stratified: per-domain means over steps that hold n_d units of each domain, fixed before
    the draw (``data.sampling=auto`` draws them as ``robust_allocation`` says); its variance does
    not grow as a domain gets small. importance: the paper's Alg. 1 per-unit form, units in the
    dataset's proportions weighted by N/N_d (unbiased, but its variance grows as 1/N_d). Both
    specified in ``algorithms/group_robust.py``."""
    robust_allocation: str = "alpha"
    """Units per domain of a step (stratified estimator, ``data.sampling=auto``). alpha: in
    proportion to the current alpha (largest remainders, at least one per domain), the
    minimum-variance allocation at equal within-domain variances, which spends a step's units
    where alpha puts the weight; equal: the same number for every domain."""

    def check_robust(self) -> None:
        eta = self.robust_eta
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
            raise ValueError(f"algorithm.robust_eta must be a finite number > 0, got {eta!r}")
        if eta <= 0:
            raise ValueError(f"algorithm.robust_eta must be > 0, got {eta!r}")
        if self.robust_allocation not in ALLOCATIONS:
            raise ValueError(
                f"algorithm.robust_allocation={self.robust_allocation!r} is not one of "
                f"{', '.join(ALLOCATIONS)}"
            )
        if self.robust_estimator not in ESTIMATORS:
            raise ValueError(
                f"algorithm.robust_estimator={self.robust_estimator!r} is not one of "
                f"{', '.join(ESTIMATORS)}"
            )


class DomainRobust:
    """alpha over ``domains``, the estimator and the dataset's unit counts per domain."""

    def __init__(self, domains: Sequence[str], eta: float, estimator: str, allocation: str):
        self.domains = list(domains)
        self.estimator, self.allocation_rule = estimator, allocation
        self.weights = GroupRobustWeights(len(self.domains), eta)
        self.data_counts: Tensor | None = None
        self._estimates = torch.zeros(len(self.domains), dtype=torch.float64)
        self._present = torch.zeros(len(self.domains), dtype=torch.bool)

    def set_domain_sizes(self, counts: Sequence[int]) -> None:
        """The dataset's units per domain (``domains`` order), for the importance estimator."""
        if len(counts) != len(self.domains) or min(counts) < 1:
            raise ValueError(f"need a positive size for each of {self.domains}, got {counts}")
        self.data_counts = torch.tensor(list(counts), dtype=torch.float64)

    def allocation(self) -> Callable[[int], list[int]] | None:
        """The rows-per-domain rule ``data.sampling=auto`` follows (None: uniform sampling)."""
        if self.estimator != "stratified":
            return None
        return self.rows_per_domain if self.allocation_rule == "alpha" else self.equal_rows

    def equal_rows(self, batch_size: int) -> list[int]:
        d = len(self.domains)
        return [batch_size // d + (1 if k < batch_size % d else 0) for k in range(d)]

    def rows_per_domain(self, batch_size: int) -> list[int]:
        """n_d proportional to alpha_d (largest remainders), at least one per domain when the
        batch has room: a domain that never appears would never be measured again."""
        d = len(self.domains)
        floor = 1 if batch_size >= d else 0
        share = self.weights.alpha * (batch_size - floor * d)
        rows = torch.floor(share).long() + floor
        left = batch_size - int(rows.sum())
        order = torch.argsort(share - torch.floor(share), descending=True, stable=True)
        rows[order[:left]] += 1
        return rows.tolist()

    @torch.no_grad()
    def step(self, loss_sums: Tensor, batch_counts: Tensor) -> Tensor:
        """Move alpha from the step's per-domain loss sums and unit counts ``[D]`` (detached,
        at theta before the update); returns the unit weights ``[D]`` float64 of the step."""
        m, present = domain_estimates(self.estimator, loss_sums, batch_counts, self.data_counts)
        self.weights.update(m, present)
        self._estimates, self._present = m, present
        return unit_weights(self.estimator, self.weights.alpha, batch_counts, self.data_counts)

    def metrics(self) -> dict[str, float]:
        """``robust/alpha/<d>`` (the alpha the step used), ``robust/loss/<d>`` (the step's
        estimate m_d, for domains it reports) and ``robust/worst_loss`` (their max)."""
        alpha = self.weights.alpha.tolist()
        out = {f"robust/alpha/{d}": a for d, a in zip(self.domains, alpha, strict=True)}
        seen = [float(m) for m, p in zip(self._estimates, self._present, strict=True) if p]
        for d, m, p in zip(self.domains, self._estimates, self._present, strict=True):
            if p:
                out[f"robust/loss/{d}"] = float(m)
        if seen:
            out["robust/worst_loss"] = max(seen)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"robust_alpha": self.weights.alpha.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("robust_alpha") is not None:
            self.weights.load_state_dict({"alpha": state["robust_alpha"]})
