"""Routing replay on a tiny mixture-of-experts demo: GRPO with ``routing_replay`` off, old, rollout.

    python tools/make_demo_model.py --out-dir /tmp/moe_demo --family qwen3_moe
    python tools/bench_routing_replay.py --model /tmp/moe_demo --steps 100 --seeds 1 2

Each arm is the demo task (``python -m megatron_gvpo.train``) on the given qwen3_moe model with
``algorithm=<algorithm>`` and the demo's 4 updates per round; the arms differ only in
``model.moe.routing_replay`` (``--arms``). Prints one JSON line per run and a summary per arm
(mean over seeds): the GRPO clip fraction, ``moe/routing_replay_flips`` (share of replayed token
routes the current router would have changed), ``moe/rollout_route_flips`` (rollout: share of
the engine's routes the theta' router would have changed), the engine/trainer logprob gap
(``rollout/logprob_abs_diff/*``: with ``rollout`` the trainer's theta' pass replays the engine's
routes, with off and old it routes on its own), the training reward of the first and last 10
steps and the held-out greedy accuracy at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args, replay: str, seed: int) -> dict:
    run_dir = Path(args.work_dir) / f"{args.algorithm}_{replay}_seed{seed}"
    cmd = [
        sys.executable, "-m", "megatron_gvpo.train", "model=hf", f"model.path={args.model}",
        "model.precision=fp32", f"algorithm={args.algorithm}",
        f"model.moe.routing_replay={replay}", f"trainer.max_steps={args.steps}",
        f"trainer.seed={seed}", f"data.seed={seed}", f"trainer.lr={args.lr}",
        f"trainer.eval_interval={args.steps}", f"trainer.save_interval={args.steps}",
        f"trainer.run_dir={run_dir}", *args.overrides,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1]
    evals = [r for r in rows if "eval/accuracy" in r]

    def mean(key: str, part=steps) -> float | None:
        vals = [r[key] for r in part if key in r]
        return statistics.fmean(vals) if vals else None

    return {
        "algorithm": args.algorithm,
        "routing_replay": replay,
        "seed": seed,
        "steps": len(steps),
        "clip_fraction": mean("clip_fraction"),
        "routing_replay_flips": mean("moe/routing_replay_flips"),
        "rollout_route_flips": mean("moe/rollout_route_flips"),
        "logprob_abs_diff_mean": mean("rollout/logprob_abs_diff/mean"),
        "logprob_abs_diff_max": mean("rollout/logprob_abs_diff/max"),
        "reward_first10": mean("reward/mean", steps[:10]),
        "reward_last10": mean("reward/mean", steps[-10:]),
        "eval_accuracy_start": evals[0]["eval/accuracy"] if evals else None,
        "eval_accuracy_end": evals[-1]["eval/accuracy"] if evals else None,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="a qwen3_moe folder (tools/make_demo_model.py)")
    p.add_argument("--work-dir", default="/tmp/bench_routing_replay")
    p.add_argument("--algorithm", default="grpo")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--arms", nargs="+", default=["off", "old", "rollout"],
                   choices=["off", "old", "rollout"], help="model.moe.routing_replay values")
    p.add_argument("--overrides", nargs="*", default=[], help="more trainer overrides")
    args = p.parse_args(argv)
    if json.loads((Path(args.model) / "config.json").read_text()).get("model_type") != "qwen3_moe":
        p.error(f"--model {args.model}: not a qwen3_moe folder")
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for replay in args.arms:
            result = run(args, replay, seed)
            print(json.dumps(result), flush=True)
            results.setdefault(replay, []).append(result)
    for replay, rs in results.items():
        summary = {"arm": f"{args.algorithm} routing_replay={replay}", "seeds": len(rs)}
        for key in rs[0]:
            vals = [r[key] for r in rs if isinstance(r[key], float)]
            if vals and key != "seed":
                summary[key] = float(f"{statistics.fmean(vals):.4g}")
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
