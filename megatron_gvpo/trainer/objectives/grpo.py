"""The GRPO family on Megatron micro-batches: ``grpo``, ``dr_grpo``, ``dapo``, ``gspo``.

One objective for the four: its config is ``algorithms.grpo.PolicyLossConfig`` (each name
registers its published defaults: ``GRPOConfig``, ...), which the loss receives as it is. Group
advantages are made once per round from the round's rewards (after the soft overlong punishment,
when ``algorithm.overlong_buffer_len > 0``); each micro-batch's loss is normalised by the whole
step's sequence or response-token count (``algorithm.loss_agg_mode``), so the step's gradient
does not depend on the micro-batching. A k3 (or k1/k2) KL term to a frozen reference is added
when ``algorithm.kl_beta > 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_gvpo.algorithms.grpo import (
    DAPOConfig,
    DrGRPOConfig,
    GRPOConfig,
    GSPOConfig,
    PolicyLossConfig,
    group_advantages,
    overlong_penalty,
    policy_loss,
)
from megatron_gvpo.models.forward import MicroBatch, response_logprobs
from megatron_gvpo.trainer.batch import RolloutBatch
from megatron_gvpo.trainer.metrics import Metric
from megatron_gvpo.trainer.objectives.base import (
    MicroBatchLoss,
    Objective,
    StepInputs,
    loss_metrics,
    register_objective,
)

# How the clipped-ratio diagnostics combine (trainer.metrics); the rest are token means.
POLICY_METRICS = {
    "pg_loss": "sum",
    "kl_loss": "sum",
    "num_tokens": "sum",
    "num_sequences": "sum",
    "ratio_min": "min",
    "ratio_max": "max",
    "tis_max": "max",
}


class PolicyMicroBatchLoss:
    """``policy_loss`` on one micro-batch, normalised by the whole step's counts."""

    def __init__(self, config: PolicyLossConfig, norm: dict[str, int]):
        self.config = config
        self.norm = norm

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, mb: MicroBatch):
        x = mb.extra
        lp = response_logprobs(logprobs, mb)
        dev = lp.device
        loss, diag = policy_loss(
            lp,
            x["old_logprobs"].to(dev),
            x["advantages"].to(dev),
            x["response_mask"].to(dev),
            self.config,
            ref_logprobs=_to(x.get("ref_logprobs"), dev),
            rollout_logprobs=_to(x.get("rollout_logprobs"), dev) if self.config.use_tis else None,
            **self.norm,
        )
        tokens = float(x["response_mask"].sum())
        metrics = loss_metrics(loss, mb, entropy)
        for k, v in diag.items():
            rule = POLICY_METRICS.get(k, "mean")
            metrics[k] = Metric(v.detach().float(), rule, tokens if rule == "mean" else 1.0)
        return loss, metrics


def _to(t: Tensor | None, dev: torch.device) -> Tensor | None:
    return None if t is None else t.to(dev)


class PolicyObjective(Objective):
    """Clipped-ratio objectives: advantages per round, step-wide normalisers per step."""

    Config = PolicyLossConfig
    config: PolicyLossConfig

    def prepare_round(self, batch: RolloutBatch) -> None:
        c = self.config
        if c.overlong_buffer_len > 0 and c.max_response_len:  # a reward term, before advantages
            lengths = torch.tensor(
                [len(r) for r in batch.response_ids]
                if batch.loss_masks is None
                else [int(m.sum()) for m in batch.loss_masks]  # the model's tokens
            )
            batch.rewards = batch.rewards + overlong_penalty(
                lengths, c.max_response_len, c.overlong_buffer_len
            ).to(batch.rewards.dtype)
        batch.advantages = group_advantages(
            batch.rewards, batch.group_ids, normalize_std=c.norm_adv_by_std
        )

    def step_loss(self, step: StepInputs) -> MicroBatchLoss:
        sub = step.batch
        norm = {"num_sequences": sub.num_trained_sequences, "num_tokens": sub.num_response_tokens}
        return PolicyMicroBatchLoss(self.config, norm)


# One objective, registered under each published algorithm's name with its defaults.


@register_objective
class GRPO(PolicyObjective):
    Config = GRPOConfig


@register_objective
class DrGRPO(PolicyObjective):
    Config = DrGRPOConfig


@register_objective
class DAPO(PolicyObjective):
    Config = DAPOConfig


@register_objective
class GSPO(PolicyObjective):
    Config = GSPOConfig
