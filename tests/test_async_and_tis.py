"""Async rollout (``trainer/async_rollout.py``, ``rollout/process.py``, ``groups.drop_stale``) and
truncated importance sampling in the GRPO family (``algorithms/grpo.py``).

References: float64 formulas written here from the definitions (TIS: per-token weight
min(exp(old - engine), C), detached, on the clipped surrogate), explicit expected lists for the
stale-drop rule, and the in-process ``LocalEngine`` for the process-backed engine.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from megatron_gvpo.algorithms.grpo import (
    DAPOConfig,
    GRPOConfig,
    GSPOConfig,
    dapo_loss,
    grpo_loss,
    gspo_loss,
)
from megatron_gvpo.rollout.base import GenerateRequest, SamplingParams
from megatron_gvpo.trainer.async_rollout import RoundSource
from megatron_gvpo.trainer.groups import PromptGroup, drop_stale

# ------------------------------------------------------------------------------------- TIS


def _tokens(seed: int, b: int = 5, t: int = 6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2 - 0.1
    lp = (old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).requires_grad_(True)
    engine = old + 0.8 * torch.randn(b, t, generator=g, dtype=torch.float64)  # wide: some w > C
    mask = torch.rand(b, t, generator=g) < 0.8
    mask[:, 0] = True
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    return lp, old, engine, mask, adv


def _ref_tis_loss(kind, lp, old, engine, mask, adv, eps_low, eps_high, clip):
    """Float64 loops: sum over tokens of -min(r A, clip(r) A) * min(exp(old - engine), C)."""
    seqs, total, n_tok = [], 0.0, 0
    for b in range(lp.shape[0]):
        rows = [t for t in range(lp.shape[1]) if mask[b, t]]
        if kind == "gspo":
            mean_lr = sum(lp[b, t] - old[b, t] for t in rows) / len(rows)
            r = torch.exp(mean_lr)
            w = min(float(torch.exp(sum(old[b, t] - engine[b, t] for t in rows) / len(rows))), clip)
            surr = -torch.minimum(r * adv[b], r.clamp(1 - eps_low, 1 + eps_high) * adv[b])
            seqs.append(surr * w)
            continue
        terms = []
        for t in rows:
            r = torch.exp(lp[b, t] - old[b, t])
            w = min(float(torch.exp(old[b, t] - engine[b, t])), clip)
            surr = -torch.minimum(r * adv[b], r.clamp(1 - eps_low, 1 + eps_high) * adv[b])
            terms.append(surr * w)
        seqs.append(sum(terms) / len(terms))
        total = total + sum(terms)
        n_tok += len(terms)
    if kind == "dapo":
        return total / n_tok
    return sum(seqs) / len(seqs)


@pytest.mark.parametrize("kind", ["grpo", "dapo", "gspo"])
def test_tis_loss_and_gradient_against_float64_formula(kind):
    lp, old, engine, mask, adv = _tokens(seed=3 if kind != "gspo" else 4)
    fn, cfg_cls = {"grpo": (grpo_loss, GRPOConfig), "dapo": (dapo_loss, DAPOConfig),
                   "gspo": (gspo_loss, GSPOConfig)}[kind]
    clip = 1.1 if kind == "gspo" else 1.5  # sequence weights spread less than token ones
    cfg = cfg_cls(kl_beta=0.0, use_tis=True, tis_clip=clip, **({"eps_low": 0.2, "eps_high": 0.3}
                                                  if kind == "gspo" else {}))
    loss, diag = fn(lp, old, adv, mask, cfg, rollout_logprobs=engine)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_(True)
    ref = _ref_tis_loss(kind, lp2, old, engine, mask, adv, cfg.eps_low, cfg.eps_high, clip)
    (ref_grad,) = torch.autograd.grad(ref, lp2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    # The data exercise the truncation, and the weight really changes the loss (negative control).
    assert 0 < diag["tis_clip_fraction"].item() < 1
    assert diag["tis_max"].item() == pytest.approx(clip)
    plain, _ = fn(lp, old, adv, mask, cfg_cls(kl_beta=0.0, **({"eps_low": 0.2, "eps_high": 0.3}
                                                               if kind == "gspo" else {})))
    assert abs(plain.item() - loss.item()) > 1e-3
    # Engine == theta': every weight is 1 and TIS is the plain loss.
    same, d1 = fn(lp, old, adv, mask, cfg, rollout_logprobs=old.clone())
    assert same.item() == pytest.approx(plain.item(), rel=1e-12)
    assert d1["tis_mean"].item() == pytest.approx(1.0)


def test_tis_needs_engine_logprobs_and_a_positive_clip():
    lp, old, _, mask, adv = _tokens(seed=1)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        grpo_loss(lp, old, adv, mask, GRPOConfig(kl_beta=0.0, use_tis=True, tis_clip=2.0))
    with pytest.raises(ValueError, match="tis_clip"):
        GRPOConfig(tis_clip=0.0)


# ------------------------------------------------------------------------ stale-drop rule


def _group(versions):
    n = len(versions)
    return PromptGroup([1, 2], [[3]] * n, [float(i) for i in range(n)], None,
                       [[-0.5]] * n, [False] * n, list(versions))


def test_drop_stale_keeps_the_bound_and_counts_the_rest():
    groups = [_group([5, 4, 3]), _group([2, 2]), _group([-1, 5])]
    metrics: dict = {}
    kept = drop_stale(groups, actor_version=5, max_staleness=1, metrics=metrics)
    assert [g.weight_versions for g in kept] == [[5, 4], [], [-1, 5]]
    assert [g.rewards for g in kept] == [[0.0, 1.0], [], [0.0, 1.0]]  # responses stay aligned
    assert metrics["async/dropped_stale"] == 3
    assert metrics["async/unknown_version"] == 1
    assert metrics["async/staleness_max"] == 1
    assert metrics["async/staleness_mean"] == pytest.approx((0 + 1 + 0) / 3)
    # Negative control: a looser bound keeps everything; 0 keeps only the current version.
    loose: dict = {}
    assert sum(len(g.responses) for g in drop_stale(groups, 5, 3, loose)) == 7
    assert loose["async/dropped_stale"] == 0 and loose["async/staleness_max"] == 3
    strict: dict = {}
    assert [g.weight_versions for g in drop_stale(groups, 5, 0, strict)] == [[5], [], [-1, 5]]


# ------------------------------------------------------------------- rounds generated ahead


class _Prompts:
    """A prompt source whose state is the number of batches drawn."""

    def __init__(self):
        self.drawn = 0

    def next_batch(self):
        self.drawn += 1
        return [self.drawn]

    def state_dict(self):
        return {"drawn": self.drawn}


class _Engine:
    """Generation tagged with the weight version it ran under; syncs are checked to never land
    inside a generation."""

    def __init__(self):
        self.version, self.busy, self.log = 0, threading.Lock(), []

    def generate(self, step, rows):
        with self.busy:
            time.sleep(0.02)
            self.log.append((step, rows[0], self.version))
            return (step, self.version)

    def sync(self, version):
        assert self.busy.acquire(blocking=False), "a sync landed inside a generation"
        self.version = version
        self.busy.release()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_round_source_versions_and_prompt_state(k):
    prompts, engine = _Prompts(), _Engine()
    rounds = RoundSource(prompts, engine.generate, k)
    for step in range(1, 7):
        got_step, version = rounds.next(step)
        assert got_step == step
        # Round t is trained at actor version t - 1 and was sampled at max(0, t - 1 - k).
        assert version == max(0, step - 1 - k)
        assert rounds.prompt_state() == {"drawn": step}  # a checkpoint's: trained rounds only
        assert prompts.drawn == step + k
        rounds.wait_idle()
        engine.sync(step)
        assert rounds.metrics()["async/rounds_ahead"] == k
    rounds.close()
    assert [r[0] for r in engine.log] == [r[1] for r in engine.log]  # prompts in step order


# ---------------------------------------------------------------- the process-backed engine


def test_process_engine_samples_equal_the_in_process_engine(tiny_models):
    from megatron_gvpo.rollout.local import LocalEngine
    from megatron_gvpo.rollout.process import ProcessEngine

    path = tiny_models["llama"]
    local = LocalEngine(path)
    proc = ProcessEngine(model_path=str(path))
    try:
        g = torch.Generator().manual_seed(0)
        bucket = [
            (n, p.detach() + 0.05 * torch.randn(p.shape, generator=g))
            for n, p in local.model.named_parameters()
        ]
        for engine in (local, proc):
            engine.update_weights([bucket[:3], bucket[3:]], version=7)
        requests = [GenerateRequest([1, 5, 9], 3, seed=11), GenerateRequest([4, 2], 2, seed=12)]
        sampling = SamplingParams(max_new_tokens=6, temperature=1.0)
        want, got = local.generate(requests, sampling), proc.generate(requests, sampling)
        assert proc.weight_version == 7
        for gw, gg in zip(want, got, strict=True):
            for a, b in zip(gw, gg, strict=True):
                assert a.response_ids == b.response_ids
                assert b.weight_version == 7
                torch.testing.assert_close(
                    torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-5
                )
        # A bad tensor is named, the version stays, and the engine goes on serving.
        with pytest.raises(RuntimeError, match="no_such_tensor"):
            proc.update_weights([[("no_such_tensor", torch.zeros(2))]], version=8)
        assert proc.weight_version == 7
        assert proc.generate(requests, sampling)[0][0].response_ids == want[0][0].response_ids
    finally:
        proc.shutdown()
        local.shutdown()
    assert not proc.health()
    with pytest.raises(RuntimeError, match="shut down"):
        proc.generate(requests, sampling)


def test_config_errors_name_the_key():
    from megatron_gvpo.trainer.config import sections_from_dict
    from megatron_gvpo.trainer.objectives import algorithm_config

    cases = [
        ({"trainer": {"async_training": {"max_staleness": -1}}}, "trainer.async_training.max_st"),
        ({"trainer": {"async_training": {"staleness": 1}}}, "trainer.async_training.staleness"),
        ({"rollout": {"local": {"sampling_dtype": "fp7"}}}, "rollout.local.sampling_dtype"),
        ({"rollout": {"local": {"proces": True}}}, "rollout.local.proces"),
    ]
    for raw, key in cases:
        with pytest.raises(ValueError, match=key):
            sections_from_dict(raw)
    cfg = sections_from_dict({"trainer": {"async_training": {"max_staleness": 2}}})
    assert cfg.trainer.async_training.max_staleness == 2
    with pytest.raises(ValueError, match="algorithm.use_tis has no meaning for gvpo"):
        algorithm_config(name="gvpo", use_tis=True)
    grpo = algorithm_config(name="grpo", use_tis=True, tis_clip=3, kl_beta=0.0)
    assert grpo.use_tis and grpo.tis_clip == 3
    with pytest.raises(ValueError, match="algorithm.tis_clip"):
        algorithm_config(name="grpo", use_tis=True, tis_clip=0, kl_beta=0.0)
