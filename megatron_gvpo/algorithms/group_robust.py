"""Group-Robust optimisation over data domains (Ramesh et al. 2024, "Group Robust Preference
Optimization in Reward-free RLHF"): GR-DPO, GR-IPO, and the same weighting of per-domain GVPO losses.

Objective: ``min_theta max_{alpha in simplex} sum_d alpha_d L_d(theta)``, where ``L_d`` is the
expected loss of one *unit* of domain d: a preference pair (DPO ``-log sigmoid(beta h)``, IPO
``(h - 1/(2 beta))^2``, with ``h = (s_c - r_c) - (s_r - r_r)``) or a prompt group with k >= 2
responses (its GVPO term ``sum_i c_i^2 / (2 (k - 1))``). The dataset holds ``N_d`` units of domain
d, ``N = sum_d N_d``, ``p_d = N_d / N``. Once per optimizer step, at the step's theta and before
the policy update, alpha takes one mirror-ascent step from per-domain estimates ``m_d`` of ``L_d``
(the one rule, :meth:`GroupRobustWeights.update`)::

    alpha_d <- alpha_d exp(eta m_d)   for the domains the estimator reports as present,
    renormalised over those domains to the mass they held; the other domains keep alpha_d exactly.

Then the policy minimises ``sum_units w_{d(unit)} l(unit)`` with the updated, detached alpha, where
the unit weights ``w_d`` come from the estimator (:func:`unit_weights`). Both are step-wide
(computed from the whole step's counts), so the step's gradient does not depend on micro-batching
or the parallel layout. Two estimators (``algorithm.robust_estimator``), over a step of B units
with ``n_d`` of domain d, within-domain loss variance ``sigma_d^2``:

``stratified`` (the default): the step holds ``n_d`` units of domain d, fixed before the draw
(``data.sampling=auto``: ``n_d`` proportional to the current alpha, at least one per domain; or
equal, ``B / D``), each drawn uniformly from its domain, and ``m_d = (1/n_d) sum_{units of d} l``,
``w_d = alpha_d / n_d``. Then ``E[m_d] = L_d`` and ``E[objective] = sum_d alpha_d L_d`` (no
importance weight: a unit of d is drawn with the probability the estimator assumes), and

    Var[objective] = sum_d alpha_d^2 sigma_d^2 / n_d        Var[m_d] = sigma_d^2 / n_d,

whatever the domains' shares. With ``n_d = alpha_d B`` this is ``sum_d alpha_d sigma_d^2 / B``,
the least any allocation of B units reaches when the sigma_d are equal (minimise
``sum_d alpha_d^2 sigma_d^2 / n_d`` subject to ``sum_d n_d = B``: ``n_d`` proportional to
``alpha_d sigma_d``), and the step spends its units where alpha puts the weight. With another
sampler it is the per-domain batch mean: a domain absent from the step (n_d = 0) gets no weight
and keeps its alpha, and the objective's expectation is biased towards frequent domains.

``importance`` (Alg. 1's per-unit form, averaged over the step): units drawn in the dataset's
proportions (i.i.d., domain d with probability p_d), ``m_d = (1/(p_d B)) sum_{units of d} l`` for
every domain (0 when absent, its unbiased value for that draw) and ``w_d = alpha_d / (p_d B)``
(the draw's importance weight N/N_d, per unit, over B). Then ``E[m_d] = L_d``,
``E[objective] = sum_d alpha_d L_d``, and

    Var[objective] = (1/B) [sum_d alpha_d^2 (sigma_d^2 + L_d^2) / p_d - (sum_d alpha_d L_d)^2]
    Var[m_d]       = (1/B) [(sigma_d^2 + L_d^2) / p_d - L_d^2].

Derivation: the step is a mean of B i.i.d. terms ``X = (alpha_d / p_d) l`` with d ~ p; ``E[X^2] =
sum_d p_d (alpha_d / p_d)^2 E[l^2 | d]``, and ``E[l^2 | d] = sigma_d^2 + L_d^2``. The same holds
for the gradient, with l replaced by a unit's gradient and squares by squared norms (traces).

Numbers, two domains, alpha = (1/2, 1/2), equal ``L_d = L`` and ``sigma_d = sigma``, B units:

==========================  ==========================  =========================================
minority share p            stratified: Var[objective]  importance: Var[objective]
==========================  ==========================  =========================================
10%                         sigma^2 / B                 (2.78 sigma^2 + 1.78 L^2) / B
1%                          sigma^2 / B                 (25.3 sigma^2 + 24.3 L^2) / B
==========================  ==========================  =========================================

(stratified at alpha = (1/2, 1/2): n_d = B / 2 either way), and for the minority's alpha exponent:
stratified ``Var[m] = 2 sigma^2 / B``; importance
``(10 sigma^2 + 9 L^2) / B`` at 10% and ``(100 sigma^2 + 99 L^2) / B`` at 1%. At a DPO start
(theta = reference: every pair's loss is log 2, sigma = 0) with B = 16: stratified, m = log 2
exactly; importance, the minority's m has mean 0.69 and standard deviation 0.52 (10%) or 1.72
(1%), and the minority is absent from (1 - p)^B = 18.5% (10%) or 85% (1%) of the steps, in which
alpha moves towards the majority by eta L / (1 - p). The L^2 terms are what a mini-batch cannot
average away: importance weights give a few minority units most of the step's weight.

Either way the log-odds move by ``E[log(alpha'_a / alpha'_b)] = log(alpha_a / alpha_b) +
eta (L_a - L_b)`` (a and b reported present): alpha moves only through loss differences, never
through the domains' sizes.
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
)
from megatron_gvpo.algorithms.gvpo import GVPOGroupStats, gvpo_sample_losses

__all__ = [
    "ESTIMATORS",
    "GroupRobustWeights",
    "domain_estimates",
    "domain_robust_gvpo_loss",
    "domain_unit_counters",
    "dpo_pair_loss",
    "ipo_pair_loss",
    "unit_weights",
]

ESTIMATORS = ("stratified", "importance")


# ------------------------------------------------------------------------------ pair losses


def dpo_pair_loss(h: Tensor, beta: float) -> Tensor:
    """DPO per-pair loss ``-log sigmoid(beta * h)`` (numerically stable)."""
    return -F.logsigmoid(check_beta(beta) * h)


def ipo_pair_loss(h: Tensor, beta: float) -> Tensor:
    """IPO per-pair loss ``(h - 1 / (2 beta))^2``."""
    return (h - 1.0 / (2.0 * check_beta(beta))).square()


# ----------------------------------------------------------------------------- estimators


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"robust estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")


def _f64(x: Tensor | list | tuple, name: str, size: int | None = None) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(-1)
    if size is not None and t.numel() != size:
        raise ValueError(f"{name} has {t.numel()} entries, expected {size}")
    if bool((t < 0).any()) and name != "loss_sums":
        raise ValueError(f"{name} must be >= 0")
    return t


def _shares(data_counts: Tensor | None, size: int) -> Tensor:
    if data_counts is None:
        raise ValueError("the importance estimator needs the dataset's unit count per domain")
    counts = _f64(data_counts, "data_counts", size)
    if bool((counts <= 0).any()):
        raise ValueError("the importance estimator needs every domain's dataset count > 0")
    return counts / counts.sum()


def domain_estimates(
    estimator: str,
    loss_sums: Tensor,
    batch_counts: Tensor,
    data_counts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(m, present)`` ``[D]``: the estimate of each domain's expected unit loss L_d from the
    step's per-domain loss sums and unit counts (float64, detached), and which domains it
    reports (see the module docstring). ``data_counts``: the dataset's N_d (importance only)."""
    _check_estimator(estimator)
    sums = _f64(loss_sums, "loss_sums")
    counts = _f64(batch_counts, "batch_counts", sums.numel())
    if estimator == "stratified":
        present = counts > 0
        return torch.where(present, sums / counts.clamp(min=1.0), 0.0), present
    p = _shares(data_counts, sums.numel())
    b = counts.sum()
    m = sums / (p * b) if b > 0 else torch.zeros_like(sums)
    return m, torch.full_like(sums, b > 0, dtype=torch.bool)


def unit_weights(
    estimator: str,
    alpha: Tensor,
    batch_counts: Tensor,
    data_counts: Tensor | None = None,
) -> Tensor:
    """``w`` ``[D]`` float64: the weight of one unit of domain d in the step's objective
    ``sum_units w_d l`` (stratified: alpha_d / n_d, 0 where n_d = 0; importance:
    alpha_d / (p_d B))."""
    _check_estimator(estimator)
    a = _f64(alpha, "alpha")
    counts = _f64(batch_counts, "batch_counts", a.numel())
    if estimator == "stratified":
        return torch.where(counts > 0, a / counts.clamp(min=1.0), 0.0)
    p = _shares(data_counts, a.numel())
    b = counts.sum()
    return a / (p * b) if b > 0 else torch.zeros_like(a)


# ---------------------------------------------------------------------------------- weights


class GroupRobustWeights:
    """The adversary's weights ``alpha`` on the simplex over ``num_domains`` domains (uniform
    start), kept in float64 on the CPU, with the one update rule of the module docstring."""

    def __init__(self, num_domains: int, eta_alpha: float) -> None:
        if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 1:
            raise ValueError(f"num_domains must be a positive int, got {num_domains!r}")
        eta = float(eta_alpha)
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta_alpha must be a finite number >= 0, got {eta_alpha!r}")
        self.num_domains = num_domains
        self.eta_alpha = eta
        self.alpha = torch.full((num_domains,), 1.0 / num_domains, dtype=torch.float64)

    @torch.no_grad()
    def update(self, estimates: Tensor, present: Tensor | None = None) -> Tensor:
        """``alpha_d <- alpha_d exp(eta m_d)`` over the ``present`` domains (default: all),
        renormalised to the mass they held; the others keep their alpha. Returns a copy."""
        m = _f64(estimates, "loss_sums", self.num_domains)  # any sign
        if not bool(torch.isfinite(m).all()):
            raise ValueError("robust loss estimates must be finite")
        mask = (
            torch.ones(self.num_domains, dtype=torch.bool)
            if present is None
            else torch.as_tensor(present).detach().cpu().reshape(-1).bool()
        )
        if mask.numel() != self.num_domains:
            raise ValueError(f"present has {mask.numel()} entries, expected {self.num_domains}")
        if bool(mask.any()):
            a = self.alpha[mask]
            # In log space: exp() of large steps cannot overflow.
            moved = torch.softmax(torch.log(a) + self.eta_alpha * m[mask], dim=0) * a.sum()
            alpha = self.alpha.clone()
            alpha[mask] = moved
            self.alpha = alpha
        return self.alpha.clone()

    def state_dict(self) -> dict[str, object]:
        return {"alpha": self.alpha.tolist()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore alpha exactly as saved (float64 values survive JSON); checks the simplex."""
        alpha = torch.as_tensor(state["alpha"], dtype=torch.float64).detach().cpu().reshape(-1)
        if alpha.numel() != self.num_domains:
            raise ValueError(f"alpha has {alpha.numel()} entries, expected {self.num_domains}")
        if bool((alpha < 0).any()) or not math.isclose(float(alpha.sum()), 1.0, abs_tol=1e-6):
            raise ValueError("alpha must lie on the simplex (>= 0, summing to 1)")
        self.alpha = alpha.clone()


# ------------------------------------------------------------------------- domain-robust GVPO


def domain_unit_counters(group_ids: Tensor, counted: Tensor) -> Tensor:
    """``[N]`` bool: the samples that count their prompt group as one unit of its domain (the
    first sample of each group with k >= 2; ``counted`` is ``gvpo_sample_losses``' mask)."""
    return first_of_group(group_ids) & counted.to(group_ids.device)


def domain_robust_gvpo_loss(
    seq_logprobs: Tensor,
    old_seq_logprobs: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    domain_labels: Tensor,
    weights: Tensor,
    beta: float,
    *,
    group_stats: GVPOGroupStats | None = None,
) -> Tensor:
    """``sum_i w_{d(i)} q_i``: GVPO's per-sample terms ``q_i`` (a prompt group's terms sum to
    its ``sum_i c_i^2 / (2 (k - 1))``; groups with k < 2 give 0) weighted by their domain's unit
    weight ``weights`` ``[D]`` (:func:`unit_weights` of the whole step). ``domain_labels`` ``[N]``:
    integers in ``[0, D)``, constant within each prompt group. ``group_stats``: the step-wide
    statistics when the step is split (as in ``gvpo_loss_terms``)."""
    q, _, _ = gvpo_sample_losses(
        seq_logprobs, old_seq_logprobs, rewards, group_ids, beta, group_stats=group_stats
    )
    w = weights.detach().to(device=q.device, dtype=q.dtype).reshape(-1)
    labels = check_group_ids(domain_labels, q.numel(), "domain_labels").to(q.device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= w.numel()):
        raise ValueError(f"domain_labels must lie in [0, {w.numel()})")
    ids = group_ids.to(device=q.device, dtype=torch.int64)
    _, inverse, counts = group_index(ids)
    ng = counts.numel()
    lo = torch.full((ng,), w.numel(), dtype=torch.int64, device=q.device)
    hi = torch.full((ng,), -1, dtype=torch.int64, device=q.device)
    lo = lo.scatter_reduce(0, inverse, labels, reduce="amin")
    hi = hi.scatter_reduce(0, inverse, labels, reduce="amax")
    if bool((lo != hi).any()):
        raise ValueError("domain_labels must be constant within each prompt group (group_ids)")
    return (w[labels] * q).sum()
