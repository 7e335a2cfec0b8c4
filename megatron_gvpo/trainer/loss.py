"""The algorithms/ losses applied to Megatron micro-batches, exact for the whole step batch.

Each micro-batch's loss is its share of the full-batch loss: a sum over its samples (or tokens)
divided by a normaliser of the *whole step* (groups, sequences or tokens over all micro-batches
and DP ranks). Megatron's schedule adds no scaling (``calculate_per_token_loss``) and DDP sums
over DP (``parallel/ddp.py``), so one optimizer step's gradient is the gradient of the loss over
the step's batch, whatever the TP, PP and DP sizes, the token budget and the placement of samples.

GVPO also needs group means of delta = beta (s - s') over the whole step. When every group lies in
one micro-batch (``StepPlan.groups_whole``) the loss takes them from the micro-batch itself; else
``gvpo_step_stats`` runs a detached forward over the step and all-reduces per-sample s over DP.
Domain-robust GVPO (``gr_gvpo``) always needs the step's s: its alpha update uses every domain's
loss before the first backward (on a round's first update s = s', so no extra pass is needed).

Micro-batch ``extra`` keys (built by ``trainer.batch.build_micro_batches``): ``sample_ids`` [n]
(indices into the step batch), ``response_index``/``response_mask`` [n, L] (see
``data.batching.PackedSequences``), ``group_ids``, ``rewards`` [n], ``old_logprobs`` [n, L]
(theta', per response token), and where the loss needs them ``advantages`` [n], ``ref_logprobs``
[n, L], ``domains`` [n].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from megatron_gvpo.algorithms.config import AlgorithmConfig
from megatron_gvpo.algorithms.group_robust import domain_robust_gvpo_loss
from megatron_gvpo.algorithms.grpo import dapo_loss, dr_grpo_loss, grpo_loss, gspo_loss
from megatron_gvpo.algorithms.gvpo import (
    GVPOGroupStats,
    gvpo_group_stats,
    gvpo_loss_terms,
    gvpo_sample_losses,
)
from megatron_gvpo.models.forward import MicroBatch, compute_logprobs
from megatron_gvpo.trainer.batch import response_logprobs, sequence_logprobs, sum_over_dp


def count_groups(group_ids: Tensor) -> int:
    """Groups with at least two samples: GVPO's normaliser (size-1 groups carry no signal)."""
    _, counts = torch.unique(group_ids, return_counts=True)
    return int((counts >= 2).sum())


class GVPOMicroBatchLoss:
    """GVPO on one micro-batch: sum of its c_i^2 / (2 (k - 1)) over the step's counted groups.

    ``group_stats``: detached step-wide group statistics (``gvpo_step_stats``), or None when every
    group is whole inside its micro-batch. ``num_groups``: ``count_groups`` of the whole step.
    """

    def __init__(self, beta: float, num_groups: int, group_stats: GVPOGroupStats | None = None):
        self.beta = beta
        self.num_groups = num_groups
        self.group_stats = group_stats

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, mb: MicroBatch):
        x = mb.extra
        s = sequence_logprobs(logprobs, mb)
        old = x["old_logprobs"].to(s.device).sum(-1)
        loss, diag = gvpo_loss_terms(
            s,
            old,
            x["rewards"].to(s.device),
            x["group_ids"].to(s.device),
            self.beta,
            group_stats=self.group_stats,
            normalizer=self.num_groups,
        )
        return loss, _metrics(loss, diag, x)


class PolicyMicroBatchLoss:
    """GRPO, Dr.GRPO, DAPO or GSPO on one micro-batch, normalised by the whole step's counts."""

    _LOSSES = {"grpo": grpo_loss, "dr_grpo": dr_grpo_loss, "gspo": gspo_loss, "dapo": dapo_loss}

    def __init__(self, config: AlgorithmConfig, num_sequences: int, num_tokens: int):
        self.name = config.name
        self.policy = config.policy_loss_config()
        self.norm = (
            {"num_tokens": num_tokens} if self.name == "dapo" else {"num_sequences": num_sequences}
        )

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, mb: MicroBatch):
        x = mb.extra
        lp = response_logprobs(logprobs, mb)
        dev = lp.device
        ref = x.get("ref_logprobs")
        loss, diag = self._LOSSES[self.name](
            lp,
            x["old_logprobs"].to(dev),
            x["advantages"].to(dev),
            x["response_mask"].to(dev),
            self.policy,
            ref_logprobs=None if ref is None else ref.to(dev),
            **self.norm,
        )
        return loss, _metrics(loss, diag, x)


def _metrics(loss: Tensor, diag: dict[str, Tensor], extra: dict) -> dict[str, Tensor]:
    out = {k: v.detach().float() for k, v in diag.items()}
    out["loss"] = loss.detach().float()
    out["num_samples"] = torch.tensor(float(extra["sample_ids"].numel()))
    return out


@torch.no_grad()
def step_seq_logprobs(
    model: torch.nn.Module,
    micro_batches: list[MicroBatch],
    num_samples: int,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``(s, s')`` [N] float64 of the whole step at the current theta, identical on every rank.

    A forward-only pass over this rank's micro-batches gives its samples; a sum all-reduce over DP
    of ``[2, N]`` zero-filled vectors (each sample lives on one DP rank) gives every rank all of
    them: the detached exchange of GVPO's delta (group ids are known everywhere already).
    """
    out = torch.zeros(2, num_samples, dtype=torch.float64)
    logprobs = compute_logprobs(model, micro_batches, temperature=temperature)
    for lp, mb in zip(logprobs, micro_batches, strict=True):
        ids = mb.extra["sample_ids"]
        out[0, ids] = sequence_logprobs(lp, mb).double().cpu()
        out[1, ids] = mb.extra["old_logprobs"].double().sum(-1).cpu()
    out = sum_over_dp(out, next(model.parameters()).device)
    return out[0], out[1]


def gvpo_step_stats(
    model: torch.nn.Module,
    micro_batches: list[MicroBatch],
    num_samples: int,
    rewards: Tensor,
    group_ids: Tensor,
    beta: float,
    temperature: float = 1.0,
) -> GVPOGroupStats:
    """Group statistics of the whole step at the current theta (see ``step_seq_logprobs``)."""
    s, old = step_seq_logprobs(model, micro_batches, num_samples, temperature)
    return gvpo_group_stats(s, old, rewards.to(torch.float64), group_ids, beta)


class GRGVPOMicroBatchLoss:
    """Domain-robust GVPO on one micro-batch: sum_d alpha_d L_d with the step's alpha.

    Build it with :meth:`for_step`, which takes the whole step's detached (s, s'), updates alpha
    once (Group-Robust mirror ascent on per-domain GVPO losses) and keeps the step-wide group
    statistics, per-domain loss sums and counted groups that every micro-batch shares.
    """

    def __init__(self, beta, weights, group_stats, domain_loss_sums, domain_counts):
        self.beta = beta
        self.weights = weights
        self.group_stats = group_stats
        self.domain_loss_sums = domain_loss_sums
        self.domain_counts = domain_counts

    @classmethod
    @torch.no_grad()
    def for_step(cls, s, old, rewards, group_ids, domains, weights, beta) -> GRGVPOMicroBatchLoss:
        rewards = rewards.to(torch.float64)
        stats = gvpo_group_stats(s, old, rewards, group_ids, beta)
        q, _, counted = gvpo_sample_losses(s, old, rewards, group_ids, beta, group_stats=stats)
        d = weights.num_groups
        sums = torch.zeros(d, dtype=torch.float64).index_add_(0, domains, q.double())
        # One count per prompt group with k >= 2, in its domain.
        _, first = np.unique(group_ids.numpy(), return_index=True)
        first = torch.as_tensor(first)
        first = first[counted[first]]
        counts = torch.bincount(domains[first], minlength=d).double()
        weights.update(sums, counts)
        return cls(beta, weights, stats, sums, counts)

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, mb: MicroBatch):
        x = mb.extra
        s = sequence_logprobs(logprobs, mb)
        dev = s.device
        loss, diag = domain_robust_gvpo_loss(
            s,
            x["old_logprobs"].to(dev).sum(-1),
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
        return loss, _metrics(loss, diag, x)
