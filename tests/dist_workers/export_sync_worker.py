"""torchrun worker: weight sync from a Megatron actor (TP x PP, CPU/gloo) to a LocalEngine.

Run by tests/test_export_sync.py as
``python -m torch.distributed.run --nproc_per_node 4 <this file> --pair NAME A B ... --out O``.
For each pair the actor is built from HF folder A; the engine (on rank 0) starts from a different
model B and is updated from the actor. Everything the test checks is written under O (rank 0, or
per rank), so the assertions and their references (HF source files, transformers) stay in the test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors.torch import save_file

from megatron_gvpo.bridge.export import (
    ExportConfig,
    bucket_nbytes,
    iter_buckets_on_rank0,
    iter_stage_buckets,
)
from megatron_gvpo.bridge.loader import build_from_hf
from megatron_gvpo.models.forward import MicroBatch, compute_logprobs
from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, initialize
from megatron_gvpo.rollout.base import GenerateRequest, SamplingParams

BUCKET_BYTES = 40_000  # tiny model: many buckets, and the embedding (64 000 B) alone in one
PROMPTS = [[5, 17, 42, 9], [100, 3], [7, 7, 8, 200, 11, 12, 13]]
CASES = {
    "greedy": SamplingParams(max_new_tokens=12, temperature=0.0),
    "sampled": SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.95, top_k=50),
}


def _recording(buckets, log: list, store: dict):
    """Pass buckets through, recording names and bytes and keeping a copy of every tensor."""
    for bucket in buckets:
        log.append({"names": [n for n, _ in bucket], "nbytes": bucket_nbytes(bucket)})
        for n, t in bucket:
            store.setdefault(n, []).append(t.detach().clone())
        yield bucket


def _dump(tensors: dict, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def export_stage(model, arch, out: Path) -> None:
    """Each rank saves what the per-stage entry point gives it."""
    cfg = ExportConfig(bucket_bytes=BUCKET_BYTES)
    got = {n: t.clone() for b in iter_stage_buckets(model, arch, cfg) for n, t in b}
    _dump(got, out / f"stage_rank{dist.get_rank()}.safetensors")


def sync(model, arch, engine, cfg: ExportConfig, out: Path, tag: str, version: int) -> None:
    """Funnel to rank 0 and load into the engine there; rank 0 records what arrived."""
    buckets = iter_buckets_on_rank0(model, arch, cfg)
    if engine is None:
        for _ in buckets:
            pass
        return
    log, store = [], {}
    engine.update_weights(_recording(buckets, log, store), version)
    dup = sorted(n for n, ts in store.items() if len(ts) > 1)
    _dump({n: ts[0] for n, ts in store.items()}, out / f"{tag}_exported.safetensors")
    state = {n: p.detach() for n, p in engine.model.named_parameters()}
    _dump(state, out / f"{tag}_engine.safetensors")
    (out / f"{tag}_buckets.json").write_text(json.dumps({"buckets": log, "duplicates": dup}))


def engine_samples(engine) -> dict:
    """Per case: (tokens, prompt length, engine logprobs) of every sample, on rank 0."""
    out = {}
    for case, sp in CASES.items():
        reqs = [GenerateRequest(p, n=2, seed=11 + i) for i, p in enumerate(PROMPTS)]
        samples = [s for group in engine.generate(reqs, sp) for s in group]
        out[case] = [
            (s.prompt_ids + s.response_ids, len(s.prompt_ids), s.logprobs) for s in samples
        ]
    return out


def actor_logprobs(model, samples: dict) -> dict:
    """The actor's logprobs of each sample's response tokens (same temperature as sampled)."""
    out = {}
    for case, rows in samples.items():
        temp = CASES[case].temperature or 1.0
        width = max(len(t) for t, _, _ in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (t, _, _) in enumerate(rows):
            tokens[b, : len(t)] = torch.tensor(t)
        (lp,) = compute_logprobs(model, [MicroBatch(tokens=tokens)], temperature=temp)
        out[case] = [lp[b, p - 1 : len(t) - 1].tolist() for b, (t, p, _) in enumerate(rows)]
    return out


def broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_pair(hf_dir: str, engine_dir: str, out: Path) -> None:
    """Everything for one actor model (from ``hf_dir``) and one engine (from ``engine_dir``)."""
    out.mkdir(parents=True, exist_ok=True)
    model, arch = build_from_hf(hf_dir)
    model.eval()
    engine = None
    if dist.get_rank() == 0:
        from megatron_gvpo.rollout.local import LocalEngine

        engine = LocalEngine(engine_dir)

    export_stage(model, arch, out)
    before = broadcast(engine_samples(engine) if engine else None)
    sync(model, arch, engine, ExportConfig(bucket_bytes=BUCKET_BYTES), out, "fp32", version=1)
    after = broadcast(engine_samples(engine) if engine else None)
    actor_before = actor_logprobs(model, before)
    actor_after = actor_logprobs(model, after)
    if engine is not None:
        result = {
            "before": {c: [r[2] for r in rows] for c, rows in before.items()},
            "actor_before": actor_before,
            "after": {c: [r[2] for r in rows] for c, rows in after.items()},
            "actor_after": actor_after,
            "weight_version": engine.weight_version,
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        }
        (out / "logprobs.json").write_text(json.dumps(result))
    fp8 = ExportConfig(bucket_bytes=BUCKET_BYTES, fp8=True)
    sync(model, arch, engine, fp8, out, "fp8", version=2)
    if engine is not None:
        (out / "done").write_text(str(engine.weight_version))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--pair", nargs=3, action="append", required=True, metavar=("NAME", "HF_DIR", "ENGINE_DIR")
    )
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    args = p.parse_args()
    initialize(ParallelConfig(tp=args.tp, pp=args.pp))
    for name, hf_dir, engine_dir in args.pair:
        run_pair(hf_dir, engine_dir, Path(args.out) / name)
    destroy()


if __name__ == "__main__":
    main()
