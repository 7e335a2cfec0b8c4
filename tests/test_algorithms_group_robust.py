"""Group-Robust weights, estimators and domain-robust GVPO against float64 references and Monte
Carlo (``algorithms/group_robust.py``'s formulas, written out independently here)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gvpo.algorithms.group_robust import (
    GroupRobustWeights,
    domain_estimates,
    domain_robust_gvpo_loss,
    dpo_pair_loss,
    ipo_pair_loss,
    unit_weights,
)
from megatron_gvpo.algorithms.gvpo import gvpo_group_stats

# ----------------------------------------------------------------------------- references


def ref_update(alpha, estimates, present, eta):
    """alpha_d *= exp(eta m_d) over present domains, renormalised to the mass they held."""
    idx = [d for d in range(len(alpha)) if present[d]]
    mass = sum(alpha[d] for d in idx)
    moved = {d: alpha[d] * math.exp(eta * estimates[d]) for d in idx}
    z = sum(moved.values())
    return [moved[d] / z * mass if d in moved else alpha[d] for d in range(len(alpha))]


def ref_estimates(estimator, losses_by_domain, data_counts):
    """(m, present, w-factor per domain) from a step's unit losses grouped by domain."""
    b = sum(len(v) for v in losses_by_domain)
    n = sum(data_counts) if data_counts else 0
    m, present = [], []
    for d, vals in enumerate(losses_by_domain):
        if estimator == "stratified":
            present.append(bool(vals))
            m.append(sum(vals) / len(vals) if vals else 0.0)
        else:
            present.append(True)
            m.append(n * sum(vals) / (data_counts[d] * b))
    return m, present


def ref_unit_weight(estimator, alpha, counts, data_counts):
    b = sum(counts)
    if estimator == "stratified":
        return [a / c if c else 0.0 for a, c in zip(alpha, counts, strict=True)]
    n = sum(data_counts)
    return [a * n / (nd * b) for a, nd in zip(alpha, data_counts, strict=True)]


# ---------------------------------------------------------------------------- pair losses


def test_pair_losses_against_formulas():
    h = torch.linspace(-30, 30, 13, dtype=torch.float64)
    for beta in (0.1, 2.0):
        want = torch.tensor([math.log1p(math.exp(-beta * x)) for x in h.tolist()])
        torch.testing.assert_close(dpo_pair_loss(h, beta), want.double())
        want = torch.tensor([(x - 1 / (2 * beta)) ** 2 for x in h.tolist()])
        torch.testing.assert_close(ipo_pair_loss(h, beta), want.double())
    with pytest.raises(ValueError, match="beta"):
        dpo_pair_loss(h, 0.0)


# ---------------------------------------------------------------------------- alpha rule


def test_update_moves_only_present_domains():
    w = GroupRobustWeights(4, eta_alpha=0.7)
    alpha = [0.25] * 4
    steps = [
        ([0.3, 1.2, 0.0, 0.5], [True, True, False, True]),
        ([2.0, 0.1, 0.4, 0.0], [True, False, True, False]),
        ([0.2, 0.2, 0.9, 0.3], [True, True, True, True]),
    ]
    for m, present in steps:
        before = w.alpha.clone()
        got = w.update(torch.tensor(m), torch.tensor(present))
        alpha = ref_update(alpha, m, present, 0.7)
        torch.testing.assert_close(got, torch.tensor(alpha, dtype=torch.float64))
        for d, p in enumerate(present):
            if not p:  # an absent domain keeps its weight exactly
                assert got[d].item() == before[d].item()
    assert w.alpha.sum().item() == pytest.approx(1.0, abs=1e-15)
    # nothing present: nothing moves
    before = w.alpha.clone()
    assert torch.equal(w.update(torch.ones(4), torch.zeros(4, dtype=torch.bool)), before)


def test_weights_huge_steps_do_not_overflow():
    w = GroupRobustWeights(2, eta_alpha=10.0)
    w.update(torch.tensor([1e4, 0.0]))
    assert torch.isfinite(w.alpha).all() and w.alpha[0].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="finite"):
        w.update(torch.tensor([float("nan"), 0.0]))


def test_weights_state_dict_roundtrip_and_validation():
    w = GroupRobustWeights(3, 0.1)
    w.update(torch.tensor([1.0, 2.0, 0.5]))
    w2 = GroupRobustWeights(3, 0.1)
    w2.load_state_dict(w.state_dict())
    assert torch.equal(w2.alpha, w.alpha)
    with pytest.raises(ValueError, match="entries"):
        GroupRobustWeights(4, 0.1).load_state_dict(w.state_dict())
    with pytest.raises(ValueError, match="simplex"):
        w2.load_state_dict({"alpha": [0.5, 0.6, 0.1]})
    with pytest.raises(ValueError, match="num_domains"):
        GroupRobustWeights(0, 0.1)
    with pytest.raises(ValueError, match="eta_alpha"):
        GroupRobustWeights(2, -0.1)


# ------------------------------------------------------------------------------ estimators


@pytest.mark.parametrize("estimator", ["stratified", "importance"])
def test_estimates_and_unit_weights_against_definitions(estimator):
    data_counts = [900, 90, 10]
    losses = [[0.5, 0.7, 0.2], [], [1.5]]  # domain 1 absent from the step
    counts = torch.tensor([3.0, 0.0, 1.0])
    sums = torch.tensor([sum(v) for v in losses], dtype=torch.float64)
    m, present = domain_estimates(estimator, sums, counts, torch.tensor(data_counts))
    want_m, want_present = ref_estimates(estimator, losses, data_counts)
    torch.testing.assert_close(m, torch.tensor(want_m, dtype=torch.float64))
    assert present.tolist() == want_present
    alpha = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    w = unit_weights(estimator, alpha, counts, torch.tensor(data_counts))
    want = ref_unit_weight(estimator, alpha.tolist(), counts.tolist(), data_counts)
    torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match="not one of"):
        domain_estimates("mean", sums, counts)
    if estimator == "importance":
        with pytest.raises(ValueError, match="dataset"):
            unit_weights(estimator, alpha, counts, None)


def _simulate(estimator, p_min, b, trials, eta, means, sds, seed=0):
    """``trials`` one-step alpha updates from uniform alpha on two domains (0: minority, share
    p_min; 1: majority), unit losses ~ Normal(means[d], sds[d]). Steps are stratified (b/2 units
    per domain) or i.i.d. draws in the dataset's proportions (importance). Returns the change of
    log(alpha_0 / alpha_1) and the step's objective value (at the updated alpha) per trial."""
    gen = torch.Generator().manual_seed(seed)
    data_counts = torch.tensor([p_min * 1e4, (1 - p_min) * 1e4], dtype=torch.float64)
    dlogodds, values = [], []
    for _ in range(trials):
        if estimator == "stratified":
            doms = torch.tensor([0] * (b // 2) + [1] * (b // 2))
        else:
            doms = (torch.rand(b, generator=gen, dtype=torch.float64) >= p_min).long()
        mu = torch.tensor(means, dtype=torch.float64)[doms]
        sd = torch.tensor(sds, dtype=torch.float64)[doms]
        losses = mu + sd * torch.randn(b, generator=gen, dtype=torch.float64)
        sums = torch.zeros(2, dtype=torch.float64).index_add_(0, doms, losses)
        counts = torch.bincount(doms, minlength=2).double()
        w = GroupRobustWeights(2, eta)
        w.update(*domain_estimates(estimator, sums, counts, data_counts))
        dlogodds.append(math.log(w.alpha[0] / w.alpha[1]))
        # the objective at fixed uniform alpha (the variance formulas' alpha)
        uw = unit_weights(estimator, torch.tensor([0.5, 0.5]), counts, data_counts)
        values.append(float((uw[doms] * losses).sum()))
    return torch.tensor(dlogodds), torch.tensor(values)


@pytest.mark.parametrize("estimator", ["stratified", "importance"])
def test_alpha_update_and_objective_moments_by_monte_carlo(estimator):
    """The expectation (and variance) of one alpha step and of the step's objective, by Monte
    Carlo against the closed forms of ``algorithms/group_robust.py``'s docstring, at a 10%
    minority with a step of B = 16 units (the minority absent from ~18% of importance steps)."""
    p, b, eta, trials = 0.1, 16, 0.5, 4000
    means, sds = (0.9, 0.6), (0.3, 0.2)
    dlo, val = _simulate(estimator, p, b, trials, eta, means, sds)
    # E[change of log-odds] = eta (L_0 - L_1), both estimators
    mean_want = eta * (means[0] - means[1])
    shares = (p, 1 - p)
    if estimator == "stratified":
        var_m = [sds[d] ** 2 / (b / 2) for d in range(2)]
        var_lo = eta**2 * (var_m[0] + var_m[1])
        var_obj = sum(0.25 * sds[d] ** 2 / (b / 2) for d in range(2))
    else:
        second = [sds[d] ** 2 + means[d] ** 2 for d in range(2)]
        var_m = [(second[d] / shares[d] - means[d] ** 2) / b for d in range(2)]
        cov = -means[0] * means[1] / b  # two domains of one multinomial draw
        var_lo = eta**2 * (var_m[0] + var_m[1] - 2 * cov)
        j = 0.5 * (means[0] + means[1])
        var_obj = (sum(0.25 * second[d] / shares[d] for d in range(2)) - j**2) / b
    se = math.sqrt(var_lo / trials)
    assert abs(dlo.mean().item() - mean_want) < 4 * se, (dlo.mean().item(), mean_want, se)
    assert dlo.var().item() == pytest.approx(var_lo, rel=0.12)
    assert val.mean().item() == pytest.approx(0.5 * sum(means), abs=4 * math.sqrt(var_obj / trials))
    assert val.var().item() == pytest.approx(var_obj, rel=0.12)


def test_importance_variance_exceeds_stratified_as_the_docstring_says():
    """The docstring's numbers: at sigma = 0 (a DPO start, every loss log 2), B = 16, the
    minority's importance estimate has sd 0.52 (10%) / 1.72 (1%); the stratified one is exact."""
    big_l = math.log(2)
    for p, sd_want in ((0.1, 0.52), (0.01, 1.72)):
        sd = math.sqrt((big_l**2 / p - big_l**2) / 16)
        assert sd == pytest.approx(sd_want, abs=0.005)
    _, val_b = _simulate("stratified", 0.1, 16, 200, 0.1, (big_l, big_l), (0.0, 0.0))
    assert val_b.std().item() < 1e-12


# ------------------------------------------------------------------- domain-robust GVPO


def gvpo_batch(seed=0):
    # (group id, domain, size): groups of size 1 included; ids arbitrary
    spec = [(7, 0, 3), (-3, 1, 4), (1000, 0, 1), (42, 2, 2), (5, 1, 5), (-9, 0, 2), (11, 2, 1)]
    ids, doms = [], []
    for gid, dom, k in spec:
        ids += [gid] * k
        doms += [dom] * k
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ids), generator=gen)
    ids_t = torch.tensor(ids)[perm]
    dom_t = torch.tensor(doms)[perm]
    n = len(ids)
    s = (torch.randn(n, generator=gen, dtype=torch.float64) - 15).requires_grad_(True)
    s_old = s.detach() + torch.randn(n, generator=gen, dtype=torch.float64)
    r = torch.randint(0, 2, (n,), generator=gen).to(torch.float64)
    return s, s_old, r, ids_t, dom_t


def ref_domain_terms(s, s_old, r, ids, doms, beta, nd):
    """Per domain, the GVPO terms sum_i c_i^2 / (2 (k - 1)) of its groups with k >= 2."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(ids.tolist()):
        groups.setdefault(g, []).append(i)
    terms = {d: [] for d in range(nd)}
    for members in groups.values():
        k = len(members)
        if k < 2:
            continue
        deltas = [beta * (s[i] - s_old[i]) for i in members]
        md = sum(deltas) / k
        mr = sum(r[i].item() for i in members) / k
        term = sum(((deltas[j] - md) - (r[i].item() - mr)) ** 2 for j, i in enumerate(members))
        terms[int(doms[members[0]])].append(term / (2 * (k - 1)))
    return terms


@pytest.mark.parametrize("estimator", ["stratified", "importance"])
def test_domain_robust_gvpo_against_loops(estimator):
    beta, nd = 0.2, 4  # domain 3 absent
    s, s_old, r, ids, doms = gvpo_batch(seed=1)
    data_counts = [50, 30, 15, 5]
    terms = ref_domain_terms(s, s_old, r, ids, doms, beta, nd)
    counts = [len(terms[d]) for d in range(nd)]
    alpha = [0.1, 0.2, 0.3, 0.4]
    w = torch.tensor(ref_unit_weight(estimator, alpha, counts, data_counts), dtype=torch.float64)
    loss = domain_robust_gvpo_loss(s, s_old, r, ids, doms, w, beta)
    (grad,) = torch.autograd.grad(loss, s)
    s2 = s.detach().clone().requires_grad_(True)
    terms2 = ref_domain_terms(s2, s_old, r, ids, doms, beta, nd)
    want = sum(float(w[d]) * t for d in range(nd) for t in terms2[d])
    (want_grad,) = torch.autograd.grad(want, s2)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


def test_domain_robust_gvpo_split_equals_one_shot():
    beta = 0.2
    s, s_old, r, ids, doms = gvpo_batch(seed=2)
    w = torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)
    full = domain_robust_gvpo_loss(s, s_old, r, ids, doms, w, beta)
    (g_full,) = torch.autograd.grad(full, s)
    stats = gvpo_group_stats(s, s_old, r, ids, beta)
    s2 = s.detach().clone().requires_grad_(True)
    chunks = torch.tensor_split(
        torch.randperm(len(ids), generator=torch.Generator().manual_seed(3)), 3
    )
    total = 0.0
    for idx in chunks:
        part = domain_robust_gvpo_loss(
            s2[idx], s_old[idx], r[idx], ids[idx], doms[idx], w, beta, group_stats=stats
        )
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(s2.grad, g_full, rtol=1e-10, atol=1e-14)


def test_domain_robust_gvpo_errors():
    s, s_old, r, ids, doms = gvpo_batch()
    w = torch.full((3,), 0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"domain_labels must lie in \[0, 3\)"):
        domain_robust_gvpo_loss(s, s_old, r, ids, doms + 1, w, 0.1)
    bad = doms.clone()
    bad[ids == 7] = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="constant within each prompt group"):
        domain_robust_gvpo_loss(s, s_old, r, ids, bad, w, 0.1)
    with pytest.raises(ValueError, match="beta"):
        domain_robust_gvpo_loss(s, s_old, r, ids, doms, w, 0.0)
