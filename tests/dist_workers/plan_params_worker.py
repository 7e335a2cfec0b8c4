"""torchrun worker: parameters of each rank's GPTModel stage, for the memory planner's test.

Run by tests/test_plan_memory.py as ``torchrun --nproc_per_node 4 <this file> --tp 2 --pp 2
--out O``. Every rank builds the tiny model of each family (no weights loaded) and writes
``O/rank<R>.json``: its TP and PP rank and its parameter count per family.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_gvpo.models.gpt import ModelConfig, build_gpt_model
from megatron_gvpo.models.hf_config import arch_from_dict
from megatron_gvpo.models.tiny import TINY_FAMILIES, tiny_hf_config
from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, initialize


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    initialize(ParallelConfig(tp=args.tp, pp=args.pp))
    counts = {}
    for family in TINY_FAMILIES:
        arch = arch_from_dict(tiny_hf_config(family).to_dict())
        model = build_gpt_model(arch, ModelConfig(precision="fp32"), perform_initialization=False)
        counts[family] = sum(q.numel() for q in model.parameters())
    out = {
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "params": counts,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
    destroy()


if __name__ == "__main__":
    main()
