"""Domain-robust GVPO (``algorithm=gr_gvpo``): Group-Robust alpha over data domains weights
per-domain GVPO losses.

The unit is a prompt group with k >= 2 responses; L_d is the mean GVPO term
``sum_i c_i^2 / (2 (k - 1))`` of domain d's groups. Per optimizer step: the step's detached
(s, s') give every counted group's term; alpha takes one step on the per-domain sums and counts
(``objectives/robust.py``, the rule of ``algorithms/group_robust.py``); every micro-batch then
backpropagates ``sum_i w_{d(i)} q_i`` restricted to its samples, with the step-wide group
statistics and unit weights, so the step's gradient does not depend on the layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron_gvpo.algorithms.group_robust import domain_robust_gvpo_loss, domain_unit_counters
from megatron_gvpo.algorithms.gvpo import GVPOGroupStats, gvpo_group_stats, gvpo_sample_losses
from megatron_gvpo.models.forward import MicroBatch, sequence_logprobs, sequence_old_logprobs
from megatron_gvpo.trainer.objectives.base import (
    MicroBatchLoss,
    Objective,
    StepInputs,
    loss_metrics,
    register_objective,
)
from megatron_gvpo.trainer.objectives.gvpo import GVPOConfig
from megatron_gvpo.trainer.objectives.robust import DomainRobust, RobustFields


@dataclass(frozen=True)
class GRGVPOConfig(RobustFields, GVPOConfig):
    """``algorithm.*`` of domain-robust GVPO (needs ``data.domain_key``)."""

    name: str = "gr_gvpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_robust()


class GRGVPOMicroBatchLoss:
    """``sum_i w_{d(i)} q_i`` on one micro-batch, with the step's unit weights and statistics."""

    def __init__(self, beta: float, weights: Tensor, group_stats: GVPOGroupStats):
        self.beta, self.weights, self.group_stats = beta, weights, group_stats

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, mb: MicroBatch):
        x = mb.extra
        s = sequence_logprobs(logprobs, mb)
        dev = s.device
        loss = domain_robust_gvpo_loss(
            s,
            sequence_old_logprobs(mb).to(dev),
            x["rewards"].to(dev),
            x["group_ids"].to(dev),
            x["domains"].to(dev),
            self.weights,
            self.beta,
            group_stats=self.group_stats,
        )
        return loss, loss_metrics(loss, mb, entropy)


@register_objective
class GRGVPO(Objective):
    """Domain-robust GVPO; alpha is training state (checkpointed, logged per domain)."""

    Config = GRGVPOConfig
    supports_replay = True
    needs_domains = True

    def __init__(self, config: GRGVPOConfig, domains: Sequence[str] = ("default",)):
        super().__init__(config, domains)
        self.robust = DomainRobust(
            self.domains, config.robust_eta, config.robust_estimator, config.robust_allocation
        )

    def domain_allocation(self) -> Callable[[int], list[int]] | None:
        return self.robust.allocation()

    def set_domain_sizes(self, counts: Sequence[int]) -> None:
        self.robust.set_domain_sizes(counts)

    @torch.no_grad()
    def step_loss(self, step: StepInputs) -> MicroBatchLoss:
        ratio = step.step_log_ratio()  # only s - s' enters delta: s' = 0 against it
        b = step.batch
        rewards = b.rewards.to(torch.float64)
        beta = self.config.beta
        zeros = torch.zeros_like(ratio)
        stats = gvpo_group_stats(ratio, zeros, rewards, b.group_ids, beta)
        q, _, counted = gvpo_sample_losses(
            ratio, zeros, rewards, b.group_ids, beta, group_stats=stats
        )
        d = len(self.domains)
        sums = torch.zeros(d, dtype=torch.float64).index_add_(0, b.domains, q.double())
        units = domain_unit_counters(b.group_ids, counted)
        counts = torch.bincount(b.domains[units], minlength=d).double()
        return GRGVPOMicroBatchLoss(beta, self.robust.step(sums, counts), stats)

    def metrics(self) -> dict[str, float]:
        return self.robust.metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.robust.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.robust.load_state_dict(state)
