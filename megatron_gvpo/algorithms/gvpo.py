"""GVPO loss (Group Variance Policy Optimization, arXiv 2504.19599), as pure tensor functions.

Per prompt group g of size k with rewards R_i, summed response-token logprobs s_i (theta, with grad)
and s'_i (theta', the sampling policy, no grad)::

    delta_i = beta * (s_i - s'_i)
    c_i     = (delta_i - mean_g delta) - (R_i - mean_g R)
    L       = (1 / #{g : k_g >= 2}) * sum_{g : k_g >= 2} sum_{i in g} c_i^2 / (2 (k_g - 1))

Groups of size 1 carry no signal: they add nothing and are not counted. The gradient is
dL/ds_i = beta * c_i / ((k_g - 1) * #groups). ``mean_g delta`` is treated as a constant (detached):
its gradient contribution is sum_i c_i * (-beta / k) = 0 because sum_i c_i = 0 in every group, so
the value and the gradient are exact. This is what makes the split (distributed) form cheap. (Second
derivatives are not those of L: do not use these functions under double backward.)

Two entry points:

``gvpo_loss(...)``
    The one-shot loss over a whole batch.

``gvpo_loss_terms(..., group_stats=None, normalizer=None)``
    The same, but the per-group statistics (size, mean delta, mean reward) may come from outside
    and the denominator is given explicitly. For data-parallel / micro-batched training:

    1. before the step's backward passes (theta is fixed for the whole optimizer step), gather
       ``(s, s', R, group_id)`` of the *whole step batch* detached (e.g. a no-grad forward plus an
       all-gather over DP ranks) and call ``gvpo_group_stats`` on it, identically on every rank;
    2. for every micro-batch on every rank call
       ``gvpo_loss_terms(local..., group_stats=stats, normalizer=stats.num_counted)``
       (``normalizer`` defaults to exactly that) and backpropagate that loss as is;
    3. the sum over micro-batches and ranks of these losses (and of their gradients) equals
       ``gvpo_loss`` on the whole batch, whatever the placement of samples: a group may be spread
       over several micro-batches or ranks. (If the DP gradient reduction averages instead of sums,
       multiply by the DP size.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_gvpo.algorithms._groups import check_beta, check_group_ids, group_index, group_sum

__all__ = [
    "GVPOGroupStats",
    "gvpo_group_stats",
    "gvpo_loss",
    "gvpo_loss_terms",
    "gvpo_sample_losses",
    "num_counted_groups",
]



def _check_inputs(
    seq_logprobs: Tensor, old_seq_logprobs: Tensor, rewards: Tensor, group_ids: Tensor
) -> Tensor:
    for name, t in (
        ("seq_logprobs", seq_logprobs),
        ("old_seq_logprobs", old_seq_logprobs),
        ("rewards", rewards),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    n = seq_logprobs.numel()
    if old_seq_logprobs.numel() != n or rewards.numel() != n:
        raise ValueError(
            "seq_logprobs, old_seq_logprobs, rewards and group_ids must have equal lengths, got "
            f"{n}, {old_seq_logprobs.numel()}, {rewards.numel()}, {group_ids.numel()}"
        )
    return check_group_ids(group_ids, n)


def _compute_dtype(t: Tensor) -> torch.dtype:
    # bf16/fp16 logprobs are promoted: the centring subtracts nearly equal numbers.
    return torch.promote_types(t.dtype, torch.float32)


@dataclass(frozen=True, eq=False)
class GVPOGroupStats:
    """Detached per-group statistics, indexed by sorted unique group id.

    Attributes:
        group_ids: ``[G]`` int64, sorted, unique.
        size: ``[G]`` int64, number of samples of each group (in the whole step batch).
        mean_delta: ``[G]`` mean of ``beta * (s - s')`` over the group.
        mean_reward: ``[G]`` mean reward over the group.
    """

    group_ids: Tensor
    size: Tensor
    mean_delta: Tensor
    mean_reward: Tensor

    @property
    def num_counted(self) -> int:
        """Groups with at least 2 samples: the GVPO normaliser."""
        return _num_counted(self.size)

    @property
    def num_dropped(self) -> int:
        """Groups of size 1 (no signal, not counted)."""
        return self.size.numel() - self.num_counted

    def lookup(self, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample ``(size, mean_delta, mean_reward)`` for ``group_ids`` ``[N]``.

        Raises ValueError if an id is not in these statistics."""
        ids = group_ids.to(device=self.group_ids.device, dtype=torch.int64)
        g = self.group_ids.numel()
        if ids.numel() == 0:
            empty = self.mean_delta.new_zeros(0)
            return self.size.new_zeros(0), empty, self.mean_reward.new_zeros(0)
        if g == 0:
            raise ValueError("group_stats is empty but group_ids is not")
        idx = torch.searchsorted(self.group_ids, ids).clamp_(max=g - 1)
        found = self.group_ids[idx] == ids
        if not bool(found.all()):
            missing = torch.unique(ids[~found])[:10].tolist()
            raise ValueError(f"group_ids {missing} are missing from group_stats")
        return self.size[idx], self.mean_delta[idx], self.mean_reward[idx]


def _num_counted(sizes: Tensor) -> int:
    return int((sizes >= 2).sum().item())


def num_counted_groups(group_ids: Tensor) -> int:
    """Groups of ``group_ids`` with at least 2 samples: the GVPO normaliser, known before any
    forward pass (size-1 groups carry no signal)."""
    _, _, counts = group_index(group_ids.to(torch.int64))
    return _num_counted(counts)


@torch.no_grad()
def gvpo_group_stats(
    seq_logprobs: Tensor,
    old_seq_logprobs: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    beta: float,
) -> GVPOGroupStats:
    """Detached group statistics of a (whole, gathered) batch; see the module docstring."""
    beta = check_beta(beta)
    ids = _check_inputs(seq_logprobs, old_seq_logprobs, rewards, group_ids)
    dtype = _compute_dtype(seq_logprobs)
    delta = beta * (seq_logprobs.detach().to(dtype) - old_seq_logprobs.detach().to(dtype))
    r = rewards.detach().to(device=delta.device, dtype=dtype)
    unique, inverse, counts = group_index(ids.to(delta.device))
    g = unique.numel()
    denom = counts.to(dtype)

    def group_mean(x: Tensor) -> Tensor:
        # Shifted by the group maximum: exact for constant groups (all-equal rewards centre to
        # exactly 0) and better conditioned for large offsets such as summed logprobs.
        shift = x.new_full((g,), -math.inf).scatter_reduce(0, inverse, x, reduce="amax")
        return shift + group_sum(x - shift[inverse], inverse, g) / denom

    return GVPOGroupStats(
        group_ids=unique, size=counts, mean_delta=group_mean(delta), mean_reward=group_mean(r)
    )


def _terms(
    seq_logprobs: Tensor,
    old_seq_logprobs: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    beta: float,
    group_stats: GVPOGroupStats | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, GVPOGroupStats]:
    """``(q, c, counted, delta, centered_reward, stats)``; q, c, delta carry the graph."""
    beta = check_beta(beta)
    ids = _check_inputs(seq_logprobs, old_seq_logprobs, rewards, group_ids)
    if group_stats is None:
        group_stats = gvpo_group_stats(seq_logprobs, old_seq_logprobs, rewards, ids, beta)
    dtype = _compute_dtype(seq_logprobs)
    s = seq_logprobs.to(dtype)
    dev = s.device
    delta = beta * (s - old_seq_logprobs.detach().to(device=dev, dtype=dtype))
    r = rewards.detach().to(device=dev, dtype=dtype)
    size, mean_delta, mean_reward = group_stats.lookup(ids)
    size = size.to(dev)
    centered_r = r - mean_reward.to(device=dev, dtype=dtype)
    c = (delta - mean_delta.to(device=dev, dtype=dtype)) - centered_r
    counted = size >= 2
    weight = torch.where(
        counted, 0.5 / (size - 1).clamp(min=1).to(dtype), torch.zeros((), dtype=dtype, device=dev)
    )
    q = c.square() * weight
    return q, c, counted, delta, centered_r, group_stats


def gvpo_sample_losses(
    seq_logprobs: Tensor,
    old_seq_logprobs: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    beta: float,
    *,
    group_stats: GVPOGroupStats | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Unnormalised per-sample GVPO terms.

    Returns ``(q, c, counted)``, all ``[N]``: ``q_i = c_i^2 / (2 (k_i - 1))`` (with grad; exactly 0,
    still attached to the graph, for samples of size-1 groups), ``c_i`` (with grad) and a bool mask
    of samples in groups with ``k >= 2``. ``k``, ``mean delta`` and ``mean R`` come from
    ``group_stats`` when given (computed over the whole step batch), else from these inputs.
    ``sum(q) / #counted groups`` is the GVPO loss.
    """
    q, c, counted, _, _, _ = _terms(
        seq_logprobs, old_seq_logprobs, rewards, group_ids, beta, group_stats
    )
    return q, c, counted


def gvpo_loss_terms(
    seq_logprobs: Tensor,
    old_seq_logprobs: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    beta: float,
    *,
    group_stats: GVPOGroupStats | None = None,
    normalizer: float | int | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GVPO loss with optional external group statistics and normaliser.

    Args:
        seq_logprobs: ``[N]`` summed response-token logprobs under theta (with grad).
        old_seq_logprobs: ``[N]`` the same under theta' (treated as constant).
        rewards: ``[N]`` rewards (constant).
        group_ids: ``[N]`` integer prompt-group ids; any values, any order.
        beta: GVPO's beta (> 0).
        group_stats: statistics of the whole step batch (``gvpo_group_stats`` on the gathered,
            detached data). ``None``: computed from these inputs (one-shot loss).
        normalizer: the number of groups with ``k >= 2`` in the whole step batch. ``None``:
            ``group_stats.num_counted`` (the local count when ``group_stats`` is None). A value
            of 0 is treated as 1 (the sum is then exactly 0).

    Returns:
        ``(loss, diagnostics)``; ``loss = sum_i q_i / normalizer`` (a 0-dim tensor connected to
        ``seq_logprobs`` even when it is 0). Diagnostics are detached 0-dim float tensors over the
        *local* samples, except ``groups_counted`` / ``groups_dropped``, which describe the
        statistics used (with ``group_stats``: the same on every rank, do not sum them):

        - ``delta_mean``, ``delta_std``: over all local samples (population std);
        - ``c_mean``, ``c_std``: over local samples of counted groups (population std);
        - ``groups_counted``, ``groups_dropped``: groups with ``k >= 2`` / ``k == 1``;
        - ``samples_counted``: local samples in counted groups;
        - ``sum_c_sq``, ``sum_centered_reward_sq``: ``sum c_i^2`` and ``sum (R_i - mean_g R)^2``
          over local counted samples (sum these over ranks for a global variance-explained);
        - ``reward_var_explained = 1 - sum_c_sq / sum_centered_reward_sq``: the fraction of the
          centred-reward variation reproduced by the centred delta (0 at theta = theta', 1 when
          the centred delta equals the centred rewards, negative when worse than delta = 0).
          Reported as 0 when ``sum_centered_reward_sq == 0`` (all rewards equal within every
          counted group), where the ratio is undefined.
    """
    q, c, counted, delta, centered_r, stats = _terms(
        seq_logprobs, old_seq_logprobs, rewards, group_ids, beta, group_stats
    )
    if normalizer is None:
        norm = float(stats.num_counted)
    else:
        norm = float(normalizer)
        if not math.isfinite(norm) or norm < 0:
            raise ValueError(f"normalizer must be a finite number >= 0, got {normalizer!r}")
    # sum(q) is exactly 0 (still a graph node) when nothing is counted, so dividing by 1 is safe.
    loss = q.sum() / max(norm, 1.0)

    with torch.no_grad():
        dtype, dev = q.dtype, q.device
        delta = delta.detach()
        cc = c.detach()[counted]
        rr = centered_r[counted]
        zero = torch.zeros((), dtype=dtype, device=dev)
        sum_c_sq = cc.square().sum()
        sum_r_sq = rr.square().sum()
        positive = sum_r_sq > 0
        explained = torch.where(
            positive, 1.0 - sum_c_sq / torch.where(positive, sum_r_sq, 1.0), zero
        )
        diag = {
            "delta_mean": delta.mean() if delta.numel() else zero,
            "delta_std": delta.std(correction=0) if delta.numel() else zero,
            "c_mean": cc.mean() if cc.numel() else zero,
            "c_std": cc.std(correction=0) if cc.numel() else zero,
            "groups_counted": torch.tensor(float(stats.num_counted), dtype=dtype, device=dev),
            "groups_dropped": torch.tensor(float(stats.num_dropped), dtype=dtype, device=dev),
            "samples_counted": counted.sum().to(dtype),
            "sum_c_sq": sum_c_sq,
            "sum_centered_reward_sq": sum_r_sq,
            "reward_var_explained": explained,
        }
    return loss, diag


def gvpo_loss(
    seq_logprobs: Tensor,
    old_seq_logprobs: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    beta: float,
) -> Tensor:
    """The GVPO loss L over one batch (see the module docstring); a 0-dim tensor."""
    loss, _ = gvpo_loss_terms(seq_logprobs, old_seq_logprobs, rewards, group_ids, beta)
    return loss
