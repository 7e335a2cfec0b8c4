"""Domain-robust GVPO (``algorithm=gr_gvpo``): Group-Robust alpha over data domains weights
per-domain GVPO losses.

Per optimizer step: the step's detached (s, s') give every domain's GVPO loss; alpha takes one
mirror-ascent step on them (``algorithms.group_robust.GroupRobustWeights``); every micro-batch
then backpropagates ``sum_d alpha_d L_d`` restricted to its samples, with the step-wide group
statistics, domain sums and counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron_gvpo.algorithms.group_robust import (
    GroupRobustWeights,
    domain_group_counters,
    domain_robust_gvpo_loss,
)
from megatron_gvpo.algorithms.gvpo import gvpo_group_stats, gvpo_sample_losses
from megatron_gvpo.models.forward import MicroBatch
from megatron_gvpo.trainer.batch import sequence_logprobs, sequence_old_logprobs
from megatron_gvpo.trainer.metrics import Metric
from megatron_gvpo.trainer.objectives.base import (
    MicroBatchLoss,
    Objective,
    StepInputs,
    loss_metrics,
    positive,
    register_objective,
)
from megatron_gvpo.trainer.objectives.gvpo import GVPOConfig


@dataclass
class GRGVPOConfig(GVPOConfig):
    """``algorithm.*`` of domain-robust GVPO (needs ``data.domain_key``)."""

    name: str = "gr_gvpo"
    robust_eta: float = 0.01
    """Mirror-ascent step size of alpha (Group-Robust PO's eta_alpha)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not positive(self.robust_eta):
            raise ValueError(f"algorithm.robust_eta must be > 0, got {self.robust_eta!r}")


class GRGVPOMicroBatchLoss:
    """``sum_d alpha_d L_d`` on one micro-batch, with the step's alpha and statistics.

    Build it with :meth:`for_step`, which takes the whole step's detached (s, s'), updates alpha
    once and keeps the step-wide group statistics, per-domain loss sums and counted groups.
    """

    def __init__(self, beta, weights, group_stats, domain_loss_sums, domain_counts, domains=None):
        self.domains = domains or [str(k) for k in range(weights.num_groups)]
        self.beta = beta
        self.weights = weights
        self.group_stats = group_stats
        self.domain_loss_sums = domain_loss_sums
        self.domain_counts = domain_counts

    @classmethod
    @torch.no_grad()
    def for_step(
        cls, s, old, rewards, group_ids, domains, weights, beta, names=None
    ) -> GRGVPOMicroBatchLoss:
        rewards = rewards.to(torch.float64)
        stats = gvpo_group_stats(s, old, rewards, group_ids, beta)
        q, _, counted = gvpo_sample_losses(s, old, rewards, group_ids, beta, group_stats=stats)
        d = weights.num_groups
        sums = torch.zeros(d, dtype=torch.float64).index_add_(0, domains, q.double())
        counters = domain_group_counters(group_ids, counted)
        counts = torch.bincount(domains[counters], minlength=d).double()
        weights.update(sums, counts)
        return cls(beta, weights, stats, sums, counts, names)

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, mb: MicroBatch):
        x = mb.extra
        s = sequence_logprobs(logprobs, mb)
        dev = s.device
        loss, diag = domain_robust_gvpo_loss(
            s,
            sequence_old_logprobs(mb).to(dev),
            x["rewards"].to(dev),
            x["group_ids"].to(dev),
            x["domains"].to(dev),
            self.weights,
            self.beta,
            update_weights=False,
            group_stats=self.group_stats,
            domain_loss_sums=self.domain_loss_sums,
            domain_counts=self.domain_counts,
        )
        metrics = loss_metrics(loss, mb, entropy)
        for k, v in diag.items():  # step-wide values every micro-batch repeats
            if k.startswith("alpha/"):
                continue  # the objective logs alpha by domain name after the step
            if k.startswith("group_loss/"):
                k = f"robust/group_loss/{self.domains[int(k.split('/')[1])]}"
            metrics[k] = Metric(v.detach().float(), "same")
        return loss, metrics


@register_objective
class GRGVPO(Objective):
    """Domain-robust GVPO; alpha is training state (checkpointed, logged per domain)."""

    Config = GRGVPOConfig
    supports_replay = True
    needs_domains = True

    def __init__(self, config: GRGVPOConfig, domains=("default",)):
        super().__init__(config, domains)
        self.weights = GroupRobustWeights(len(self.domains), config.robust_eta)

    def step_loss(self, step: StepInputs) -> MicroBatchLoss:
        ratio = step.step_log_ratio()  # only s - s' enters delta: s' = 0 against it
        b = step.batch
        return GRGVPOMicroBatchLoss.for_step(
            ratio, torch.zeros_like(ratio), b.rewards, b.group_ids, b.domains, self.weights, self.config.beta, self.domains
        )

    def metrics(self) -> dict[str, float]:
        alpha = self.weights.alpha.tolist()
        return {f"robust/alpha/{d}": a for d, a in zip(self.domains, alpha, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"robust_alpha": self.weights.alpha.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("robust_alpha") is not None:
            alpha = torch.tensor(state["robust_alpha"], dtype=torch.float64)  # JSON floats: exact
            self.weights.load_state_dict({"alpha": alpha})
