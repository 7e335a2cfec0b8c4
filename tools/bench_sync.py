"""Weight-sync throughput: Megatron actor -> HF-named buckets -> LocalEngine, vs a plain copy.

    python tools/bench_sync.py                          # ~310 MB bf16 llama-style model, TP1 x PP1
    python tools/bench_sync.py --tp 2 --pp 2 --fp8      # spawns 4 CPU ranks (or run under torchrun)

Builds a random HF model (the tiny.py families at a larger size), loads it into the actor and
into a LocalEngine on rank 0, then times (median and minimum over --repeats after one warm-up
round that pays the first-touch page faults; GB/s of exported bytes):

- ``export``: iterate ``iter_buckets_on_rank0`` (TP gather, PP funnel, cast/FP8) and drop buckets;
- ``load``: ``LocalEngine.update_weights`` from buckets already in memory;
- ``export_load``: both, streamed (what a sync costs);
- ``torch_copy``: ``dst.copy_(src)`` over tensors of the same sizes and dtypes (the floor).

Prints one JSON line on rank 0. ``--threads`` (default 1) sets torch's intra-op threads: on a
shared machine, threads that wait for a descheduled sibling make each copy stall unpredictably.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gvpo.bridge.export import (  # noqa: E402
    ExportConfig,
    bucket_nbytes,
    iter_buckets_on_rank0,
)
from megatron_gvpo.bridge.loader import build_from_hf  # noqa: E402
from megatron_gvpo.models.gpt import PRECISIONS  # noqa: E402
from megatron_gvpo.models.tiny import save_tiny_hf_model  # noqa: E402
from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, initialize  # noqa: E402
from megatron_gvpo.parallel.launch import run_on_ranks  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _drain(it) -> None:
    for _ in it:
        pass


def bench_copy(params: list[torch.Tensor], repeats: int) -> list[float]:
    """Seconds per round to copy tensors shaped like ``params`` into ``params``' own storage."""
    src = [p.detach().clone() for p in params]
    with torch.no_grad():
        return [
            _timed(lambda: [d.copy_(s) for d, s in zip(params, src, strict=True)])
            for _ in range(repeats + 1)
        ]


def one_round(model, arch, cfg: ExportConfig, engine, version: int) -> dict[str, float]:
    """Time export alone, load alone (buckets held in memory) and both streamed; rank 0 only."""
    out = {"export": _timed(lambda: _drain(iter_buckets_on_rank0(model, arch, cfg)))}
    buckets = list(iter_buckets_on_rank0(model, arch, cfg))
    if engine is not None:
        out["load"] = _timed(lambda: engine.update_weights(iter(buckets), version))
    buckets.clear()
    dist.barrier()
    stream = iter_buckets_on_rank0(model, arch, cfg)
    if engine is not None:
        out["export_load"] = _timed(lambda: engine.update_weights(stream, version))
    else:
        _drain(stream)
    dist.barrier()
    return out if engine is not None else {}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    initialize(ParallelConfig(tp=args.tp, pp=args.pp))
    model, arch = build_from_hf(args.hf_dir)
    cfg = ExportConfig(
        bucket_bytes=int(args.bucket_mb * (1 << 20)),
        dtype=PRECISIONS[args.export_dtype] if args.export_dtype else None,
        fp8=args.fp8,
    )
    engine = None
    if dist.get_rank() == 0:
        from megatron_gvpo.rollout.local import LocalEngine

        engine = LocalEngine(args.hf_dir)

    times: dict[str, list[float]] = {"export": [], "load": [], "export_load": []}
    for version in range(args.repeats + 1):  # round 0: warm-up
        for key, seconds in one_round(model, arch, cfg, engine, version).items():
            times[key].append(seconds)
    if engine is not None:
        report(args, engine, list(iter_buckets_on_rank0(model, arch, cfg)), times)
    else:
        _drain(iter_buckets_on_rank0(model, arch, cfg))
    destroy()


def report(args, engine, buckets: list, times: dict[str, list[float]]) -> None:
    """Print the JSON line: bytes, bucket count, best times and GB/s."""
    nbytes = sum(bucket_nbytes(b) for b in buckets)
    engine_params = list(dict(engine.model.named_parameters()).values())
    engine_bytes = sum(p.numel() * p.element_size() for p in engine_params)
    times = {**times, "torch_copy": bench_copy(engine_params, args.repeats)}
    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    best = {k: min(v[1:]) for k, v in times.items()}
    result = {
        "layout": f"tp{args.tp}pp{args.pp}",
        "model_dtype": args.dtype,
        "export_dtype": "fp8" if args.fp8 else (args.export_dtype or args.dtype),
        "engine_bytes": engine_bytes,
        "exported_bytes": nbytes,
        "buckets": len(buckets),
        "bucket_mb": args.bucket_mb,
        "threads": args.threads,
        "repeats": args.repeats,
        "median_seconds": {k: round(v, 4) for k, v in median.items()},
        "first_run_seconds": {k: round(v[0], 4) for k, v in times.items()},
        # torch_copy moves the engine's bytes; the others are per exported byte.
        "GB_per_s_median": _rates(median, engine_bytes, nbytes),
        "GB_per_s_best": _rates(best, engine_bytes, nbytes),
    }
    print(json.dumps(result), flush=True)


def _rates(seconds: dict[str, float], engine_bytes: int, nbytes: int) -> dict[str, float]:
    return {
        k: round((engine_bytes if k == "torch_copy" else nbytes) / v / 1e9, 3)
        for k, v in seconds.items()
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", default="llama", choices=["llama", "qwen2", "qwen3", "mistral"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=list(PRECISIONS), default="bf16", help="model dtype")
    p.add_argument("--export-dtype", choices=list(PRECISIONS), help="cast while exporting")
    p.add_argument("--fp8", action="store_true", help="blockwise FP8 projections")
    p.add_argument("--bucket-mb", type=float, default=512)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--hf-dir", help="use this HF folder instead of building a random model")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.hf_dir:
            args.hf_dir = str(
                save_tiny_hf_model(
                    Path(tmp) / "model",
                    args.family,
                    dtype=PRECISIONS[args.dtype],
                    hidden_size=args.hidden,
                    intermediate_size=args.intermediate,
                    num_hidden_layers=args.layers,
                    num_attention_heads=args.heads,
                    num_key_value_heads=args.kv_heads,
                    vocab_size=args.vocab,
                    head_dim=args.hidden // args.heads,
                )
            )
        run_on_ranks(worker, args.tp * args.pp, args)


if __name__ == "__main__":
    main()
