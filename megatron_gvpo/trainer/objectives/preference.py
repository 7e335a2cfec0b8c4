"""Preference objectives on Megatron micro-batches: ``dpo``, ``ipo``, ``gr_dpo``, ``gr_ipo``.

A step batch holds pairs as groups of two samples (``group_ids`` = the pair's index in the step,
``rewards`` = +1 for the chosen response and -1 for the rejected one, ``domains`` = the pair's
domain), with the frozen reference's token logprobs in ``ref_logprobs``. Per pair, with summed
response logprobs s and the reference's r,

    h = (s_c - r_c) - (s_r - r_r) = sum over the pair's two samples of sign * (s - r)
    DPO: l = -log sigmoid(beta h)        IPO: l = (h - 1/(2 beta))^2

DPO/IPO minimise the mean of l over the step's B pairs. The group-robust versions (Ramesh et al.
2024, "Group Robust Preference Optimization in Reward-free RLHF") keep weights alpha over the data
domains (``data.domain_key``) as training state (``objectives/robust.py``). Once per optimizer
step, at the step's theta and before the update, alpha moves on the step's detached pair losses
and the step minimises ``sum_pairs w_d l`` with the estimator's per-pair weights w_d
(``algorithm.robust_estimator``; the rule, the estimators and their variances are specified in
``algorithms/group_robust.py``). The weights are step-wide and the loss is a sum over pairs, so
the step's gradient does not depend on the layout. When a pair lies in one micro-batch (the
preference trainer keeps pairs whole) its h is computed there; when a pair is split, h comes from
the step's detached logprobs and each micro-batch back-propagates l'(h) through its own samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from megatron_gvpo.algorithms.config import positive
from megatron_gvpo.algorithms.group_robust import dpo_pair_loss, ipo_pair_loss
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
from megatron_gvpo.trainer.objectives.robust import DomainRobust, RobustFields

PairLoss = Callable[[Tensor, float], Tensor]


@dataclass(frozen=True)
class DPOConfig(ObjectiveConfig):
    """``algorithm.*`` of DPO (Rafailov et al. 2023) on (chosen, rejected) pairs."""

    name: str = "dpo"
    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * h."""
    ref_model: str = "actor_init"
    """The frozen reference: ``actor_init`` (the actor's starting weights), an HF folder or a
    converted checkpoint."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not positive(self.beta):
            raise ValueError(f"algorithm.beta must be a finite number > 0, got {self.beta!r}")
        if not self.ref_model:
            raise ValueError("algorithm.ref_model is empty: actor_init or a checkpoint path")

    @property
    def needs_reference(self) -> bool:
        return True

    @property
    def reference_path(self) -> str | None:
        return self.ref_model


@dataclass(frozen=True)
class IPOConfig(DPOConfig):
    """``algorithm.*`` of IPO (Azar et al. 2023): squared loss around the margin 1/(2 beta)."""

    name: str = "ipo"


@dataclass(frozen=True)
class GRDPOConfig(RobustFields, DPOConfig):
    """``algorithm.*`` of GR-DPO: DPO with Group-Robust weights alpha over ``data.domain_key``."""

    name: str = "gr_dpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_robust()


@dataclass(frozen=True)
class GRIPOConfig(GRDPOConfig):
    """``algorithm.*`` of GR-IPO: IPO with Group-Robust weights."""

    name: str = "gr_ipo"


def step_margins(log_ratio: Tensor, batch: RolloutBatch) -> Tensor:
    """``h`` [B] float64 of the step's pairs from per-sample ``s - s_ref`` (summed logprobs)."""
    d = batch.rewards.double() * log_ratio.double()
    return torch.zeros(int(batch.group_ids.max()) + 1, dtype=torch.float64).index_add_(
        0, batch.group_ids, d
    )


class PreferenceMicroBatchLoss:
    """``sum over pairs of w_{d(pair)} l(h)`` on one micro-batch, plus the preference metrics.

    ``pair_weight`` [D]: the step-wide weight of one pair of domain d (1/B for DPO). ``h_step``:
    the step's detached margins, needed only when pairs are split over micro-batches.
    ``domain_pairs`` [D]: the step's pairs per domain (the per-domain metrics' denominators).
    """

    def __init__(
        self,
        pair_loss: PairLoss,
        beta: float,
        pair_weight: Tensor,
        domain_pairs: Tensor,
        domains: Sequence[str],
        h_step: Tensor | None = None,
    ):
        self.pair_loss, self.beta = pair_loss, beta
        self.pair_weight, self.domain_pairs = pair_weight.double(), domain_pairs.double()
        self.domains, self.h_step = list(domains), h_step
        self.num_pairs = float(domain_pairs.sum())

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, mb: MicroBatch):
        x = mb.extra
        # Summed in float64 like the reference's: at theta = reference, h is then exactly 0.
        s = response_logprobs(logprobs, mb).double().sum(-1)
        dev = s.device
        sign = x["rewards"].to(dev).double()
        ref = x["ref_logprobs"].to(dev).double().sum(-1)
        pairs, inv = torch.unique(x["group_ids"].to(dev), return_inverse=True)
        domain = torch.zeros(len(pairs), dtype=torch.long, device=dev)
        domain[inv] = x["domains"].to(dev)
        owned = torch.zeros(len(pairs), dtype=torch.bool, device=dev)
        owned[inv[sign > 0]] = True  # each pair is counted where its chosen sample is
        if self.h_step is None:  # whole pairs: h from this micro-batch
            h = torch.zeros(len(pairs), dtype=s.dtype, device=dev).index_add(
                0, inv, sign * (s - ref)
            )
            h_value = h.detach()
        else:  # split pairs: step-wide h, the gradient through this micro-batch's samples
            h_value = self.h_step.to(dev)[pairs]
            h = h_value + torch.zeros_like(h_value).index_add(0, inv, sign * (s - s.detach()))
        w = self.pair_weight.to(dev)[domain]
        lp = self.pair_loss(h, self.beta)
        l_value = lp.detach()
        if self.h_step is None:
            loss = (w * lp).sum()
        else:
            loss = (w * (lp - l_value)).sum() + (w * l_value)[owned].sum()
        metrics = loss_metrics(loss.float(), mb, entropy)
        metrics.update(self._metrics(h_value[owned], l_value[owned], domain[owned]))
        return loss.to(logprobs.dtype), metrics

    def _metrics(self, h: Tensor, lp: Tensor, domain: Tensor) -> dict[str, Metric]:
        n = max(self.num_pairs, 1.0)
        hit = (h > 0).double()
        out = {
            "preference/loss": Metric(float(lp.sum()) / n, "sum"),
            "preference/accuracy": Metric(float(hit.sum()) / n, "sum"),
            "preference/margin": Metric(float(h.sum()) / n, "sum"),
        }
        for k, name in enumerate(self.domains):
            m = float(self.domain_pairs[k])
            if m > 0:
                sel = domain == k
                out[f"preference/loss/{name}"] = Metric(float(lp[sel].sum()) / m, "sum")
                out[f"preference/accuracy/{name}"] = Metric(float(hit[sel].sum()) / m, "sum")
        return out


class PreferenceObjective(Objective):
    """DPO-style objectives: offline pairs, a frozen reference, per-domain metrics."""

    offline = True
    pair_loss: ClassVar[PairLoss] = staticmethod(dpo_pair_loss)

    def pair_weights(self, num_pairs: int) -> Tensor:
        """Per-domain weight of one pair in a step of ``num_pairs`` pairs (mean: 1/B)."""
        return torch.full((len(self.domains),), 1.0 / num_pairs, dtype=torch.float64)

    def domain_pairs(self, batch: RolloutBatch) -> Tensor:
        chosen = batch.rewards > 0
        return torch.bincount(batch.domains[chosen], minlength=len(self.domains)).double()

    def step_loss(self, step: StepInputs) -> MicroBatchLoss:
        return self.loss_for(step, self.before_step(step))

    def before_step(self, step: StepInputs) -> Tensor | None:
        """The step's detached margins when they are needed (split pairs), else None."""
        if step.plan.groups_whole:
            return None
        return step_margins(step.step_log_ratio(), step.batch)

    def loss_for(self, step: StepInputs, h_step: Tensor | None) -> PreferenceMicroBatchLoss:
        counts = self.domain_pairs(step.batch)
        weights = self.pair_weights(int(counts.sum()))
        return PreferenceMicroBatchLoss(
            type(self).pair_loss, self.config.beta, weights, counts, self.domains, h_step
        )

    def eval_loss(
        self, batch: RolloutBatch, h_step: Tensor | None = None
    ) -> PreferenceMicroBatchLoss:
        """The unweighted mean loss and the metrics of an evaluation batch (alpha untouched);
        ``h_step`` as in :meth:`loss_for`."""
        counts = self.domain_pairs(batch)
        weights = PreferenceObjective.pair_weights(self, int(counts.sum()))
        return PreferenceMicroBatchLoss(
            type(self).pair_loss, self.config.beta, weights, counts, self.domains, h_step
        )

    def derived_metrics(self, step: dict[str, float]) -> dict[str, float]:
        accs = [step[k] for k in step if k.startswith("preference/accuracy/")]
        return {"preference/accuracy/worst": min(accs)} if accs else {}


@register_objective
class DPO(PreferenceObjective):
    """DPO: mean over pairs of -log sigmoid(beta h)."""

    Config = DPOConfig


@register_objective
class IPO(PreferenceObjective):
    """IPO: mean over pairs of (h - 1/(2 beta))^2."""

    Config = IPOConfig
    pair_loss = staticmethod(ipo_pair_loss)


class GroupRobustPreference(PreferenceObjective):
    """The group-robust version: alpha (training state, ``objectives/robust.py``) moves once per
    step from the step's detached pair losses at theta, then weights the step's pairs."""

    def __init__(self, config: GRDPOConfig, domains: Sequence[str] = ("default",)):
        super().__init__(config, domains)
        self.robust = DomainRobust(
            self.domains, config.robust_eta, config.robust_estimator, config.robust_allocation
        )
        self._weights: Tensor | None = None

    def domain_allocation(self) -> Callable[[int], list[int]] | None:
        return self.robust.allocation()

    def set_domain_sizes(self, counts: Sequence[int]) -> None:
        self.robust.set_domain_sizes(counts)

    def pair_weights(self, num_pairs: int) -> Tensor:
        if self._weights is None:
            raise RuntimeError("the step's pair weights come from before_step (alpha's update)")
        return self._weights

    def before_step(self, step: StepInputs) -> Tensor | None:
        h = step_margins(step.step_log_ratio(), step.batch)
        chosen = step.batch.rewards > 0
        domain = torch.zeros(len(h), dtype=torch.long)
        domain[step.batch.group_ids[chosen]] = step.batch.domains[chosen]
        d = len(self.domains)
        losses = type(self).pair_loss(h, self.config.beta).double()
        sums = torch.zeros(d, dtype=torch.float64).index_add_(0, domain, losses)
        counts = torch.bincount(domain, minlength=d).double()
        self._weights = self.robust.step(sums, counts)
        return None if step.plan.groups_whole else h

    def metrics(self) -> dict[str, float]:
        return self.robust.metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.robust.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.robust.load_state_dict(state)


@register_objective
class GRDPO(GroupRobustPreference):
    """GR-DPO (Ramesh et al. 2024)."""

    Config = GRDPOConfig


@register_objective
class GRIPO(GroupRobustPreference):
    """GR-IPO (Ramesh et al. 2024)."""

    Config = GRIPOConfig
    pair_loss = staticmethod(ipo_pair_loss)
