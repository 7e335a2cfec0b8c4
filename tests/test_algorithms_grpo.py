"""GRPO / Dr.GRPO / DAPO / GSPO and KL estimators against float64 loop references."""

from __future__ import annotations

import math

import pytest
import torch

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
from megatron_gvpo.algorithms.kl import kl_estimate, kl_k1, kl_k2, kl_k3

# ----------------------------------------------------------------------------- references


def ref_kl(lp, ref, kind):
    d = ref - lp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1 if isinstance(d, torch.Tensor) else math.exp(d) - d - 1


def ref_surrogate(lp, old, a, lo, hi):
    """-min(r A, clip(r) A) for 0-dim tensors, clip written out by hand."""
    r = torch.exp(lp - old)
    rc = r
    if r < 1 - lo:
        rc = r * 0 + (1 - lo)
    elif r > 1 + hi:
        rc = r * 0 + (1 + hi)
    u, c = r * a, rc * a
    return -(u if u <= c else c), bool(c < u)


def token_rows(mask):
    return [[t for t in range(mask.shape[1]) if mask[b, t]] for b in range(mask.shape[0])]


def ref_policy_loss(kind, lp, old, adv, mask, cfg, ref=None, max_len=None):
    """Loop reference for the four families; returns (loss, clip_fraction)."""
    lo, hi, beta, est = cfg.eps_low, cfg.eps_high, cfg.kl_beta, cfg.kl_estimator
    rows = token_rows(mask)
    seqs = [b for b in range(len(rows)) if rows[b]]
    n_tok = sum(len(r) for r in rows)
    total = lp.sum() * 0.0
    clipped = 0
    if kind == "gspo":
        for b in seqs:
            log_s = sum(lp[b, t] - old[b, t] for t in rows[b]) / len(rows[b])
            loss_b, cl = ref_surrogate(log_s, torch.zeros(()), float(adv[b]), lo, hi)
            clipped += cl
            if ref is not None and beta > 0:
                kl = sum(ref_kl(lp[b, t], ref[b, t], est) for t in rows[b]) / len(rows[b])
                loss_b = loss_b + beta * kl
            total = total + loss_b
        return total / len(seqs), clipped / len(seqs)
    per_seq = []
    for b in range(len(rows)):
        acc = lp.sum() * 0.0
        for t in rows[b]:
            a = float(adv[b]) if adv.dim() == 1 else float(adv[b, t])
            loss_t, cl = ref_surrogate(lp[b, t], old[b, t], a, lo, hi)
            clipped += cl
            if ref is not None and beta > 0:
                loss_t = loss_t + beta * ref_kl(lp[b, t], ref[b, t], est)
            acc = acc + loss_t
        per_seq.append(acc)
    if kind == "grpo":
        total = sum(per_seq[b] / len(rows[b]) for b in seqs) / len(seqs)
    elif kind == "dr_grpo":
        total = sum(per_seq) / (len(seqs) * max_len)
    elif kind == "dapo":
        total = sum(per_seq) / n_tok
    return total, clipped / n_tok


def make_tokens(b=5, t=7, seed=0, spread=0.4, empty_row=True):
    gen = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(b, t, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    old = lp.detach() + spread * torch.randn(b, t, generator=gen, dtype=torch.float64)
    ref = lp.detach() + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask[0, 0] = False  # a hole inside a response
    if empty_row:
        mask[-1] = False  # padding row: no response token
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    return lp, old, ref, mask, adv


LOSSES = {
    "grpo": (grpo_loss, GRPOConfig),
    "dr_grpo": (dr_grpo_loss, DrGRPOConfig),
    "dapo": (dapo_loss, DAPOConfig),
    "gspo": (gspo_loss, GSPOConfig),
}


def _config(kind, with_kl, **kw):
    cls = LOSSES[kind][1]
    if kind == "gspo":
        kw.setdefault("eps_low", 0.02)
        kw.setdefault("eps_high", 0.03)
    return cls(kl_beta=0.04 if with_kl else 0.0, **kw)


def _call(kind, lp, old, adv, mask, cfg, ref, **kw):
    return LOSSES[kind][0](lp, old, adv, mask, cfg, ref, **kw)


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_elementwise():
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 5, generator=gen, dtype=torch.float64) * 4
    ref = -torch.rand(4, 5, generator=gen, dtype=torch.float64) * 4
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        out = fn(lp, ref)
        assert torch.equal(out, kl_estimate(lp, ref, name))
        for i in range(4):
            for j in range(5):
                a, b = lp[i, j].item(), ref[i, j].item()
                assert out[i, j].item() == pytest.approx(ref_kl(a, b, name), rel=1e-12, abs=1e-15)
    assert (kl_k3(lp, ref) >= 0).all() and (kl_k2(lp, ref) >= 0).all()
    assert kl_k3(lp, lp).abs().max() == 0
    x = lp.clone().requires_grad_(True)
    for fn in (kl_k1, kl_k2, kl_k3):
        assert torch.autograd.gradcheck(lambda v, fn=fn: fn(v, ref), (x,))
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(lp, ref, "k4")
    with pytest.raises(ValueError, match="differ"):
        kl_k3(lp, ref[:, :3])


# ------------------------------------------------------------------------ advantages


def test_group_advantages_against_loops():
    ids = torch.tensor([7, -3, 1000, 7, -3, 7, 5, -3, 1000, 7])
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 3.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    for normalize in (True, False):
        out = group_advantages(r, ids, normalize_std=normalize, eps=1e-6)
        for i in range(len(r)):
            members = [j for j in range(len(r)) if ids[j] == ids[i]]
            k = len(members)
            m = sum(r[j].item() for j in members) / k
            if k == 1:
                expect = 0.0
            elif normalize:
                sd = math.sqrt(sum((r[j].item() - m) ** 2 for j in members) / (k - 1))
                expect = (r[i].item() - m) / (sd + 1e-6)
            else:
                expect = r[i].item() - m
            assert out[i].item() == pytest.approx(expect, rel=1e-12, abs=1e-12)
    # all-equal rewards: zero advantage, no nan
    assert group_advantages(torch.ones(4), torch.tensor([1, 1, 2, 2])).abs().max() == 0
    with pytest.raises(ValueError, match="eps"):
        group_advantages(r, ids, eps=-1.0)


def test_overlong_penalty_against_formula():
    max_len, cache = 20, 8
    lengths = torch.arange(0, 26)
    out = overlong_penalty(lengths, max_len, cache)
    for n, v in zip(lengths.tolist(), out.tolist(), strict=True):
        if n <= max_len - cache:
            expect = 0.0
        elif n <= max_len:
            expect = ((max_len - cache) - n) / cache
        else:
            expect = -1.0
        assert v == pytest.approx(expect)
    assert out[20].item() == pytest.approx(-1.0) and out[12].item() == 0.0
    hard = overlong_penalty(torch.tensor([5, 10, 11]), 10, 0)
    assert hard.tolist() == [0.0, 0.0, -1.0]
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, 10, 11)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, 10, -1)
    with pytest.raises(ValueError, match="max_len"):
        overlong_penalty(lengths, 0, 0)


# ---------------------------------------------------------------------------- losses


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "gspo"])
@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_value_gradient_and_clip_fraction(kind, with_kl, seed):
    lp, old, ref, mask, adv = make_tokens(seed=seed, spread=0.4 if kind != "gspo" else 0.15)
    cfg = _config(kind, with_kl, **({"max_response_len": 9} if kind == "dr_grpo" else {}))
    loss, diag = _call(kind, lp, old, adv, mask, cfg, ref if with_kl else None)
    (grad,) = torch.autograd.grad(loss, lp)

    lp2 = lp.detach().clone().requires_grad_(True)
    ref_loss, ref_clip = ref_policy_loss(
        kind, lp2, old, adv, mask, cfg, ref if with_kl else None, max_len=9
    )
    (ref_grad,) = torch.autograd.grad(ref_loss, lp2)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert diag["clip_fraction"].item() == pytest.approx(ref_clip)
    assert 0 < ref_clip < 1  # the data exercise both branches
    assert grad[~mask].abs().max() == 0
    if with_kl:
        rows = token_rows(mask)
        kls = [ref_kl(lp[b, t].item(), ref[b, t].item(), "k3") for b in range(5) for t in rows[b]]
        assert diag["kl_mean"].item() == pytest.approx(sum(kls) / len(kls))


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_gradcheck(kind):
    lp, old, ref, mask, adv = make_tokens(b=3, t=4, seed=5, spread=0.3)
    cfg = _config(kind, True)
    assert torch.autograd.gradcheck(
        lambda x: _call(kind, x, old, adv, mask, cfg, ref)[0], (lp,), atol=1e-7
    )


def test_token_level_advantages_and_ratio_diagnostics():
    lp, old, ref, mask, _ = make_tokens(seed=3)
    gen = torch.Generator().manual_seed(9)
    adv = torch.randn(lp.shape, generator=gen, dtype=torch.float64)
    cfg = GRPOConfig(kl_beta=0.0)
    loss, diag = grpo_loss(lp, old, adv, mask, cfg)
    ref_loss, _ = ref_policy_loss("grpo", lp, old, adv, mask, cfg)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    ratios = [
        math.exp(lp[b, t].item() - old[b, t].item())
        for b, row in enumerate(token_rows(mask))
        for t in row
    ]
    assert diag["ratio_mean"].item() == pytest.approx(sum(ratios) / len(ratios))
    assert diag["ratio_min"].item() == pytest.approx(min(ratios))
    assert diag["ratio_max"].item() == pytest.approx(max(ratios))
    assert diag["num_tokens"].item() == len(ratios)
    assert diag["num_sequences"].item() == 4
    assert "kl_mean" not in diag


def test_gspo_sequence_ratio_diagnostics():
    lp, old, _, mask, adv = make_tokens(seed=4, spread=0.1)
    _, diag = gspo_loss(lp, old, adv, mask, GSPOConfig())
    rows = token_rows(mask)
    ratios = [
        math.exp(sum(lp[b, t].item() - old[b, t].item() for t in rows[b]) / len(rows[b]))
        for b in range(len(rows))
        if rows[b]
    ]
    assert diag["ratio_mean"].item() == pytest.approx(sum(ratios) / len(ratios))
    assert diag["ratio_max"].item() == pytest.approx(max(ratios))
    with pytest.raises(ValueError, match="advantages"):
        gspo_loss(lp, old, torch.zeros_like(lp), mask)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_masked_garbage_is_ignored(kind):
    lp, old, ref, mask, adv = make_tokens(seed=6)
    cfg = _config(kind, True, **({"max_response_len": 7} if kind == "dr_grpo" else {}))
    clean, _ = _call(kind, lp, old, adv, mask, cfg, ref)
    (g_clean,) = torch.autograd.grad(clean, lp)
    dirty_lp = torch.where(mask, lp.detach(), torch.tensor(float("-inf"), dtype=torch.float64))
    dirty_lp.requires_grad_(True)
    dirty_old = torch.where(mask, old, torch.tensor(float("nan"), dtype=torch.float64))
    dirty_ref = torch.where(mask, ref, torch.tensor(float("inf"), dtype=torch.float64))
    dirty, _ = _call(kind, dirty_lp, dirty_old, adv, mask, cfg, dirty_ref)
    (g_dirty,) = torch.autograd.grad(dirty, dirty_lp)
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-14)
    torch.testing.assert_close(g_dirty, g_clean)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_split_with_global_normaliser_equals_full_batch(kind):
    lp, old, ref, mask, adv = make_tokens(b=9, t=6, seed=8)
    cfg = _config(kind, True, **({"max_response_len": 6} if kind == "dr_grpo" else {}))
    full, _ = _call(kind, lp, old, adv, mask, cfg, ref)
    (g_full,) = torch.autograd.grad(full, lp)
    norm_kw = (
        {"num_tokens": int(mask.sum())}
        if kind == "dapo"
        else {"num_sequences": int(mask.any(dim=1).sum())}
    )
    lp2 = lp.detach().clone().requires_grad_(True)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    total = 0.0
    for idx in torch.tensor_split(perm, [2, 6]):
        part, _ = _call(kind, lp2[idx], old[idx], adv[idx], mask[idx], cfg, ref[idx], **norm_kw)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(lp2.grad, g_full, rtol=1e-10, atol=1e-14)


def test_dr_grpo_default_max_len_is_width():
    lp, old, _, mask, adv = make_tokens(seed=2)
    a, _ = dr_grpo_loss(lp, old, adv, mask)
    b, _ = dr_grpo_loss(lp, old, adv, mask, DrGRPOConfig(max_response_len=lp.shape[1]))
    assert a.item() == b.item()


def test_all_masked_gives_connected_zero():
    lp, old, ref, mask, adv = make_tokens(seed=2)
    mask = torch.zeros_like(mask)
    for kind in LOSSES:
        loss, diag = _call(kind, lp, old, adv, mask, _config(kind, True), ref)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        assert diag["clip_fraction"].item() == 0.0


def test_config_validation_and_defaults():
    assert GRPOConfig().eps_high == 0.2 and GRPOConfig().kl_beta == 0.04
    assert GRPOConfig(eps_low=0.1).eps_high == 0.1
    d = DAPOConfig()
    assert (d.eps_low, d.eps_high, d.kl_beta) == (0.2, 0.28, 0.0)
    assert DrGRPOConfig().kl_beta == 0.0
    assert (GSPOConfig().eps_low, GSPOConfig().eps_high) == (3e-4, 4e-4)
    with pytest.raises(ValueError, match="eps_high"):
        DAPOConfig(eps_low=0.3, eps_high=0.2)
    with pytest.raises(ValueError, match="eps_high"):
        PolicyLossConfig(eps_high=-0.1)
    with pytest.raises(ValueError, match="eps_low"):
        GRPOConfig(eps_low=-0.1)
    with pytest.raises(ValueError, match="eps_low"):
        GRPOConfig(eps_low=1.0)
    with pytest.raises(ValueError, match="kl_beta"):
        GRPOConfig(kl_beta=-1.0)
    with pytest.raises(ValueError, match="kl_estimator"):
        GRPOConfig(kl_estimator="k9")
    with pytest.raises(ValueError, match="max_response_len"):
        DrGRPOConfig(max_response_len=0)
    lp, old, _, mask, adv = make_tokens(seed=0)
    for kind in LOSSES:
        with pytest.raises(ValueError, match="kl_beta") as err:
            _call(kind, lp, old, adv, mask, _config(kind, True), None)
        assert "ref_logprobs" in str(err.value)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, old, adv, mask)  # GRPO's default kl_beta is 0.04
    with pytest.raises(ValueError, match="old_logprobs"):
        grpo_loss(lp, old[:, :3], adv, mask, GRPOConfig(kl_beta=0))
    with pytest.raises(ValueError, match="num_sequences"):
        grpo_loss(lp, old, adv, mask, GRPOConfig(kl_beta=0), num_sequences=-1)
