"""Packed-sequence attention on the CPU: one SDPA call per sequence, one block-diagonal masked call,
or length-bucketed padded batches (``models/sdpa_attention.py``), forward + backward.

    OMP_NUM_THREADS=1 python tools/bench_attention.py

Shapes: the bench_vs_trl task's micro-batches (32 and 256 sequences of 5-10 tokens, 4 heads of 32)
and a few long sequences (4 of 300-1000 tokens, 8 heads of 64). Prints one JSON line per case
with the median milliseconds of each method.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gvpo.models.sdpa_attention import PaddedSegments  # noqa: E402


def per_sequence(q, k, v, cu):
    return torch.cat(
        [
            F.scaled_dot_product_attention(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], is_causal=True)
            for a, e in zip(cu[:-1], cu[1:], strict=True)
        ],
        dim=2,
    )


def block_diagonal(q, k, v, cu):
    t = q.shape[2]
    seg = torch.bucketize(torch.arange(t), torch.tensor(cu[1:]), right=True)
    mask = (seg[:, None] == seg[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def bucketed(q, k, v, cu):
    segs = PaddedSegments(cu, q.shape[2])
    outs = [
        F.scaled_dot_product_attention(*segs.pad(q, k, v, i), is_causal=True)
        for i in segs.buckets()
    ]
    return segs.unpad(outs)


METHODS = {"per_sequence": per_sequence, "block_diagonal": block_diagonal, "bucketed": bucketed}


def case(name, lengths, heads, head_dim, repeats=7):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    g = torch.Generator().manual_seed(0)
    # [s, b, h, d] as megatron's projections give them, viewed [b, h, s, d] as SDPAttention does
    base = [torch.randn(cu[-1], 1, heads, head_dim, generator=g) for _ in range(3)]
    ref = None
    row = {"case": name, "sequences": len(lengths), "tokens": cu[-1]}
    for label, fn in METHODS.items():
        times = []
        for _ in range(repeats):
            leaves = [x.clone().requires_grad_() for x in base]
            t0 = time.perf_counter()
            out = fn(*(x.permute(1, 2, 0, 3) for x in leaves), cu)
            out.square().sum().backward()
            times.append(time.perf_counter() - t0)
        if ref is None:
            ref = out.detach()
        else:  # every method computes the same attention
            torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-5)
        row[f"{label}_ms"] = round(1e3 * statistics.median(times), 2)
    print(json.dumps(row), flush=True)


def main() -> None:
    torch.set_num_threads(1)
    rng = random.Random(0)
    case("8x4 micro-batch", [rng.randint(5, 10) for _ in range(32)], 4, 32)
    case("32x8 micro-batch", [rng.randint(5, 10) for _ in range(256)], 4, 32)
    case("long", [rng.randint(300, 1000) for _ in range(4)], 8, 64)


if __name__ == "__main__":
    main()
