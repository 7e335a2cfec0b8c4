"""Checkpoint save time and leftover processes: megatron's default writer vs ``InProcessSave``.

    python tools/bench_checkpoint.py                      # both strategies, fresh process each
    python tools/bench_checkpoint.py --hidden 1024 --layers 8

Each strategy runs in its own fresh Python process (as a trainer would): build a random llama
actor (single rank), a DDP wrapper and an Adam optimizer with state, then save model + optimizer
``--saves`` times with ``dist_checkpointing.save`` into a temporary folder. Prints one JSON line
per strategy: the first save (what a trainer's first checkpoint or a post-signal save pays),
the median of the others, and the child processes of the saving process after the last save
(what a kill -9 would leave behind).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(args) -> None:
    import psutil
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_gvpo.bridge.dist_save import InProcessSave
    from megatron_gvpo.bridge.loader import build_from_hf
    from megatron_gvpo.models.tiny import save_tiny_hf_model
    from megatron_gvpo.parallel.ddp import wrap_with_ddp
    from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, initialize

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        hf = save_tiny_hf_model(
            Path(tmp) / "hf",
            "llama",
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 3,
            num_hidden_layers=args.layers,
            vocab_size=args.vocab,
        )
        initialize(ParallelConfig())
        model, _ = build_from_hf(hf)
        ddp = wrap_with_ddp(model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4), [ddp])
        for p in ddp.parameters():  # give Adam its moments, as after a training step
            p.main_grad.normal_()
        opt.step()
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        times = []
        for i in range(args.saves):
            out = Path(tmp) / f"save_{i}"
            out.mkdir()
            sd = ddp.sharded_state_dict()
            state = {"model": sd, "optimizer": opt.sharded_state_dict(sd)}
            strategy = InProcessSave() if args.strategy == "inprocess" else None
            t0 = time.perf_counter()
            dist_checkpointing.save(state, str(out), sharded_strategy=strategy)
            times.append(time.perf_counter() - t0)
        children = psutil.Process().children(recursive=True)
        print(
            json.dumps(
                {
                    "strategy": args.strategy,
                    "model_mb": round(nbytes / 2**20, 1),
                    "first_save_s": round(times[0], 3),
                    "median_later_save_s": round(statistics.median(times[1:]), 3),
                    "children_after_saves": len(children),
                    "children_rss_mb": round(sum(c.memory_info().rss for c in children) / 2**20),
                }
            ),
            flush=True,
        )
        destroy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=["megatron", "inprocess"], default=None)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--saves", type=int, default=5)
    args = p.parse_args(argv)
    if args.strategy is not None:
        worker(args)
        return
    for strategy in ("megatron", "inprocess"):
        cmd = [sys.executable, __file__, "--strategy", strategy]
        cmd += ["--hidden", str(args.hidden), "--layers", str(args.layers)]
        cmd += ["--vocab", str(args.vocab), "--saves", str(args.saves)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
