"""One optimizer step's gradients are the same whatever the parallel layout, and are the right ones.

The worker (``dist_workers/loss_layout_worker.py``) runs the real training path (megatron DDP,
packed micro-batches, the registered objectives of ``trainer/objectives/``) for GVPO, GRPO (with k3 KL), DAPO and domain-robust
GVPO on one synthetic step
batch with variable group sizes (a singleton, an all-equal-reward group), and DPO, IPO, GR-DPO and
GR-IPO on a batch of preference pairs in two groups. References:

- layout invariance: (TP, PP, DP) = (2,1,2), (1,2,2), (2,2,1) with several micro-batches against
  (1,1,1) with one micro-batch, within 1e-5 relative per tensor;
- correctness: the (1,1,1) gradients against transformers autograd through GVPO, GRPO and the
  preference losses (GR-*: the alpha step and the N alpha_g / N_g weights) written here in float64
  from the papers' formulas, one sequence at a time (no packing);
- a control: dropping the step-wide group means when groups are split must change the gradient.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_torchrun
from safetensors import safe_open
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "dist_workers" / "loss_layout_worker.py"
# (tp, pp, world size, worker args): budgets force several micro-batches; "--split" lets groups
# span micro-batches and DP ranks, so the step-wide group statistics path is exercised.
LAYOUTS = {
    "tp1_pp1_dp1": (1, 1, 1, ["--budget", "4096"]),
    "tp2_pp1_dp2": (2, 1, 4, ["--budget", "64"]),
    "tp1_pp2_dp2": (1, 2, 4, ["--budget", "48", "--split"]),
    "tp2_pp2_dp1": (2, 2, 4, ["--budget", "40", "--split"]),
}
LOSSES = ("gvpo", "grpo", "dapo", "gr_gvpo", "dpo", "ipo", "gr_dpo", "gr_ipo", "gvpo_masked",
          "grpo_masked")


def _worker_module():
    spec = importlib.util.spec_from_file_location("loss_layout_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def layout_grads(tiny_models, tmp_path_factory):
    """Gradients (HF names) and placement info of every layout."""
    out_dir = tmp_path_factory.mktemp("layout")
    results = {}
    for name, (tp, pp, world, extra) in LAYOUTS.items():
        out = out_dir / f"{name}.safetensors"
        losses = ",".join(LOSSES + (("gvpo_nostats",) if "--split" in extra else ()))
        args = ["--hf-dir", str(tiny_models["qwen2"]), "--tp", str(tp), "--pp", str(pp)]
        run_torchrun(WORKER, world, *args, *extra, "--losses", losses, "--out", str(out))
        with safe_open(str(out), "pt") as f:
            info = {k: json.loads(v) for k, v in f.metadata().items()}
        results[name] = (load_file(str(out)), info)
    return results


def _rel_errors(got: dict, want: dict, prefix: str) -> dict[str, float]:
    keys = [k for k in want if k.startswith(prefix + "/")]
    assert keys and all(k in got for k in keys)
    return {k: ((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)).item() for k in keys}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "tp1_pp1_dp1"])
def test_step_gradient_is_layout_invariant(layout_grads, layout):
    ref, ref_info = layout_grads["tp1_pp1_dp1"]
    got, info = layout_grads[layout]
    assert ref_info["gvpo"]["micro_batches"] == 1
    assert info["gvpo"]["micro_batches"] > 1  # several micro-batches on this rank
    if "--split" in LAYOUTS[layout][3]:
        assert info["gvpo"]["groups_whole"] is False
        assert info["gr_dpo"]["groups_whole"] is False  # pairs split: the step-wide h path
    for loss in LOSSES:
        errs = _rel_errors(got, ref, loss)
        worst = max(errs, key=errs.get)
        assert errs[worst] < 1e-5, f"{layout} {loss}: {worst} rel err {errs[worst]:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_clipped_grad_norm_is_the_norm_of_the_full_gradient(layout_grads, layout):
    """The norm megatron's optimizer clips by equals the norm of the gathered HF gradients of the
    TP1xPP1xDP1 run (at TP2 it once counted only TP rank 0's shards: sharded weights built
    without random init lacked megatron's tensor-parallel attributes)."""
    ref, _ = layout_grads["tp1_pp1_dp1"]
    _, info = layout_grads[layout]
    for loss in LOSSES:
        want = torch.sqrt(sum(v.double().square().sum() for k, v in ref.items() if k.startswith(loss + "/")))
        got = info[loss]["grad_norm"]
        assert abs(got - want.item()) <= 1e-5 * want.item(), (layout, loss, got, want.item())


@pytest.mark.slow
def test_split_groups_need_step_wide_group_means(layout_grads):
    """Control: per-micro-batch group means (the shortcut valid only for whole groups) are wrong."""
    ref, _ = layout_grads["tp1_pp1_dp1"]
    got, _ = layout_grads["tp1_pp2_dp2"]
    ref_nostats = {k.replace("gvpo/", "gvpo_nostats/"): v for k, v in ref.items()}
    errs = _rel_errors(got, ref_nostats, "gvpo_nostats")
    assert max(errs.values()) > 1e-2


# ------------------------------------------------------------------ independent float64 reference


def _gvpo_reference(s, old, rewards, gids, beta):
    """L = mean over groups with k >= 2 of sum_i c_i^2 / (2 (k - 1)) (DESIGN, "GVPO, exactly")."""
    total, counted = 0.0, 0
    for g in sorted(set(gids)):
        idx = [i for i, x in enumerate(gids) if x == g]
        k = len(idx)
        if k < 2:
            continue
        delta = [beta * (s[i] - old[i]) for i in idx]
        r = [rewards[i] for i in idx]
        md, mr = sum(delta) / k, sum(r) / k
        total = total + sum(((d - md) - (ri - mr)) ** 2 for d, ri in zip(delta, r, strict=True)) / (
            2 * (k - 1)
        )
        counted += 1
    return total / counted


def _grpo_reference(lps, olds, refs, rewards, gids, eps=0.2, kl_beta=0.04, std_eps=1e-6):
    """DeepSeekMath GRPO: clipped token ratio, (R - mean)/(std + eps), per-sequence token mean,
    k3 KL to the reference, batch mean over sequences."""
    total = 0.0
    for i in range(len(lps)):
        grp = [rewards[j] for j in range(len(gids)) if gids[j] == gids[i]]
        k = len(grp)
        if k >= 2:
            mean = sum(grp) / k
            std = (sum((x - mean) ** 2 for x in grp) / (k - 1)) ** 0.5
            adv = (rewards[i] - mean) / (std + std_eps)
        else:
            adv = 0.0
        per_tok = 0.0
        for lp, old, ref in zip(lps[i], olds[i], refs[i], strict=True):
            ratio = torch.exp(lp - old)
            surr = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
            d = ref - lp
            per_tok = per_tok - surr + kl_beta * (torch.exp(d) - d - 1)
        total = total + per_tok / len(lps[i])
    return total / len(lps)


def _preference_reference(s, ref, signs, pair_ids, groups, loss, beta, sizes, eta, estimator):
    """DPO -log sigmoid(beta h) or IPO (h - 1/(2 beta))^2 with h = (s_c - r_c) - (s_r - r_r),
    mean over pairs. GR-* (Ramesh et al. 2024): alpha (uniform start) moves first, at the step's
    theta: alpha_d exp(eta m_d) / Z. stratified: m_d = mean loss of d's n_d pairs in the step, then
    the loss is sum_d alpha_d m_d; importance (Alg. 1's per-pair terms averaged over the B
    pairs): m_d = (N / N_d) (1/B) sum_{pairs of d} l, then (1/B) sum over pairs of
    N alpha_d / N_d * l (N, N_d: dataset sizes)."""
    pairs = sorted(set(pair_ids))
    h, grp = {}, {}
    for i, p in enumerate(pair_ids):
        h[p] = h.get(p, 0.0) + signs[i] * (s[i] - ref[i])
        grp[p] = groups[i]
    if "dpo" in loss:
        lp = {p: torch.log1p(torch.exp(-beta * h[p])) for p in pairs}
    else:
        lp = {p: (h[p] - 1 / (2 * beta)) ** 2 for p in pairs}
    b = len(pairs)
    if not loss.startswith("gr_"):
        return sum(lp.values()) / b
    n, k = sum(sizes), len(sizes)
    members = {d: [p for p in pairs if grp[p] == d] for d in range(k)}
    if estimator == "stratified":
        m = {d: sum(float(lp[p].detach()) for p in v) / len(v) for d, v in members.items() if v}
    else:
        m = {d: n * sum(float(lp[p].detach()) for p in v) / (sizes[d] * b) for d, v in members.items()}
    alpha = {d: math.exp(eta * m[d]) / k for d in m}
    z = sum(alpha.values()) / (len(m) / k)
    alpha = {d: a / z for d, a in alpha.items()}
    if estimator == "stratified":
        return sum(alpha[d] * sum(lp[p] for p in members[d]) / len(members[d]) for d in m)
    return sum(n * alpha[grp[p]] / sizes[grp[p]] * lp[p] for p in pairs) / b


def _hf_logprobs(model, batch) -> list[torch.Tensor]:
    """Per-token response logprobs (float64) of each sample, one sequence at a time."""
    lps = []
    for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True):
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].double()
        lps.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0])
    return lps


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "ipo", "gr_dpo", "gr_ipo"])
def test_preference_gradients_match_transformers_float64(layout_grads, tiny_models, loss):
    from transformers import AutoModelForCausalLM

    worker = _worker_module()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2"]), dtype=torch.float32)
    batch, noise = worker.make_pair_batch(model.config.vocab_size)
    lps = _hf_logprobs(model, batch)
    s = [lp.sum() for lp in lps]
    ref = [float((lp.detach() + n.double()).sum()) for lp, n in zip(lps, noise, strict=True)]
    cfg = worker.objective_for(loss).config
    value = _preference_reference(
        s,
        ref,
        batch.rewards.tolist(),
        batch.group_ids.tolist(),
        batch.domains.tolist(),
        loss,
        cfg.beta,
        worker.DATASET_SIZES,
        getattr(cfg, "robust_eta", 0.0),
        getattr(cfg, "robust_estimator", None),
    )
    value.backward()
    want = {f"{loss}/{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    got, _ = layout_grads["tp1_pp1_dp1"]
    errs = _rel_errors(got, want, loss)
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-4, f"{loss}: {worst} rel err {errs[worst]:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["gvpo", "grpo", "gvpo_masked", "grpo_masked"])
def test_reference_layout_matches_transformers_float64(layout_grads, tiny_models, loss):
    """``*_masked``: the batch as multi-turn trajectories; the reference keeps each response's
    model tokens only (s, s', ratios, token means), whatever theta' holds on the others."""
    from transformers import AutoModelForCausalLM

    worker = _worker_module()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2"]), dtype=torch.float32)
    batch, noise = worker.make_batch(model.config.vocab_size)
    lps = _hf_logprobs(model, batch)
    own = [lp.detach() for lp in lps]
    olds = [a + b.double() for a, b in zip(own, noise["old_noise"], strict=True)]
    if loss.endswith("_masked"):
        masks = worker.with_loss_masks(batch).loss_masks
        noise = {"ref_noise": [n[m] for n, m in zip(noise["ref_noise"], masks, strict=True)]}
        lps, own, olds = ([x[m] for x, m in zip(xs, masks, strict=True)] for xs in (lps, own, olds))
        assert sum(len(x) for x in lps) < batch.num_response_tokens  # observations were dropped
        loss_fn = loss.removesuffix("_masked")
    else:
        loss_fn = loss
    rewards = batch.rewards.double().tolist()
    gids = batch.group_ids.tolist()
    if loss_fn == "gvpo":
        s = [lp.sum() for lp in lps]
        old = [o.sum() for o in olds]
        value = _gvpo_reference(s, old, rewards, gids, worker.BETA)
    else:
        refs = [a + b.double() for a, b in zip(own, noise["ref_noise"], strict=True)]
        value = _grpo_reference(lps, olds, refs, rewards, gids)
    value.backward()
    want = {f"{loss}/{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    got, _ = layout_grads["tp1_pp1_dp1"]
    errs = _rel_errors(got, want, loss)
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-4, f"{loss}: {worst} rel err {errs[worst]:.2e}"
