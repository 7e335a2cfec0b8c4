"""Group-Robust preference optimisation (Ramesh et al. 2024, "Group Robust Preference Optimization
in Reward-free RLHF"), and the same robust weighting over data domains for GVPO.

Objective: ``min_theta max_{alpha in simplex} sum_g alpha_g * loss_g(theta)``, where ``loss_g`` is
the mean per-pair loss over group g's pairs in the batch. Per pair, with the implicit-reward margin
``h = (logp_c - ref_c) - (logp_r - ref_r)``:

- DPO: ``-log sigmoid(beta * h)``
- IPO: ``(h - 1 / (2 beta))^2``

Each step, before the policy update, the weights take a mirror-ascent step::

    alpha_g <- alpha_g * exp(eta_alpha * N * loss_g / N_g)      for groups present in the batch
    alpha   <- alpha / sum(alpha)

with ``N`` the batch size, ``N_g`` the number of group g's items in it and ``loss_g`` the group's
mean loss (detached); groups absent from the batch keep their weight before renormalisation. Then
the policy minimises ``sum_g alpha_g * loss_g`` with the updated, detached alpha (the paper's order:
the weights move first, at the current theta).

Distributed / micro-batched use: ``loss_g`` and ``N_g`` must be those of the whole step batch.
Compute per-group loss sums and counts locally (``per_group_loss_sums``), all-reduce them (sum),
and pass them as ``group_loss_sums=`` / ``group_counts=`` to every local call. Update alpha once
per step on every rank (``update_weights=True`` on the first micro-batch only, or an explicit
``GroupRobustWeights.update`` and ``update_weights=False`` everywhere): the update is then identical
on every rank, and the local objective ``sum_g alpha_g * (local sum_g) / N_g(global)`` summed over
micro-batches and ranks equals the full-batch objective, value and gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_gvpo.algorithms._groups import (
    check_beta,
    check_group_ids,
    first_of_group,
    group_index,
    group_sum,
)
from megatron_gvpo.algorithms.gvpo import GVPOGroupStats, gvpo_sample_losses

__all__ = [
    "GroupRobustWeights",
    "domain_robust_gvpo_loss",
    "dpo_pair_loss",
    "gr_dpo_loss",
    "gr_ipo_loss",
    "per_group_loss_sums",
    "group_robust_objective",
    "ipo_pair_loss",
    "preference_margin",
]



# ------------------------------------------------------------------------------ pair losses


def preference_margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> Tensor:
    """``h = (logp_c - ref_c) - (logp_r - ref_r)`` per pair, ``[N]`` (sequence logprob sums)."""
    n = policy_chosen_logps.shape
    for name, t in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        if t.shape != n:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(n)}")
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"logps must be 1-D [N], got shape {tuple(n)}")
    return (policy_chosen_logps - ref_chosen_logps.detach()) - (
        policy_rejected_logps - ref_rejected_logps.detach()
    )


def dpo_pair_loss(h: Tensor, beta: float) -> Tensor:
    """DPO per-pair loss ``-log sigmoid(beta * h)`` (numerically stable)."""
    return -F.logsigmoid(check_beta(beta) * h)


def ipo_pair_loss(h: Tensor, beta: float) -> Tensor:
    """IPO per-pair loss ``(h - 1 / (2 beta))^2``."""
    return (h - 1.0 / (2.0 * check_beta(beta))).square()


# ---------------------------------------------------------------------------------- weights


class GroupRobustWeights:
    """The adversary's weights ``alpha`` on the simplex over ``num_groups`` groups (uniform start),
    kept in float64 on the CPU; see the module docstring for the update."""

    def __init__(self, num_groups: int, eta_alpha: float) -> None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        eta = float(eta_alpha)
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta_alpha must be a finite number >= 0, got {eta_alpha!r}")
        self.num_groups = num_groups
        self.eta_alpha = eta
        self.alpha = torch.full((num_groups,), 1.0 / num_groups, dtype=torch.float64)

    @torch.no_grad()
    def update(self, group_loss_sums: Tensor, group_counts: Tensor) -> Tensor:
        """One mirror-ascent step from per-group loss sums and item counts ``[num_groups]`` of the
        (whole step) batch; ``loss_g = sums_g / counts_g``, ``N = sum counts``. Groups with
        count 0 keep their weight before renormalisation. Returns the new alpha (a copy)."""
        sums = group_loss_sums.detach().to("cpu", torch.float64).reshape(-1)
        counts = group_counts.detach().to("cpu", torch.float64).reshape(-1)
        if sums.numel() != self.num_groups or counts.numel() != self.num_groups:
            raise ValueError(
                f"expected [{self.num_groups}] loss sums and counts, got "
                f"{tuple(group_loss_sums.shape)} and {tuple(group_counts.shape)}"
            )
        if bool((counts < 0).any()):
            raise ValueError("group_counts must be >= 0")
        present = counts > 0
        n = counts.sum()
        safe = torch.where(present, counts, torch.ones_like(counts))
        mean_loss = sums / safe
        step = torch.where(present, self.eta_alpha * n * mean_loss / safe, torch.zeros_like(sums))
        return self.ascend(step)

    @torch.no_grad()
    def ascend(self, exponents: Tensor) -> Tensor:
        """``alpha_g <- alpha_g * exp(exponents_g)``, renormalised; returns the new alpha (a copy).

        The multiplicative step itself, for callers that size it differently (the preference
        objectives use the dataset's N and N_g, ``trainer/objectives/preference.py``)."""
        step = exponents.detach().to("cpu", torch.float64).reshape(-1)
        if step.numel() != self.num_groups:
            raise ValueError(f"expected [{self.num_groups}] exponents, got {tuple(step.shape)}")
        # In log space: exp() of large steps cannot overflow.
        self.alpha = torch.softmax(torch.log(self.alpha) + step, dim=0)
        return self.alpha.clone()

    def state_dict(self) -> dict[str, object]:
        return {
            "alpha": self.alpha.clone(),
            "num_groups": self.num_groups,
            "eta_alpha": self.eta_alpha,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        alpha = torch.as_tensor(state["alpha"], dtype=torch.float64).detach().cpu().reshape(-1)
        if alpha.numel() != self.num_groups:
            raise ValueError(f"alpha has {alpha.numel()} entries, expected {self.num_groups}")
        if bool((alpha < 0).any()) or not math.isclose(float(alpha.sum()), 1.0, abs_tol=1e-6):
            raise ValueError("alpha must lie on the simplex (>= 0, summing to 1)")
        self.alpha = alpha / alpha.sum()
        if "eta_alpha" in state:
            self.eta_alpha = float(state["eta_alpha"])  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- objective


def _check_labels(group_labels: Tensor | None, n: int, num_groups: int, name: str) -> Tensor:
    if group_labels is None:
        raise ValueError(f"{name} is required (one integer label in [0, num_groups) per item)")
    labels = check_group_ids(group_labels, n, name)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_groups):
        raise ValueError(
            f"{name} must lie in [0, {num_groups}), got min {int(labels.min())}, "
            f"max {int(labels.max())}"
        )
    return labels


def per_group_loss_sums(
    item_losses: Tensor, group_labels: Tensor, num_groups: int
) -> tuple[Tensor, Tensor]:
    """``(sums, counts)`` ``[num_groups]``: per-group sum of ``item_losses`` (with grad) and the
    number of items, for labels in ``[0, num_groups)``."""
    labels = _check_labels(group_labels, item_losses.numel(), num_groups, "group_labels")
    labels = labels.to(item_losses.device)
    sums = group_sum(item_losses, labels, num_groups)
    counts = torch.bincount(labels, minlength=num_groups).to(item_losses.dtype)
    return sums, counts


def group_robust_objective(loss_sums: Tensor, group_counts: Tensor, alpha: Tensor) -> Tensor:
    """``sum_g alpha_g * loss_sums_g / N_g`` over groups with ``N_g > 0`` (alpha detached)."""
    a = alpha.detach().to(device=loss_sums.device, dtype=loss_sums.dtype)
    counts = group_counts.detach().to(device=loss_sums.device, dtype=loss_sums.dtype)
    weight = torch.where(counts > 0, a / counts.clamp(min=1e-30), torch.zeros_like(a))
    return (weight * loss_sums).sum()


def _robust_step(
    item_losses: Tensor,
    labels: Tensor,
    weights: GroupRobustWeights,
    update_weights: bool,
    global_sums: Tensor | None,
    global_counts: Tensor | None,
    count_items: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Shared tail: local sums -> (global stats) -> alpha update -> weighted objective, metrics.

    ``count_items``: per-item 0/1 (or counts) used for ``N_g`` instead of one per item."""
    g = weights.num_groups
    local_sums = group_sum(item_losses, labels, g)
    if count_items is None:
        local_counts = torch.bincount(labels, minlength=g).to(item_losses.dtype)
    else:
        local_counts = group_sum(count_items.to(item_losses.dtype), labels, g)
    sums = local_sums.detach() if global_sums is None else global_sums.detach()
    counts = local_counts if global_counts is None else global_counts.detach()
    sums = sums.to(device=item_losses.device, dtype=item_losses.dtype).reshape(-1)
    counts = counts.to(device=item_losses.device, dtype=item_losses.dtype).reshape(-1)
    if sums.numel() != g or counts.numel() != g:
        raise ValueError(f"group loss sums and counts must have {g} entries")
    if update_weights:
        weights.update(sums, counts)
    loss = group_robust_objective(local_sums, counts, weights.alpha)
    with torch.no_grad():
        present = counts > 0
        mean = sums / counts.clamp(min=1e-30)
        metrics: dict[str, Tensor] = {
            "worst_group_loss": mean[present].max()
            if bool(present.any())
            else torch.zeros((), dtype=sums.dtype, device=sums.device),
            "weighted_loss": (weights.alpha.to(sums) * torch.where(present, mean, 0.0)).sum(),
        }
        for k in range(g):
            metrics[f"alpha/{k}"] = weights.alpha[k].to(sums.dtype).clone()
            if bool(present[k]):
                metrics[f"group_loss/{k}"] = mean[k]
    return loss, metrics


def _gr_pairs(
    pair_loss_fn,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    group_labels: Tensor | None,
    weights: GroupRobustWeights,
    beta: float,
    update_weights: bool,
    group_loss_sums: Tensor | None,
    group_counts: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    h = preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    labels = _check_labels(group_labels, h.numel(), weights.num_groups, "group_labels")
    if (group_loss_sums is None) != (group_counts is None):
        raise ValueError("pass both group_loss_sums and group_counts, or neither")
    dtype = torch.promote_types(h.dtype, torch.float32)
    losses = pair_loss_fn(h.to(dtype), beta)
    loss, metrics = _robust_step(
        losses, labels.to(h.device), weights, update_weights, group_loss_sums, group_counts
    )
    with torch.no_grad():
        metrics["margin_mean"] = h.detach().to(dtype).mean() if h.numel() else loss.detach() * 0
        metrics["accuracy"] = (h.detach() > 0).to(dtype).mean() if h.numel() else loss.detach() * 0
    return loss, metrics


def gr_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    group_labels: Tensor | None,
    weights: GroupRobustWeights,
    beta: float = 0.1,
    *,
    update_weights: bool = True,
    group_loss_sums: Tensor | None = None,
    group_counts: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GR-DPO on ``[N]`` (chosen, rejected) pairs with integer ``group_labels`` in
    ``[0, weights.num_groups)``.

    Updates ``weights`` first (``update_weights``), then returns
    ``(sum_g alpha_g * loss_g, metrics)``. ``group_loss_sums`` / ``group_counts``: detached
    per-group loss sums and pair counts of the whole step batch (see the module docstring); default
    the local ones. Metrics: ``worst_group_loss`` (max mean loss over groups present),
    ``weighted_loss``, ``alpha/<g>``, ``group_loss/<g>`` (groups present), ``margin_mean``,
    ``accuracy`` (share of pairs with h > 0)."""
    return _gr_pairs(
        dpo_pair_loss,
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        group_labels,
        weights,
        beta,
        update_weights,
        group_loss_sums,
        group_counts,
    )


def gr_ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    group_labels: Tensor | None,
    weights: GroupRobustWeights,
    beta: float = 0.1,
    *,
    update_weights: bool = True,
    group_loss_sums: Tensor | None = None,
    group_counts: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GR-IPO: as ``gr_dpo_loss`` with the IPO pair loss ``(h - 1/(2 beta))^2``."""
    return _gr_pairs(
        ipo_pair_loss,
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        group_labels,
        weights,
        beta,
        update_weights,
        group_loss_sums,
        group_counts,
    )


# ------------------------------------------------------------------------- domain-robust GVPO


def domain_group_counters(group_ids: Tensor, counted: Tensor) -> Tensor:
    """``[N]`` bool: the samples that count their prompt group towards its domain's ``N_d`` (the
    first sample of each group with k >= 2; ``counted`` is ``gvpo_sample_losses``' mask)."""
    return first_of_group(group_ids) & counted.to(group_ids.device)


def domain_robust_gvpo_loss(
    seq_logprobs: Tensor,
    old_seq_logprobs: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    domain_labels: Tensor | None,
    weights: GroupRobustWeights,
    beta: float,
    *,
    update_weights: bool = True,
    group_stats: GVPOGroupStats | None = None,
    domain_loss_sums: Tensor | None = None,
    domain_counts: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GVPO with robust weights over data domains: ``sum_d alpha_d * L_d`` where ``L_d`` is the
    GVPO loss of domain d's prompt groups (mean over its groups with k >= 2 of
    ``sum_i c_i^2 / (2 (k - 1))``). The unit is the prompt group: in the alpha update ``N`` is the
    number of counted groups of the batch and ``N_d`` that of domain d.

    ``domain_labels`` ``[N]``: one integer in ``[0, weights.num_groups)`` per sample; all samples
    of a prompt group must share it. ``group_stats``: as in ``gvpo_loss_terms``. In split use also
    pass the whole batch's ``domain_loss_sums`` (sum of per-sample GVPO terms, detached) and
    ``domain_counts`` (counted groups per domain), e.g. all-reduced from
    ``megatron_gvpo.algorithms.gvpo.gvpo_sample_losses`` outputs. Metrics as ``gr_dpo_loss``
    (``worst_group_loss`` is the worst domain)."""
    q, _, counted = gvpo_sample_losses(
        seq_logprobs, old_seq_logprobs, rewards, group_ids, beta, group_stats=group_stats
    )
    labels = _check_labels(domain_labels, q.numel(), weights.num_groups, "domain_labels")
    labels = labels.to(q.device)
    if (domain_loss_sums is None) != (domain_counts is None):
        raise ValueError("pass both domain_loss_sums and domain_counts, or neither")
    ids = group_ids.to(device=q.device, dtype=torch.int64)
    _, inverse, counts = group_index(ids)
    ng = counts.numel()
    # Each group must live in one domain: compare per-group min and max domain label.
    lo = torch.full((ng,), weights.num_groups, dtype=torch.int64, device=q.device)
    hi = torch.full((ng,), -1, dtype=torch.int64, device=q.device)
    lo = lo.scatter_reduce(0, inverse, labels, reduce="amin")
    hi = hi.scatter_reduce(0, inverse, labels, reduce="amax")
    if bool((lo != hi).any()):
        raise ValueError("domain_labels must be constant within each prompt group (group_ids)")
    count_items = domain_group_counters(ids, counted).to(q.dtype)
    loss, metrics = _robust_step(
        q, labels, weights, update_weights, domain_loss_sums, domain_counts, count_items
    )
    return loss, metrics
