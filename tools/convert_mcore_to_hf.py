"""Convert a Megatron-Core checkpoint written by convert_hf_to_mcore.py (or the trainer) to HF.

    python tools/convert_mcore_to_hf.py --mcore-dir M --out-dir H2 [--pp 4] [--ep 2]

Writes config.json, the tokenizer files and ``model.safetensors`` (with ``--pp P``: one shard per
pipeline stage, each written by its own process holding 1/P of the model, plus the index; with
``--ep E`` a mixture-of-experts model's experts are read by E processes per stage and gathered). The
weights keep the checkpoint's dtype, so HF -> Megatron -> HF is bitwise identical.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gvpo.bridge.checkpoint import read_meta  # noqa: E402
from megatron_gvpo.bridge.hf_io import (  # noqa: E402
    copy_side_files,
    publish_dir,
    staging_dir,
    write_index,
    write_safetensors_shard,
)
from megatron_gvpo.bridge.loader import build_from_checkpoint  # noqa: E402
from megatron_gvpo.bridge.weights import iter_hf_tensors  # noqa: E402
from megatron_gvpo.models.hf_config import check_parallel_layout  # noqa: E402
from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, initialize  # noqa: E402
from megatron_gvpo.parallel.launch import is_rank0, run_on_ranks  # noqa: E402


def worker(args) -> None:
    initialize(ParallelConfig(tp=1, pp=args.pp, ep=args.ep))
    out = Path(args.out_dir)
    tmp = staging_dir(out)
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        copy_side_files(Path(args.mcore_dir) / "hf", tmp)
    dist.barrier()
    model, arch = build_from_checkpoint(args.mcore_dir)
    tensors = dict(iter_hf_tensors(model, arch))  # every EP rank of a stage gets all experts
    stage = parallel_state.get_pipeline_model_parallel_rank()
    shard = (
        "model.safetensors"
        if args.pp == 1
        else f"model-{stage + 1:05d}-of-{args.pp:05d}.safetensors"
    )
    if parallel_state.get_data_parallel_rank() == 0:
        write_safetensors_shard(tensors, tmp / shard)
    else:
        tensors = {}
    stage_info = (
        {n: shard for n in tensors},
        sum(t.numel() * t.element_size() for t in tensors.values()),
    )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stage_info)
    if is_rank0():
        if args.pp > 1:
            weight_map = {k: v for names, _ in gathered for k, v in names.items()}
            write_index(tmp, weight_map, sum(size for _, size in gathered))
        publish_dir(out)
        print(
            json.dumps({"out_dir": str(out), "tensors": sum(len(n) for n, _ in gathered)}),
            flush=True,
        )
    dist.barrier()
    destroy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mcore-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument(
        "--pp", type=int, default=1, help="processes (pipeline stages) used; one shard each"
    )
    p.add_argument(
        "--ep", type=int, default=1, help="expert-parallel processes per stage (MoE models)"
    )
    args = p.parse_args(argv)
    _, arch = read_meta(args.mcore_dir)  # fails fast on a folder that is not a checkpoint
    check_parallel_layout(arch, 1, args.pp, source=f"--pp {args.pp} --ep {args.ep}", ep=args.ep)
    run_on_ranks(worker, args.pp * args.ep, args)


if __name__ == "__main__":
    main()
