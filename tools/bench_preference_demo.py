"""The preference demo's benchmark: DPO vs GR-DPO, held-out preference accuracy per group.

Runs ``python -m megatron_gvpo.train algorithm=<a> data=preference_demo ...`` for each seed and
objective (same steps, same data and order per seed), reads the final ``eval/`` metrics from each
run's metrics.jsonl and prints a Markdown table (per seed, per group, both objectives)::

    OMP_NUM_THREADS=1 python tools/bench_preference_demo.py --seeds 0 1 2 --steps 100 \\
        --out runs/bench_preference

Variants are ``name[:key=value,...]``, e.g. ``gr_dpo:algorithm.robust_eta=0.1``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(variant: str, seed: int, steps: int, out: Path, extra: list[str]) -> dict:
    name, _, kv = variant.partition(":")
    overrides = [x for x in kv.split(",") if x]
    run_dir = out / f"{variant.replace(':', '_').replace('=', '')}_seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "megatron_gvpo.train",
        f"algorithm={name}",
        "data=preference_demo",
        f"data.seed={seed}",
        f"trainer.seed={seed}",
        f"trainer.max_steps={steps}",
        f"trainer.run_dir={run_dir}",
        *overrides,
        *extra,
    ]
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or len(metrics.read_text().splitlines()) < steps:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    last = json.loads(metrics.read_text().splitlines()[-1])
    return {k[len("eval/preference/") :]: v for k, v in last.items() if k.startswith("eval/")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--variants", nargs="+", default=["dpo", "gr_dpo"])
    p.add_argument("--out", type=Path, default=Path("runs/bench_preference"))
    p.add_argument("extra", nargs="*", help="more Hydra overrides for every run")
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            ev = run(variant, seed, args.steps, args.out, args.extra)
            rows.append((seed, variant, ev))
            print(json.dumps({"seed": seed, "variant": variant, **ev}), flush=True)
    groups = sorted(
        k.split("/")[1] for k in rows[0][2] if k.startswith("accuracy/") and k != "accuracy/worst"
    )
    head = ["seed", "objective", *(f"acc {g}" for g in groups), "acc worst", "acc all"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for seed, variant, ev in rows:
        cells = [str(seed), variant, *(f"{ev[f'accuracy/{g}']:.3f}" for g in groups)]
        cells += [f"{ev['accuracy/worst']:.3f}", f"{ev['accuracy']:.3f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
