"""The step's fast paths against independent references.

- Packed-sequence attention in length-bucketed padded batches (``models/sdpa_attention.py``)
  against causal softmax attention written out in float64 per sequence, values and gradients;
  control: one causal attention over the whole packed row (sequences see each other) differs.
- theta' logprobs taken from a round's only update's forward (``ThetaPrime``'s ``first_update``)
  against a separate forward-only pass and against transformers, and GRPO's gradient with them
  against the gradient with the separate pass's; control: other old logprobs change it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

WORKERS = Path(__file__).resolve().parent / "dist_workers"


def _attention(lengths: list[int]):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_gvpo.models.sdpa_attention import SDPAttention

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        attention_dropout=0.0,
    )
    tp1 = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    attn = SDPAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=tp1)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    packed = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_t,
        cu_seqlens_kv=cu_t,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
    )
    return attn, packed, cu


def _reference(q, k, v, cu):
    """Causal softmax attention per segment in float64, KV heads repeated (GQA)."""
    out = []
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        if e == s:
            continue
        qs, ks, vs = (x[s:e].double() for x in (q, k, v))
        ks, vs = ks.repeat_interleave(2, dim=1), vs.repeat_interleave(2, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(8)
        n = e - s
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs).reshape(n, 32))
    return torch.cat(out)


def test_bucketed_packed_attention_matches_float64_per_sequence_values_and_grads():
    # Short rows share buckets, long ones get their own; a zero-length segment and a padding tail.
    lengths = [3, 1, 7, 12, 5, 0, 9, 2, 60, 41, 130, 8, 4]
    attn, packed, cu = _attention(lengths)
    from megatron_gvpo.models.sdpa_attention import PaddedSegments

    assert len(PaddedSegments(cu, cu[-1]).gathers) >= 3  # several buckets really used
    g = torch.Generator().manual_seed(0)
    t = cu[-1]
    q, k, v = (torch.randn(t, n, 8, generator=g, requires_grad=True) for n in (4, 2, 2))
    w = torch.randn(t, 32, generator=g)
    out = attn(q, k, v, None, packed_seq_params=packed)
    (out * w).sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]

    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _reference(qd, kd, vd, cu)
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, (qd.grad, kd.grad, vd.grad), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)

    # Control: one causal attention over the whole row lets sequences see each other.
    whole = _reference(qd, kd, vd, [0, t])
    assert (whole - ref).abs().max() > 1e-2


@pytest.mark.slow
def test_theta_prime_from_the_update_forward_equals_a_separate_pass(tiny_models, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [
            sys.executable,
            str(WORKERS / "theta_prime_worker.py"),
            "--hf-dir",
            str(tiny_models["qwen2"]),
            "--budget",
            "64",  # several micro-batches
            "--out",
            str(out),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    r = json.loads(out.read_text())
    assert r["micro_batches"] >= 3, r
    assert r["filled_vs_separate"] <= 1e-6, r
    assert r["filled_vs_transformers"] <= 1e-4, r
    assert r["grad_rel_diff"] <= 1e-5, r
    assert r["grad_scale"] > 0, r
    assert r["control_grad_rel_diff"] > 1e-3, r


_HEAP = """
import ctypes, json, sys
from megatron_gvpo.parallel.cpu_malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "apply" else False


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
# a step's buffers: 24 MiB in 96 KiB blocks (heap blocks under either setting), then freed; the
# pointer array exists first, so nothing else lands on the heap above the blocks
blocks = (ctypes.c_void_p * 256)()
for i in range(256):
    blocks[i] = libc.malloc(96 * 1024)
held = libc.mallinfo2().arena
for i in reversed(range(256)):
    libc.free(blocks[i])
print(json.dumps({"applied": applied, "kept": libc.mallinfo2().arena / held}))
"""


def _heap(mode: str, **env) -> dict:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", _HEAP, mode], env=run_env, capture_output=True, text=True,
        check=True, timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_cpu_malloc_keeps_freed_buffers_and_leaves_user_settings_alone():
    """With the settings, memory a step frees stays in the heap for the next step; glibc's
    defaults trim it off and the next step faults it in again (control). A user's MALLOC_*
    variable or MEGATRON_GVPO_MALLOC=default leaves malloc as it is."""
    base, tuned = _heap("none"), _heap("apply")
    assert tuned["applied"] is True
    assert tuned["kept"] > 0.9, tuned  # the freed 24 MiB stay in the heap for the next step
    assert base["kept"] < 0.5, base  # control: glibc's defaults trim them off
    assert _heap("apply", MEGATRON_GVPO_MALLOC="default")["applied"] is False
    assert _heap("apply", MALLOC_TRIM_THRESHOLD_="131072")["applied"] is False


@pytest.mark.parametrize("exact_mapping", [False, True])
def test_packed_rope_from_positions_equals_megatrons_loop_bit_for_bit(exact_mapping):
    """``models/rope.py`` against megatron-core's own per-sequence ``thd`` RoPE (one CP rank):
    identical values and gradients, with a zero-length sequence among the segments; megatron's
    exact-mapping case (a table row per packed token) too. Control: RoPE applied at the packed
    positions (no restart per sequence) differs."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_gvpo.models import rope

    class OneRank:
        def size(self):
            return 1

        def rank(self):
            return 0

    torch.manual_seed(0)
    lengths = [5, 0, 9, 1, 17, 3]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    rows = total if exact_mapping else 64
    freqs = torch.outer(torch.arange(rows, dtype=torch.float32) * 0.7, inv)
    freqs = torch.cat([freqs, freqs], dim=-1).view(rows, 1, 1, 16)
    x = torch.randn(total, 4, 16, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    ours = rope.apply_rotary_pos_emb_thd(x, cu, freqs, cp_group=OneRank())
    theirs = rope._megatron_thd(y, cu, freqs, cp_group=OneRank())
    assert torch.equal(ours, theirs)
    g = torch.randn_like(ours)
    ours.backward(g)
    theirs.backward(g)
    assert torch.equal(x.grad, y.grad)
    if not exact_mapping:
        packed = rope_utils._apply_rotary_pos_emb_bshd(x.detach().unsqueeze(1), freqs[:total])
        assert (packed.squeeze(1) - theirs).abs().max() > 1e-2
