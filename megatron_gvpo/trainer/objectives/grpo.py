"""The GRPO family on Megatron micro-batches: ``grpo``, ``dr_grpo``, ``dapo``, ``gspo``.

Group advantages are made once per round from the round's rewards; each micro-batch's loss is
normalised by the whole step's sequence count (GRPO, Dr.GRPO, GSPO) or response-token count
(DAPO), so the step's gradient does not depend on the micro-batching. A k3 (or k1/k2) KL term to a
frozen reference is added when ``algorithm.kl_beta > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from megatron_gvpo.algorithms.grpo import (
    DAPOConfig,
    DrGRPOConfig,
    GRPOConfig,
    GSPOConfig,
    PolicyLossConfig,
    dapo_loss,
    dr_grpo_loss,
    group_advantages,
    grpo_loss,
    gspo_loss,
    overlong_penalty,
)
from megatron_gvpo.algorithms.kl import KL_ESTIMATORS
from megatron_gvpo.models.forward import MicroBatch, response_logprobs
from megatron_gvpo.trainer.batch import RolloutBatch
from megatron_gvpo.trainer.metrics import Metric
from megatron_gvpo.trainer.objectives.base import (
    MicroBatchLoss,
    Objective,
    ObjectiveConfig,
    StepInputs,
    loss_metrics,
    register_objective,
)


@dataclass
class PolicyObjectiveConfig(ObjectiveConfig):
    """``algorithm.*`` of the clipped-ratio family; None takes the algorithm's published value."""

    eps_low: float | None = None
    """Lower clip range: ratio >= 1 - eps_low."""
    eps_high: float | None = None
    """Upper clip range: ratio <= 1 + eps_high (DAPO's clip-higher: 0.28)."""
    kl_beta: float | None = None
    """Weight of the KL term to the frozen reference (GRPO: 0.04; 0 builds no reference)."""
    kl_estimator: str = "k3"
    """k1, k2 or k3 (Schulman's estimators; k3 as in DeepSeekMath)."""
    ref_model: str | None = None
    """The reference: ``actor_init`` (the actor's starting weights), an HF folder or a converted
    checkpoint. Needed when kl_beta > 0."""
    max_response_len: int | None = None
    """Dr.GRPO's constant length normaliser, and DAPO's overlong limit (``rollout.max_new_tokens``)."""
    overlong_buffer_len: int = 0
    """DAPO's soft overlong punishment: responses longer than max_response_len - this lose up to
    1 reward, linearly (0: off)."""
    use_tis: bool = False
    """Truncated importance sampling against the engine's logprobs (slime's ``--use-tis``): each
    token's policy-gradient term is weighted by min(pi_theta'(y) / pi_engine(y), tis_clip),
    detached. Corrects engine/trainer mismatch and stale (async) samples; GVPO needs none."""
    tis_clip: float = 2.0
    """The truncation C of the TIS weight (slime's ``--tis-clip``, verl's rollout_is_threshold)."""

    loss_config: ClassVar[type[PolicyLossConfig]] = GRPOConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"algorithm.kl_estimator={self.kl_estimator!r} is not one of "
                f"{', '.join(sorted(KL_ESTIMATORS))}"
            )
        policy = self.policy_loss_config()  # clip ordering and ranges
        if policy.kl_beta > 0 and not self.ref_model:
            raise ValueError(
                f"algorithm.kl_beta={policy.kl_beta} needs a reference model: set "
                "algorithm.ref_model (for example to the initial policy) or algorithm.kl_beta=0"
            )
        if self.overlong_buffer_len:
            if self.name != "dapo":
                raise ValueError("algorithm.overlong_buffer_len is DAPO's (algorithm=dapo)")
            if not self.max_response_len or not 0 < self.overlong_buffer_len <= self.max_response_len:
                raise ValueError(
                    f"algorithm.overlong_buffer_len={self.overlong_buffer_len} must lie in "
                    f"(0, algorithm.max_response_len={self.max_response_len}]"
                )

    @property
    def needs_reference(self) -> bool:
        return self.policy_loss_config().kl_beta > 0

    @property
    def reference_path(self) -> str | None:
        return self.ref_model if self.needs_reference else None

    def policy_loss_config(self) -> PolicyLossConfig:
        """The ``algorithms.grpo`` loss config, errors renamed to ``algorithm.*`` keys."""
        overrides = {
            k: getattr(self, k)
            for k in ("eps_low", "eps_high", "kl_beta")
            if getattr(self, k) is not None
        }
        if self.name == "dr_grpo":
            overrides["max_len"] = self.max_response_len
        if self.use_tis:
            overrides["tis_clip"] = self.tis_clip
        try:
            return self.loss_config(kl_estimator=self.kl_estimator, **overrides)
        except ValueError as e:
            raise ValueError(f"algorithm.{e}") from None


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
    """One clipped-ratio loss on one micro-batch, normalised by the whole step's counts."""

    def __init__(self, loss_fn, policy: PolicyLossConfig, norm: dict[str, int]):
        self.loss_fn = loss_fn
        self.policy = policy
        self.norm = norm

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, mb: MicroBatch):
        x = mb.extra
        lp = response_logprobs(logprobs, mb)
        dev = lp.device
        ref = x.get("ref_logprobs")
        loss, diag = self.loss_fn(
            lp,
            x["old_logprobs"].to(dev),
            x["advantages"].to(dev),
            x["response_mask"].to(dev),
            self.policy,
            ref_logprobs=None if ref is None else ref.to(dev),
            rollout_logprobs=_to(x.get("rollout_logprobs"), dev) if self.policy.tis_clip else None,
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
    """Clipped-ratio objectives: advantages per round, a step-wide normaliser per step."""

    loss_fn: ClassVar = staticmethod(grpo_loss)
    normalize_std: ClassVar[bool] = True
    per_token: ClassVar[bool] = False  # normalise by the step's response tokens (DAPO)

    def prepare_round(self, batch: RolloutBatch) -> None:
        batch.advantages = group_advantages(
            batch.rewards, batch.group_ids, normalize_std=self.normalize_std
        )

    def step_loss(self, step: StepInputs) -> MicroBatchLoss:
        sub = step.batch
        if self.per_token:
            norm = {"num_tokens": sub.num_response_tokens}
        else:
            norm = {"num_sequences": sub.num_trained_sequences}
        return PolicyMicroBatchLoss(self.loss_fn, self.config.policy_loss_config(), norm)


@dataclass
class GRPOObjectiveConfig(PolicyObjectiveConfig):
    """DeepSeekMath GRPO: (R - mean) / std advantages, per-sequence token mean, k3 KL 0.04.

    Against TRL's ``GRPOTrainer`` (1.16) with ``loss_type="grpo"``: the same update (sample std
    with Bessel's correction, clip, aggregation, Adam, gradient-norm clipping), except that TRL
    divides by ``std + 1e-4`` where we (and verl) use ``std + 1e-6``, and TRL's defaults differ:
    no KL (``beta=0``), ``loss_type="dapo"``, and a linear decay of the learning rate to 0
    (transformers' ``lr_scheduler_type``; ours is constant). See docs/benchmarks.md."""

    name: str = "grpo"


@register_objective
class GRPO(PolicyObjective):
    Config = GRPOObjectiveConfig


@dataclass
class DrGRPOObjectiveConfig(PolicyObjectiveConfig):
    """Dr.GRPO: no std division, a constant length normaliser (``max_response_len``)."""

    name: str = "dr_grpo"
    loss_config: ClassVar[type[PolicyLossConfig]] = DrGRPOConfig


@register_objective
class DrGRPO(PolicyObjective):
    Config = DrGRPOObjectiveConfig
    loss_fn = staticmethod(dr_grpo_loss)
    normalize_std = False


@dataclass
class DAPOObjectiveConfig(PolicyObjectiveConfig):
    """DAPO: clip-higher 0.2 / 0.28, token-level mean, soft overlong punishment; use with
    ``trainer.dynamic_sampling=true``."""

    name: str = "dapo"
    loss_config: ClassVar[type[PolicyLossConfig]] = DAPOConfig


@register_objective
class DAPO(PolicyObjective):
    Config = DAPOObjectiveConfig
    loss_fn = staticmethod(dapo_loss)
    per_token = True

    def prepare_round(self, batch: RolloutBatch) -> None:
        c = self.config
        if c.overlong_buffer_len:  # a reward term, before the advantages
            lengths = torch.tensor(
                [len(r) for r in batch.response_ids]
                if batch.loss_masks is None
                else [int(m.sum()) for m in batch.loss_masks]  # the model's tokens
            )
            batch.rewards = batch.rewards + overlong_penalty(
                lengths, c.max_response_len, c.overlong_buffer_len
            ).to(batch.rewards.dtype)
        super().prepare_round(batch)


@dataclass
class GSPOObjectiveConfig(PolicyObjectiveConfig):
    """GSPO: a length-normalised sequence-level ratio, clip 3e-4 / 4e-4."""

    name: str = "gspo"
    loss_config: ClassVar[type[PolicyLossConfig]] = GSPOConfig


@register_objective
class GSPO(PolicyObjective):
    Config = GSPOObjectiveConfig
    loss_fn = staticmethod(gspo_loss)
