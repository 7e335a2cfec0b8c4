"""GVPO on Megatron micro-batches (``algorithm=gvpo``), exact for the whole optimizer step.

Each micro-batch's loss is its groups' ``sum_i c_i^2 / (2 (k - 1))`` divided by the number of
counted groups (k >= 2) of the *whole step*. The group means of delta = beta (s - s') come from
the micro-batch itself when every group lies in one micro-batch (``StepPlan.groups_whole``);
otherwise from the step's detached (s, s') (a forward plus a DP exchange; free on a round's first
update, where s = s'). See ``algorithms/gvpo.py`` for the definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_gvpo.algorithms.config import positive
from megatron_gvpo.algorithms.gvpo import (
    GVPOGroupStats,
    gvpo_group_stats,
    gvpo_loss_terms,
    num_counted_groups,
)
from megatron_gvpo.models.forward import MicroBatch, sequence_logprobs, sequence_old_logprobs
from megatron_gvpo.trainer.metrics import Metric
from megatron_gvpo.trainer.objectives.base import (
    MicroBatchLoss,
    Objective,
    ObjectiveConfig,
    StepInputs,
    loss_metrics,
    register_objective,
)


@dataclass(frozen=True)
class GVPOConfig(ObjectiveConfig):
    """``algorithm.*`` of GVPO (arXiv 2504.19599): no clip, no reference model."""

    name: str = "gvpo"
    beta: float = 0.1
    """KL-regularisation strength of the implicit reward delta = beta (s - s') (paper: 0.1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not positive(self.beta):
            raise ValueError(f"algorithm.beta must be a finite number > 0, got {self.beta!r}")


# GVPO diagnostics that add up over micro-batches and ranks (see trainer.metrics).
GVPO_SUMS = ("sum_c_sq", "sum_centered_reward_sq", "samples_counted")


def gvpo_metrics(
    diag: dict[str, Tensor], num_samples: float, num_counted: float, step_stats: bool
) -> dict:
    """Tag ``gvpo_loss_terms``' diagnostics: sums add up, per-micro-batch moments are means
    weighted by the samples they cover, group counts are step-wide with ``step_stats`` (else
    per micro-batch, whose groups are whole); ``reward_var_explained`` is derived step-wide."""
    out = {}
    for k, v in diag.items():
        if k == "reward_var_explained":
            continue
        if k in GVPO_SUMS:
            out[k] = Metric(v.float(), "sum")
        elif k.startswith("groups_"):
            out[k] = Metric(v.float(), "same" if step_stats else "sum")
        elif k.startswith("c_"):
            out[k] = Metric(v.float(), "mean", num_counted)
        else:
            out[k] = Metric(v.float(), "mean", num_samples)
    return out


class GVPOMicroBatchLoss:
    """GVPO on one micro-batch: sum of its c_i^2 / (2 (k - 1)) over the step's counted groups.

    ``group_stats``: detached step-wide group statistics, or None when every group is whole
    inside its micro-batch. ``num_groups``: counted groups of the whole step.
    """

    def __init__(self, beta: float, num_groups: int, group_stats: GVPOGroupStats | None = None):
        self.beta = beta
        self.num_groups = num_groups
        self.group_stats = group_stats

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, mb: MicroBatch):
        x = mb.extra
        s = sequence_logprobs(logprobs, mb)
        loss, diag = gvpo_loss_terms(
            s,
            sequence_old_logprobs(mb).to(s.device),
            x["rewards"].to(s.device),
            x["group_ids"].to(s.device),
            self.beta,
            group_stats=self.group_stats,
            normalizer=self.num_groups,
        )
        n = float(x["sample_ids"].numel())
        metrics = loss_metrics(loss, mb, entropy)
        counted = float(diag["samples_counted"])
        metrics.update(gvpo_metrics(diag, n, counted, self.group_stats is not None))
        return loss, metrics


@register_objective
class GVPO(Objective):
    """GVPO: theta' logprobs are the round's; every update of the round is measured against them."""

    Config = GVPOConfig
    supports_replay = True

    def step_loss(self, step: StepInputs) -> MicroBatchLoss:
        beta = self.config.beta
        stats = None
        if not step.plan.groups_whole:  # group means over the whole step, not the micro-batch
            ratio = step.step_log_ratio()  # only s - s' enters delta: s' = 0 against it
            stats = gvpo_group_stats(
                ratio, torch.zeros_like(ratio), step.batch.rewards.double(), step.batch.group_ids,
                beta,
            )
        return GVPOMicroBatchLoss(beta, num_counted_groups(step.batch.group_ids), stats)

    def derived_metrics(self, step: dict[str, float]) -> dict[str, float]:
        return reward_var_explained(step)


def reward_var_explained(step: dict[str, float]) -> dict[str, float]:
    """``1 - sum c^2 / sum (R - mean R)^2`` over the whole step (see ``gvpo_loss_terms``)."""
    total = step.get("sum_centered_reward_sq", 0.0)
    if "sum_c_sq" not in step or total <= 0:
        return {}
    return {"reward_var_explained": 1.0 - step["sum_c_sq"] / total}
