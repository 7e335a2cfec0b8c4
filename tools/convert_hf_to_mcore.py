"""Convert a Hugging Face checkpoint to a Megatron-Core dist checkpoint (loadable at any TP x PP).

    python tools/convert_hf_to_mcore.py --hf-dir H --out-dir M --tp 2 --pp 2
    python tools/convert_hf_to_mcore.py --hf-dir H --out-dir M --pp 2 --ep 2   # a MoE model

Runs on CPU without a GPU. ``--tp``/``--pp`` choose how the work is split: each of the TP x PP
ranks (spawned here, or started by torchrun) builds only its own stage and shard and reads only
the tensors it needs from the safetensors shards, one tensor at a time, so a model larger than
one process's memory converts; ``--ep E`` splits a mixture-of-experts model's experts over E
ranks (taken from the data-parallel ranks: PP x lcm(TP, EP x ETP) processes). The result loads
under any other layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gvpo.bridge.checkpoint import CheckpointMeta, save_model  # noqa: E402
from megatron_gvpo.bridge.loader import build_from_hf, precision_of, validate_hf_dir  # noqa: E402
from megatron_gvpo.models.gpt import ModelConfig  # noqa: E402
from megatron_gvpo.parallel.initialize import (  # noqa: E402
    ParallelConfig,
    destroy,
    initialize,
    layout_world_size,
)
from megatron_gvpo.parallel.launch import is_rank0, run_on_ranks  # noqa: E402


def worker(args) -> None:
    initialize(_layout(args))
    model, arch = build_from_hf(args.hf_dir, ModelConfig(precision=args.precision))
    meta = CheckpointMeta(
        padded_vocab_size=model.vocab_size, precision=args.precision, source=str(args.hf_dir)
    )
    save_model(model, args.out_dir, meta, args.hf_dir)
    if is_rank0():
        print(
            json.dumps(
                {
                    "out_dir": str(args.out_dir),
                    "model_type": arch.model_type,
                    "tp": args.tp,
                    "pp": args.pp,
                    "ep": args.ep,
                    "precision": args.precision,
                }
            ),
            flush=True,
        )
    destroy()


def _layout(args) -> ParallelConfig:
    return ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hf-dir", required=True, help="HF folder: config.json + *.safetensors")
    p.add_argument("--out-dir", required=True, help="where the Megatron checkpoint is written")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks used to convert")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks used to convert")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks used to convert")
    p.add_argument("--etp", type=int, help="expert tensor-parallel ranks (default: --tp)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="weights dtype (default: the HF config's dtype, so the round trip is exact)",
    )
    args = p.parse_args(argv)
    # Every cheap check before any process starts or any weight is read.
    arch, _ = validate_hf_dir(args.hf_dir, args.tp, args.pp, ep=args.ep, etp=args.etp)
    args.precision = args.precision or precision_of(arch)
    run_on_ranks(worker, layout_world_size(_layout(args)), args)


if __name__ == "__main__":
    main()
