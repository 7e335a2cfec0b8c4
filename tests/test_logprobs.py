"""vocab_parallel_logprobs against an independent float64 log_softmax reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_torchrun
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_gvpo.parallel.logprobs import vocab_parallel_logprobs

WORKER = Path(__file__).resolve().parent / "dist_workers" / "logprobs_tp_worker.py"


def reference(full: torch.Tensor, target: torch.Tensor, true_vocab: int, temperature: float):
    """float64 log-probs and entropy, padding columns sliced away."""
    lsm = torch.log_softmax(full[..., :true_vocab].double() / temperature, dim=-1)
    lp = lsm.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return lp, ent


def make_inputs(lead, vocab, true_vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * 4).to(dtype)
    logits[..., true_vocab:] = 3e4  # huge padding logits: the result must not see them
    target = torch.randint(0, true_vocab, lead, generator=gen)
    g_lp = torch.randn(lead, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(lead, generator=gen, dtype=torch.float64)
    return logits, target, g_lp, g_ent


def grads(fn_out, inp, g_lp, g_ent):
    lp, ent = fn_out
    obj = 0.0
    if g_lp is not None:
        obj = obj + (lp.double() * g_lp).sum()
    if g_ent is not None:
        obj = obj + (ent.double() * g_ent).sum()
    (g,) = torch.autograd.grad(obj, inp)
    return g


def assert_close(got, want, tol, what):
    err = (got.double() - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize(
    "dtype,temperature,chunk_size",
    [
        (torch.float32, 1.0, 4096),
        (torch.float32, 0.7, 5),  # 5 does not divide the 3 * 7 = 21 tokens
        (torch.bfloat16, 0.7, 4),
        (torch.bfloat16, 1.6, 1),
        (torch.float16, 1.0, 8),
        (torch.float64, 0.5, 6),
    ],
)
@pytest.mark.parametrize("use", ["both", "logprobs", "entropy"])
def test_values_and_grads_match_float64(dtype, temperature, chunk_size, use):
    lead, vocab, true_vocab = (3, 7), 64, 57
    logits, target, g_lp, g_ent = make_inputs(lead, vocab, true_vocab, dtype)
    g_lp = None if use == "entropy" else g_lp
    g_ent = None if use == "logprobs" else g_ent

    ref_in = logits.double().requires_grad_(True)
    ref_out = reference(ref_in, target, true_vocab, temperature)
    ref_grad = grads(ref_out, ref_in, g_lp, g_ent)

    inp = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(
        inp,
        target,
        true_vocab_size=true_vocab,
        temperature=temperature,
        chunk_size=chunk_size,
        return_entropy=True,
    )
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == target.shape
    assert_close(lp, ref_out[0], 1e-5, "logprobs")
    assert_close(ent, ref_out[1], 1e-5, "entropy")

    g = grads((lp, ent), inp, g_lp, g_ent)
    assert g.dtype == dtype and g.shape == logits.shape
    # float32 maths throughout; the gradient is then rounded to the logits' dtype.
    gtol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(dtype, 1e-5)
    assert_close(g, ref_grad, gtol, "grad")
    assert torch.all(g[..., true_vocab:] == 0), "padding columns got a gradient"


def test_logprobs_only_path_matches_reference():
    logits, target, g_lp, _ = make_inputs((11,), 40, 40, torch.float32, seed=3)
    inp = logits.clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(inp, target, temperature=1.2, chunk_size=3)
    assert isinstance(lp, torch.Tensor) and lp.shape == target.shape
    ref_in = logits.double().requires_grad_(True)
    ref = reference(ref_in, target, 40, 1.2)
    assert_close(lp, ref[0], 1e-5, "logprobs")
    assert_close(grads((lp, None), inp, g_lp, None), grads(ref, ref_in, g_lp, None), 1e-5, "grad")


def test_fp32_input_is_not_modified_and_no_grad_works():
    logits, target, _, _ = make_inputs((4, 5), 33, 30, torch.float32, seed=1)
    before = logits.clone()
    with torch.no_grad():
        lp, ent = vocab_parallel_logprobs(
            logits, target, true_vocab_size=30, temperature=0.5, chunk_size=3, return_entropy=True
        )
    assert torch.equal(logits, before)
    ref = reference(logits, target, 30, 0.5)
    assert_close(lp, ref[0], 1e-5, "logprobs")
    assert_close(ent, ref[1], 1e-5, "entropy")


class _Sizes(TorchDispatchMode):
    """Records (numel, dtype) of every tensor produced by an op."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.seen.append((t.numel(), t.dtype, tuple(t.shape)))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_memory_is_bounded_by_chunk(dtype):
    """No op output larger than one chunk, except the gradient buffer in the logits' dtype;
    backward keeps only the logits and per-token scalars."""
    n, vocab, chunk = 64, 96, 8
    logits, target, g_lp, g_ent = make_inputs((n,), vocab, 90, dtype, seed=2)
    inp = logits.clone().requires_grad_(True)

    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    mode = _Sizes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        lp, ent = vocab_parallel_logprobs(
            inp, target, true_vocab_size=90, chunk_size=chunk, return_entropy=True
        )
        grads((lp, ent), inp, g_lp, g_ent)

    big = [s for s in mode.seen if s[0] > chunk * vocab]
    assert big, "the gradient buffer should have been seen"
    assert all(s[1] == dtype and s[2] == (n, vocab) for s in big), big
    assert saved and any(t is inp or t.data_ptr() == inp.data_ptr() for t in saved)
    others = [t for t in saved if t.data_ptr() != inp.data_ptr()]
    assert all(t.numel() <= n for t in others), [tuple(t.shape) for t in others]


def test_leading_dims_and_empty():
    logits, target, _, _ = make_inputs((2, 3, 4), 10, 10, torch.float32)
    assert vocab_parallel_logprobs(logits, target).shape == (2, 3, 4)
    empty = vocab_parallel_logprobs(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_rejects_bad_arguments():
    logits, target, _, _ = make_inputs((4,), 10, 10, torch.float32)
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_logprobs(logits, target[:3])
    with pytest.raises(ValueError, match="true_vocab_size"):
        vocab_parallel_logprobs(logits, target, true_vocab_size=11)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(logits, target, temperature=0.0)
    with pytest.raises(ValueError, match="integer"):
        vocab_parallel_logprobs(logits, target.float())


@pytest.mark.slow
def test_tensor_parallel_two_ranks_match_single_rank_reference():
    proc = run_torchrun(WORKER, 2, timeout=180)
    assert proc.stdout.count("rank ok") == 2, proc.stdout[-4000:]
