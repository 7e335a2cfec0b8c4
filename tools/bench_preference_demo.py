"""Preference benchmark: DPO vs GR-DPO (or any variants), held-out preference accuracy per domain.

Runs ``python -m megatron_gvpo.train algorithm=<a> data=preference_demo ...`` (or, with
``--data-dir DIR``, ``data=preference data.path=DIR/train.jsonl data.eval_path=DIR/eval.jsonl``,
e.g. a set written by ``tools/robust_sets.py``) for each seed and variant (same steps, same data
per seed), reads the final ``eval/`` metrics from each run's metrics.jsonl and prints a Markdown
table per run and a summary (mean +- std over seeds) per variant::

    OMP_NUM_THREADS=1 python tools/bench_preference_demo.py --seeds 0 1 2 --steps 100 \\
        --out runs/bench_preference

Variants are ``name[:key=value,...]``, e.g. ``gr_dpo:algorithm.robust_eta=0.1``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(
    variant: str, seed: int, steps: int, out: Path, extra: list[str], data_dir: Path | None = None
) -> dict:
    name, _, kv = variant.partition(":")
    overrides = [x for x in kv.split(",") if x]
    tag = variant.replace(":", "_").replace("=", "").replace(",", "_").replace("algorithm.", "")
    run_dir = out / f"{tag}_seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "megatron_gvpo.train",
        f"algorithm={name}",
        *(
            ["data=preference_demo"]
            if data_dir is None
            else [
                "data=preference",
                f"data.path={data_dir.resolve() / 'train.jsonl'}",
                f"data.eval_path={data_dir.resolve() / 'eval.jsonl'}",
            ]
        ),
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
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    last = json.loads(metrics.read_text().splitlines()[-1])
    return {k[len("eval/preference/") :]: v for k, v in last.items() if k.startswith("eval/")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--variants", nargs="+", default=["dpo", "gr_dpo"])
    p.add_argument("--data-dir", type=Path, default=None, help="train.jsonl + eval.jsonl")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--out", type=Path, default=Path("runs/bench_preference"))
    p.add_argument("extra", nargs="*", help="more Hydra overrides for every run")
    args = p.parse_args()
    jobs = [(seed, v) for seed in args.seeds for v in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        evs = pool.map(
            lambda j: run(j[1], j[0], args.steps, args.out, args.extra, args.data_dir), jobs
        )
        rows = []
        for (seed, variant), ev in zip(jobs, evs, strict=True):
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
    print()
    print("| objective | " + " | ".join(head[2:]) + " |")
    print("|" + "---|" * (len(head) - 1))
    keys = [*(f"accuracy/{g}" for g in groups), "accuracy/worst", "accuracy"]
    for variant in args.variants:
        cells = [variant]
        for k in keys:
            vals = [ev[k] for _, v, ev in rows if v == variant]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
