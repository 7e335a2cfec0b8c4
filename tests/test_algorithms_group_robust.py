"""Group-Robust DPO/IPO and domain-robust GVPO against float64 loop references."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gvpo.algorithms.group_robust import (
    GroupRobustWeights,
    domain_robust_gvpo_loss,
    dpo_pair_loss,
    gr_dpo_loss,
    gr_ipo_loss,
    ipo_pair_loss,
    per_group_loss_sums,
    preference_margin,
)
from megatron_gvpo.algorithms.gvpo import gvpo_group_stats, gvpo_sample_losses

# ----------------------------------------------------------------------------- references


def ref_pair_loss(kind, h, beta):
    if kind == "dpo":
        return math.log1p(math.exp(-beta * h))  # -log sigmoid(beta h)
    return (h - 1 / (2 * beta)) ** 2


def ref_alpha_update(alpha, losses_by_group, eta):
    """alpha_g *= exp(eta N loss_g / N_g) for present g (loss_g = mean), then renormalise."""
    n = sum(len(v) for v in losses_by_group.values())
    new = list(alpha)
    for g, vals in losses_by_group.items():
        if vals:
            new[g] = new[g] * math.exp(eta * n * (sum(vals) / len(vals)) / len(vals))
    z = sum(new)
    return [a / z for a in new]


def make_pairs(n=11, num_groups=4, seed=0, labels=None):
    gen = torch.Generator().manual_seed(seed)
    pc = (-torch.rand(n, generator=gen, dtype=torch.float64) * 20).requires_grad_(True)
    pr = (-torch.rand(n, generator=gen, dtype=torch.float64) * 20).requires_grad_(True)
    rc = pc.detach() + torch.randn(n, generator=gen, dtype=torch.float64)
    rr = pr.detach() + torch.randn(n, generator=gen, dtype=torch.float64)
    if labels is None:
        labels = torch.randint(0, num_groups, (n,), generator=gen)
    return pc, pr, rc, rr, labels


def ref_gr_loss(kind, pc, pr, rc, rr, labels, alpha, beta, eta, num_groups):
    """Differentiable loop reference: update alpha (detached losses), then sum_g alpha_g loss_g."""
    by_group: dict[int, list[int]] = {g: [] for g in range(num_groups)}
    for i, g in enumerate(labels.tolist()):
        by_group[g].append(i)
    per_pair = []
    for i in range(len(labels)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if kind == "dpo":
            per_pair.append(torch.log1p(torch.exp(-beta * h)))
        else:
            per_pair.append((h - 1 / (2 * beta)) ** 2)
    losses = {g: [per_pair[i].item() for i in idx] for g, idx in by_group.items()}
    new_alpha = ref_alpha_update(alpha, losses, eta)
    total = pc.sum() * 0.0
    for g, idx in by_group.items():
        if idx:
            total = total + new_alpha[g] * sum(per_pair[i] for i in idx) / len(idx)
    worst = max(sum(v) / len(v) for v in losses.values() if v)
    return total, new_alpha, worst


# ---------------------------------------------------------------------------- tests


def test_pair_losses_against_formulas():
    h = torch.linspace(-30, 30, 13, dtype=torch.float64)
    for beta in (0.1, 2.0):
        d = dpo_pair_loss(h, beta)
        ipo = ipo_pair_loss(h, beta)
        for i, hv in enumerate(h.tolist()):
            assert d[i].item() == pytest.approx(ref_pair_loss("dpo", hv, beta), rel=1e-12)
            assert ipo[i].item() == pytest.approx(ref_pair_loss("ipo", hv, beta), rel=1e-12)
    assert torch.isfinite(dpo_pair_loss(torch.tensor([-1e4, 1e4]), 1.0)).all()
    with pytest.raises(ValueError, match="beta"):
        dpo_pair_loss(h, 0.0)
    with pytest.raises(ValueError, match="beta"):
        ipo_pair_loss(h, -1.0)
    pc, pr, rc, rr, _ = make_pairs()
    m = preference_margin(pc, pr, rc, rr)
    for i in range(len(m)):
        expect = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert m[i].item() == pytest.approx(expect, rel=1e-12)


def test_weights_update_against_loop_reference():
    w = GroupRobustWeights(4, eta_alpha=0.05)
    assert w.alpha.tolist() == [0.25] * 4
    alpha = [0.25] * 4
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        labels = torch.randint(0, 3, (9,), generator=gen)  # group 3 never appears
        losses = torch.rand(9, generator=gen, dtype=torch.float64) * (step + 1)
        sums, counts = per_group_loss_sums(losses, labels, 4)
        w.update(sums, counts)
        by_group = {g: [losses[i].item() for i in range(9) if labels[i] == g] for g in range(4)}
        alpha = ref_alpha_update(alpha, by_group, 0.05)
        torch.testing.assert_close(w.alpha, torch.tensor(alpha, dtype=torch.float64))
    assert w.alpha.sum().item() == pytest.approx(1.0)
    # absent group 3 kept its weight before renormalisation: it only shrinks by the normaliser
    assert w.alpha[3].item() < 0.25


def test_weights_huge_steps_do_not_overflow():
    w = GroupRobustWeights(2, eta_alpha=10.0)
    w.update(torch.tensor([1e4, 0.0]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(w.alpha).all() and w.alpha[0].item() == pytest.approx(1.0)


def test_weights_state_dict_roundtrip_and_validation():
    w = GroupRobustWeights(3, eta_alpha=0.1)
    w.update(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([2.0, 1.0, 1.0]))
    state = w.state_dict()
    w2 = GroupRobustWeights(3, eta_alpha=0.1)
    w2.load_state_dict(state)
    assert torch.equal(w2.alpha, w.alpha)
    state["alpha"][0] += 1.0  # a copy: the object is unchanged
    assert not torch.equal(state["alpha"], w.alpha)
    with pytest.raises(ValueError, match="simplex"):
        w2.load_state_dict(state)
    with pytest.raises(ValueError, match="entries"):
        GroupRobustWeights(4, 0.1).load_state_dict(w.state_dict())
    with pytest.raises(ValueError, match="num_groups"):
        GroupRobustWeights(0, 0.1)
    with pytest.raises(ValueError, match="eta_alpha"):
        GroupRobustWeights(2, -0.1)


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gr_loss_value_gradient_and_metrics(kind, seed):
    fn = gr_dpo_loss if kind == "dpo" else gr_ipo_loss
    beta, eta, ng = 0.3, 0.02, 5  # group 4 absent
    pc, pr, rc, rr, labels = make_pairs(seed=seed, num_groups=4)
    w = GroupRobustWeights(ng, eta)
    w.update(torch.tensor([0.3, 0.1, 0.0, 0.2, 0.5]), torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0]))
    alpha0 = w.alpha.tolist()
    loss, metrics = fn(pc, pr, rc, rr, labels, w, beta)
    g_pc, g_pr = torch.autograd.grad(loss, (pc, pr))

    pc2 = pc.detach().clone().requires_grad_(True)
    pr2 = pr.detach().clone().requires_grad_(True)
    ref_loss, ref_alpha, worst = ref_gr_loss(kind, pc2, pr2, rc, rr, labels, alpha0, beta, eta, ng)
    r_pc, r_pr = torch.autograd.grad(ref_loss, (pc2, pr2))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    torch.testing.assert_close(g_pc, r_pc, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_pr, r_pr, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(w.alpha, torch.tensor(ref_alpha, dtype=torch.float64))
    assert metrics["worst_group_loss"].item() == pytest.approx(worst)
    for g in range(ng):
        assert metrics[f"alpha/{g}"].item() == pytest.approx(ref_alpha[g])
    assert "group_loss/4" not in metrics


def test_gr_gradcheck():
    pc, pr, rc, rr, labels = make_pairs(n=6, seed=3)
    w = GroupRobustWeights(4, 0.1)
    for fn in (gr_dpo_loss, gr_ipo_loss):
        assert torch.autograd.gradcheck(
            lambda a, b, fn=fn: fn(a, b, rc, rr, labels, w, 0.2, update_weights=False)[0],
            (pc, pr),
        )


def test_gr_split_with_global_stats_equals_one_shot():
    beta, eta, ng = 0.2, 0.05, 4
    pc, pr, rc, rr, labels = make_pairs(n=14, seed=4)
    w_full = GroupRobustWeights(ng, eta)
    full, _ = gr_dpo_loss(pc, pr, rc, rr, labels, w_full, beta)
    g_full = torch.autograd.grad(full, (pc, pr))

    chunks = torch.tensor_split(torch.randperm(14, generator=torch.Generator().manual_seed(0)), 3)
    # "all-reduce": global detached per-group sums and counts
    sums = torch.zeros(ng, dtype=torch.float64)
    counts = torch.zeros(ng, dtype=torch.float64)
    for idx in chunks:
        h = preference_margin(pc[idx], pr[idx], rc[idx], rr[idx])
        s, c = per_group_loss_sums(dpo_pair_loss(h, beta).detach(), labels[idx], ng)
        sums += s
        counts += c
    w = GroupRobustWeights(ng, eta)
    pc2 = pc.detach().clone().requires_grad_(True)
    pr2 = pr.detach().clone().requires_grad_(True)
    total = 0.0
    for j, idx in enumerate(chunks):
        part, _ = gr_dpo_loss(
            pc2[idx],
            pr2[idx],
            rc[idx],
            rr[idx],
            labels[idx],
            w,
            beta,
            update_weights=(j == 0),
            group_loss_sums=sums,
            group_counts=counts,
        )
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(w.alpha, w_full.alpha)
    torch.testing.assert_close(pc2.grad, g_full[0])
    torch.testing.assert_close(pr2.grad, g_full[1])


def test_gr_label_errors():
    pc, pr, rc, rr, labels = make_pairs()
    w = GroupRobustWeights(4, 0.1)
    with pytest.raises(ValueError, match="group_labels"):
        gr_dpo_loss(pc, pr, rc, rr, None, w)
    with pytest.raises(ValueError, match="group_labels"):
        gr_ipo_loss(pc, pr, rc, rr, labels + 4, w)
    with pytest.raises(ValueError, match="group_labels"):
        gr_dpo_loss(pc, pr, rc, rr, labels[:3], w)
    with pytest.raises(ValueError, match="group_counts"):
        gr_dpo_loss(pc, pr, rc, rr, labels, w, group_loss_sums=torch.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        gr_dpo_loss(pc, pr, rc, rr, labels, w, beta=0)


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


def ref_domain_gvpo(s, s_old, r, ids, doms, beta, alpha, eta, nd):
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(ids.tolist()):
        groups.setdefault(g, []).append(i)
    terms = {d: [] for d in range(nd)}  # per-domain list of group terms (k >= 2)
    for members in groups.values():
        k = len(members)
        if k < 2:
            continue
        dom = int(doms[members[0]])
        deltas = [beta * (s[i] - s_old[i]) for i in members]
        md = sum(deltas) / k
        mr = sum(r[i].item() for i in members) / k
        term = sum(((deltas[j] - md) - (r[i].item() - mr)) ** 2 for j, i in enumerate(members))
        terms[dom].append(term / (2 * (k - 1)))
    n = sum(len(v) for v in terms.values())
    new = list(alpha)
    for d, v in terms.items():
        if v:
            new[d] *= math.exp(eta * n * (sum(t.item() for t in v) / len(v)) / len(v))
    z = sum(new)
    new = [a / z for a in new]
    total = s.sum() * 0.0
    for d, v in terms.items():
        if v:
            total = total + new[d] * sum(v) / len(v)
    return total, new


def test_domain_robust_gvpo_against_loops():
    beta, eta, nd = 0.2, 0.3, 4  # domain 3 absent
    s, s_old, r, ids, doms = gvpo_batch(seed=1)
    w = GroupRobustWeights(nd, eta)
    loss, metrics = domain_robust_gvpo_loss(s, s_old, r, ids, doms, w, beta)
    (grad,) = torch.autograd.grad(loss, s)
    s2 = s.detach().clone().requires_grad_(True)
    ref, ref_alpha = ref_domain_gvpo(s2, s_old, r, ids, doms, beta, [0.25] * 4, eta, nd)
    (ref_grad,) = torch.autograd.grad(ref, s2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(w.alpha, torch.tensor(ref_alpha, dtype=torch.float64))
    assert metrics["alpha/3"].item() == pytest.approx(ref_alpha[3])
    assert "group_loss/3" not in metrics
    assert metrics["worst_group_loss"].item() == pytest.approx(
        max(metrics[f"group_loss/{d}"].item() for d in range(3))
    )


def test_domain_robust_gvpo_split_equals_one_shot():
    beta, eta, nd = 0.2, 0.3, 3
    s, s_old, r, ids, doms = gvpo_batch(seed=2)
    w_full = GroupRobustWeights(nd, eta)
    full, _ = domain_robust_gvpo_loss(s, s_old, r, ids, doms, w_full, beta)
    (g_full,) = torch.autograd.grad(full, s)

    stats = gvpo_group_stats(s, s_old, r, ids, beta)
    q, _, _ = gvpo_sample_losses(s, s_old, r, ids, beta, group_stats=stats)
    dom_sums = torch.zeros(nd, dtype=torch.float64).index_add(0, doms, q.detach())
    # counted groups per domain over the whole batch
    dom_counts = torch.zeros(nd, dtype=torch.float64)
    for gid, k in zip(stats.group_ids.tolist(), stats.size.tolist(), strict=True):
        if k >= 2:
            dom_counts[int(doms[ids == gid][0])] += 1
    w = GroupRobustWeights(nd, eta)
    s2 = s.detach().clone().requires_grad_(True)
    chunks = torch.tensor_split(
        torch.randperm(len(ids), generator=torch.Generator().manual_seed(3)), 3
    )
    total = 0.0
    for j, idx in enumerate(chunks):
        part, _ = domain_robust_gvpo_loss(
            s2[idx],
            s_old[idx],
            r[idx],
            ids[idx],
            doms[idx],
            w,
            beta,
            update_weights=(j == 0),
            group_stats=stats,
            domain_loss_sums=dom_sums,
            domain_counts=dom_counts,
        )
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(w.alpha, w_full.alpha)
    torch.testing.assert_close(s2.grad, g_full, rtol=1e-10, atol=1e-14)


def test_domain_robust_gvpo_errors():
    s, s_old, r, ids, doms = gvpo_batch()
    w = GroupRobustWeights(3, 0.1)
    with pytest.raises(ValueError, match="domain_labels"):
        domain_robust_gvpo_loss(s, s_old, r, ids, None, w, 0.1)
    bad = doms.clone()
    bad[ids == 7] = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="constant within each prompt group"):
        domain_robust_gvpo_loss(s, s_old, r, ids, bad, w, 0.1)
    with pytest.raises(ValueError, match="beta"):
        domain_robust_gvpo_loss(s, s_old, r, ids, doms, w, 0.0)
