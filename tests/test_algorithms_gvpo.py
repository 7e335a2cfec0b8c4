"""GVPO loss against float64 references written from the paper's formulas with plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gvpo.algorithms.gvpo import (
    gvpo_group_stats,
    gvpo_loss,
    gvpo_loss_terms,
    gvpo_sample_losses,
)

# ----------------------------------------------------------------------------- references


def _groups(ids: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(ids):
        out.setdefault(g, []).append(i)
    return out


def ref_loss_and_grad(s, s_old, rewards, ids, beta):
    """Python floats only: L and dL/ds_i = beta c_i / ((k-1) #groups)."""
    groups = _groups(ids)
    counted = [m for m in groups.values() if len(m) >= 2]
    n = len(s)
    grad = [0.0] * n
    if not counted:
        return 0.0, grad
    total = 0.0
    for members in counted:
        k = len(members)
        deltas = [beta * (s[i] - s_old[i]) for i in members]
        md = sum(deltas) / k
        mr = sum(rewards[i] for i in members) / k
        for j, i in enumerate(members):
            c = (deltas[j] - md) - (rewards[i] - mr)
            total += c * c / (2 * (k - 1))
            grad[i] = beta * c / ((k - 1) * len(counted))
    return total / len(counted), grad


def ref_loss_torch(s, s_old, rewards, ids, beta):
    """Differentiable float64 loop reference; mean of delta NOT detached."""
    groups = _groups(ids)
    counted = [m for m in groups.values() if len(m) >= 2]
    total = s.sum() * 0.0
    for members in counted:
        k = len(members)
        deltas = [beta * (s[i] - s_old[i]) for i in members]
        md = sum(deltas) / k
        mr = sum(float(rewards[i]) for i in members) / k
        for j, i in enumerate(members):
            c = (deltas[j] - md) - (float(rewards[i]) - mr)
            total = total + c * c / (2 * (k - 1))
    return total / max(len(counted), 1)


def make_batch(sizes, id_values, seed=0, equal_rewards=False, shuffle=True):
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for size, gid in zip(sizes, id_values, strict=True):
        ids += [gid] * size
    n = len(ids)
    ids_t = torch.tensor(ids, dtype=torch.int64)
    if shuffle:
        perm = torch.randperm(n, generator=gen)
        ids_t = ids_t[perm]
    s = (torch.randn(n, generator=gen, dtype=torch.float64) * 3 - 20).requires_grad_(True)
    s_old = s.detach() + torch.randn(n, generator=gen, dtype=torch.float64)
    if equal_rewards:
        rewards = torch.full((n,), 0.7, dtype=torch.float64)
    else:
        rewards = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) + 0.1 * torch.randn(
            n, generator=gen, dtype=torch.float64
        )
    return s, s_old, rewards, ids_t


CASES = [
    # sizes, ids, equal rewards
    ([4, 4, 4], [0, 1, 2], False),
    ([2, 5, 1, 3, 1, 8], [7, -3, 1000, 42, 5, -9], False),
    ([3, 1, 6], [1000, 7, -3], True),
    ([1, 1, 1], [3, 2, 1], False),
    ([2], [-5], False),
]


@pytest.mark.parametrize("sizes,ids,equal", CASES)
@pytest.mark.parametrize("beta", [0.1, 1.3])
def test_value_and_gradient_match_loop_reference(sizes, ids, equal, beta):
    s, s_old, r, gid = make_batch(sizes, ids, seed=len(sizes), equal_rewards=equal)
    loss = gvpo_loss(s, s_old, r, gid, beta)
    (grad,) = torch.autograd.grad(loss, s)

    ref_val, ref_grad = ref_loss_and_grad(
        s.tolist(), s_old.tolist(), r.tolist(), gid.tolist(), beta
    )
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(ref_val, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(
        grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-10, atol=1e-14
    )

    # independent autograd through the non-detached group mean gives the same gradient
    s2 = s.detach().clone().requires_grad_(True)
    ref_t = ref_loss_torch(s2, s_old, r, gid.tolist(), beta)
    (ref_t_grad,) = torch.autograd.grad(ref_t, s2, allow_unused=True)
    if ref_t_grad is None:
        ref_t_grad = torch.zeros_like(s2)
    torch.testing.assert_close(grad, ref_t_grad, rtol=1e-9, atol=1e-13)


def test_gradcheck_finite_differences():
    s, s_old, r, gid = make_batch([2, 5, 1, 3], [7, -3, 1000, 4], seed=3)
    assert torch.autograd.gradcheck(lambda x: gvpo_loss(x, s_old, r, gid, 0.3), (s,))


def test_equal_rewards_still_train_and_size_one_groups_do_not():
    s, s_old, r, gid = make_batch([4, 1], [9, 3], seed=5, equal_rewards=True, shuffle=False)
    loss = gvpo_loss(s, s_old, r, gid, 0.1)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() > 0  # delta-variance regulariser
    assert grad[:4].abs().sum() > 0
    assert grad[4].item() == 0.0


def test_no_counted_group_returns_connected_zero():
    s, s_old, r, gid = make_batch([1, 1, 1], [7, -3, 1000], seed=1)
    loss, diag = gvpo_loss_terms(s, s_old, r, gid, 0.1)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert diag["groups_counted"].item() == 0 and diag["groups_dropped"].item() == 3
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    e = gvpo_loss(empty, empty.detach(), empty.detach(), torch.zeros(0, dtype=torch.long), 0.1)
    assert e.item() == 0.0 and e.grad_fn is not None


def test_on_policy_gradient_is_reward_centred_only():
    # theta = theta': c_i = -(R_i - mean R), so dL/ds_i = -beta (R_i - mean R) / ((k-1) G)
    n = 6
    s = torch.linspace(-30, -10, n, dtype=torch.float64).requires_grad_(True)
    r = torch.tensor([1.0, 0, 0, 1, 1, 0], dtype=torch.float64)
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, diag = gvpo_loss_terms(s, s.detach(), r, gid, 0.5)
    loss.backward()
    expect = []
    for i in range(n):
        members = [j for j in range(n) if gid[j] == gid[i]]
        mr = sum(r[j].item() for j in members) / 3
        expect.append(-0.5 * (r[i].item() - mr) / (2 * 2))
    torch.testing.assert_close(s.grad, torch.tensor(expect, dtype=torch.float64))
    assert diag["reward_var_explained"].item() == pytest.approx(0.0, abs=1e-12)


def test_diagnostics_against_loops():
    sizes, ids = [2, 5, 1, 3, 1], [7, -3, 1000, 42, 5]
    s, s_old, r, gid = make_batch(sizes, ids, seed=11)
    beta = 0.4
    _, diag = gvpo_loss_terms(s, s_old, r, gid, beta)
    sl, so, rl, il = s.tolist(), s_old.tolist(), r.tolist(), gid.tolist()
    groups = _groups(il)
    deltas = [beta * (a - b) for a, b in zip(sl, so, strict=True)]
    cs, rc = [], []
    for members in groups.values():
        if len(members) < 2:
            continue
        md = sum(deltas[i] for i in members) / len(members)
        mr = sum(rl[i] for i in members) / len(members)
        for i in members:
            cs.append((deltas[i] - md) - (rl[i] - mr))
            rc.append(rl[i] - mr)

    def mean(x):
        return sum(x) / len(x)

    def pstd(x):
        m = mean(x)
        return math.sqrt(sum((v - m) ** 2 for v in x) / len(x))

    assert diag["delta_mean"].item() == pytest.approx(mean(deltas))
    assert diag["delta_std"].item() == pytest.approx(pstd(deltas))
    assert diag["c_mean"].item() == pytest.approx(0.0, abs=1e-12)
    assert diag["c_std"].item() == pytest.approx(pstd(cs))
    assert diag["groups_counted"].item() == 3
    assert diag["groups_dropped"].item() == 2
    assert diag["samples_counted"].item() == 10
    sc = sum(c * c for c in cs)
    sr = sum(v * v for v in rc)
    assert diag["sum_c_sq"].item() == pytest.approx(sc)
    assert diag["sum_centered_reward_sq"].item() == pytest.approx(sr)
    assert diag["reward_var_explained"].item() == pytest.approx(1 - sc / sr)
    for v in diag.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad


def test_variance_explained_zero_reward_variance_and_perfect_fit():
    s, s_old, r, gid = make_batch([3, 4], [1, 2], seed=2, equal_rewards=True)
    _, diag = gvpo_loss_terms(s, s_old, r, gid, 0.1)
    assert diag["sum_centered_reward_sq"].item() == 0.0
    assert diag["reward_var_explained"].item() == 0.0
    # delta = R exactly (up to a per-group constant): c = 0, fully explained
    gid = torch.tensor([0, 0, 0, 1, 1])
    r = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0], dtype=torch.float64)
    s_old = torch.full((5,), -10.0, dtype=torch.float64)
    s = (s_old + r / 0.1 + 3.0).requires_grad_(True)
    loss, diag = gvpo_loss_terms(s, s_old, r, gid, 0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-20)
    assert diag["reward_var_explained"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_api_equals_one_shot(seed):
    sizes, ids = [2, 5, 1, 3, 1, 8, 4], [7, -3, 1000, 42, 5, -9, 0]
    s, s_old, r, gid = make_batch(sizes, ids, seed=seed)
    beta = 0.25
    full = gvpo_loss(s, s_old, r, gid, beta)
    (full_grad,) = torch.autograd.grad(full, s)

    stats = gvpo_group_stats(s, s_old, r, gid, beta)  # "all-gathered", detached
    assert stats.num_counted == 5 and stats.num_dropped == 2
    gen = torch.Generator().manual_seed(100 + seed)
    perm = torch.randperm(s.numel(), generator=gen)
    cuts = sorted(torch.randperm(s.numel() - 1, generator=gen)[:2].add(1).tolist())
    chunks = torch.tensor_split(perm, cuts)
    assert len(chunks) == 3
    s_split = s.detach().clone().requires_grad_(True)
    total = 0.0
    for idx in chunks:
        loss, _ = gvpo_loss_terms(
            s_split[idx],
            s_old[idx],
            r[idx],
            gid[idx],
            beta,
            group_stats=stats,
            normalizer=stats.num_counted,
        )
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(s_split.grad, full_grad, rtol=1e-10, atol=1e-14)


def test_split_default_normalizer_is_stats_count():
    s, s_old, r, gid = make_batch([3, 2, 1], [5, 6, 7], seed=4)
    stats = gvpo_group_stats(s, s_old, r, gid, 0.1)
    a, _ = gvpo_loss_terms(s[:3], s_old[:3], r[:3], gid[:3], 0.1, group_stats=stats)
    b, _ = gvpo_loss_terms(s[:3], s_old[:3], r[:3], gid[:3], 0.1, group_stats=stats, normalizer=2)
    assert a.item() == b.item()


def test_sample_losses_sum_to_loss():
    s, s_old, r, gid = make_batch([3, 1, 4], [5, 6, 7], seed=6)
    q, c, counted = gvpo_sample_losses(s, s_old, r, gid, 0.2)
    assert counted.tolist() == [gid[i].item() != 6 for i in range(8)]
    assert (q.sum() / 2).item() == pytest.approx(gvpo_loss(s, s_old, r, gid, 0.2).item())
    assert c[~counted].abs().max().item() == 0.0


def test_low_precision_inputs_are_promoted():
    s, s_old, r, gid = make_batch([4, 4], [1, 2], seed=7)
    loss32 = gvpo_loss(s.detach().float(), s_old.float(), r.float(), gid, 0.1)
    loss64 = gvpo_loss(s, s_old, r, gid, 0.1)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-4)
    lb = gvpo_loss(s.detach().bfloat16().requires_grad_(), s_old.bfloat16(), r.bfloat16(), gid, 0.1)
    assert lb.dtype == torch.float32 and torch.isfinite(lb)


def test_invalid_inputs():
    s, s_old, r, gid = make_batch([2, 2], [1, 2], seed=0)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            gvpo_loss(s, s_old, r, gid, bad)
    with pytest.raises(ValueError, match="equal lengths"):
        gvpo_loss(s, s_old[:3], r, gid, 0.1)
    with pytest.raises(ValueError, match="equal lengths"):
        gvpo_loss(s, s_old, r[:2], gid, 0.1)
    with pytest.raises(ValueError, match="group_ids"):
        gvpo_loss(s, s_old, r, gid[:3], 0.1)
    with pytest.raises(ValueError, match="group_ids"):
        gvpo_loss(s, s_old, r, gid.float(), 0.1)
    with pytest.raises(ValueError, match="1-D"):
        gvpo_loss(s.detach().reshape(2, 2), s_old.reshape(2, 2), r, gid, 0.1)
    stats = gvpo_group_stats(s[:2], s_old[:2], r[:2], gid[:2], 0.1)
    with pytest.raises(ValueError, match="missing from group_stats"):
        gvpo_loss_terms(s, s_old, r, gid, 0.1, group_stats=stats)
    with pytest.raises(ValueError, match="normalizer"):
        gvpo_loss_terms(s, s_old, r, gid, 0.1, normalizer=-1)
