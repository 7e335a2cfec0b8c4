"""torchrun worker: parameters of each rank's GPTModel stage, for the memory planner's test.

Run by tests/test_plan_memory.py as ``torchrun --nproc_per_node 4 <this file> --tp 2 --pp 2
--out O`` (``--ep``/``--etp`` for expert parallelism, ``--families`` to build fewer). Every rank
builds the tiny model of each family (no weights loaded) and writes ``O/rank<R>.json``: its TP,
PP and EP rank, its parameter count per family, and of those the expert parameters (the ones
megatron-core marks ``allreduce=False``: reduced over the expert-data-parallel group).
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
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=None)
    p.add_argument("--families", default=",".join(TINY_FAMILIES))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    initialize(ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp))
    counts, experts = {}, {}
    for family in args.families.split(","):
        arch = arch_from_dict(tiny_hf_config(family).to_dict())
        model = build_gpt_model(arch, ModelConfig(precision="fp32"), perform_initialization=False)
        counts[family] = sum(q.numel() for q in model.parameters())
        experts[family] = sum(
            q.numel() for q in model.parameters() if not getattr(q, "allreduce", True)
        )
    out = {
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "ep_rank": parallel_state.get_expert_model_parallel_rank(),
        "expert_dp": parallel_state.get_expert_data_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
        "params": counts,
        "expert_params": experts,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
    destroy()


if __name__ == "__main__":
    main()
