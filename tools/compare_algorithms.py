"""GVPO against the GRPO family on the embedded demo, judged on held-out evaluation.

    python tools/compare_algorithms.py --seeds 0,1,2 --lrs 1e-4,3e-4,1e-3 --out runs/compare/sweep.json
    python tools/compare_algorithms.py --seeds 0,1,2,3,4 --arm-lrs gvpo=3e-4,grpo=1e-3 --reuse

Every run is an independent ``python -m megatron_gvpo.train`` subprocess on the demo config (README
command 1) with ``OMP_NUM_THREADS=1``, at most ``--jobs`` at a time. For a given seed every arm
sees the same prompts in the same order (``data.seed``), the same prompts per step, responses per
prompt and steps, and the same per-request sampling seeds (``trainer.seed``): equal rollouts.
Arms differ only in ``algorithm.*``, the overrides listed in ``ARMS`` and the learning rate.

The figures are the runs' own evaluation (``trainer/evaluate.py``), read from ``metrics.jsonl``:
one held-out set (500 distinct held-out pairs of the demo task, the same file for every run),
scored greedily (``eval/accuracy``) and, as the named set ``sampled``, its first 200 prompts with
``--pass-k`` responses each at temperature 1 (``eval/sampled/pass@k``, ``eval/sampled/accuracy``
= pass@1). Evaluations run at step 0, midway and at the end (``trainer.eval_interval`` =
steps / 2).

Each arm's learning rate is the one of ``--lrs`` (or ``--arm-lrs``) with the best mean final greedy
accuracy over the seeds. Prints a Markdown table per learning rate (the sweep) and one at each
arm's best learning rate: mean ± sample std over seeds, min..max. ``--reuse`` keeps finished runs
found under ``--run-root``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_gvpo.demo.task import write_jsonl  # noqa: E402
from megatron_gvpo.trainer.data import toy_eval_rows  # noqa: E402

# Arm name -> Hydra overrides on top of the demo config. Defaults of each algorithm otherwise.
ARMS: dict[str, list[str]] = {
    "gvpo": ["algorithm=gvpo", "trainer.updates_per_round=1"],  # beta 0.1, centred REINFORCE
    "gvpo_u4": ["algorithm=gvpo", "trainer.updates_per_round=4"],  # the paper's 4 per rollout
    # clip 0.2, std advantages, k3 KL 0.04 to the initial policy
    "grpo": ["algorithm=grpo", "trainer.updates_per_round=1"],
    "dr_grpo": ["algorithm=dr_grpo", "trainer.updates_per_round=1"],
    # DAPO with dynamic sampling, as configs/algorithm/dapo.yaml says to use it
    "dapo": ["algorithm=dapo", "trainer.dynamic_sampling=true", "trainer.updates_per_round=1"],
    "gspo": ["algorithm=gspo", "trainer.updates_per_round=1"],
    # a diagnostic: GRPO with the paper's 4 updates per rollout (its ratio clip then acts)
    "grpo_u4": ["algorithm=grpo", "trainer.updates_per_round=4"],
}
EVAL_PROMPTS = 500
SAMPLED_PROMPTS = 200


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_files(root: Path) -> tuple[Path, Path]:
    """The greedy set and the sampled (pass@k) set, written once for every run."""
    rows = toy_eval_rows(EVAL_PROMPTS, seed=0)
    return (
        write_jsonl(rows, root / "eval_greedy.jsonl"),
        write_jsonl(rows[:SAMPLED_PROMPTS], root / "eval_sampled.jsonl"),
    )


def run_one(arm: str, lr: float, seed: int, args, files: tuple[Path, Path]) -> dict:
    """Train one arm at one lr and seed (unless ``--reuse`` finds it done); its eval rows."""
    run_dir = Path(args.run_root) / f"{arm}_lr{lr:g}_s{seed}"
    done = any(r.get("step") == args.steps and "eval/accuracy" in r for r in read_metrics(run_dir))
    wall = None
    if not (args.reuse and done):
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        greedy, sampled = files
        sampled_set = f"{{path: {sampled}, temperature: 1.0, n_samples: {args.pass_k}}}"
        cmd = [
            sys.executable, "-m", "megatron_gvpo.train",
            f"trainer.run_dir={run_dir}",
            f"trainer.seed={seed}",
            f"data.seed={seed}",
            f"trainer.max_steps={args.steps}",
            f"trainer.lr={lr}",
            f"trainer.eval_interval={args.steps // 2}",
            f"trainer.save_interval={args.steps}",
            "trainer.keep_last=1",
            "trainer.plot=false",
            f"data.eval_path={greedy}",
            f"+data.eval_sets={{sampled: {sampled_set}}}",
            *ARMS[arm],
            *args.override,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{arm} lr {lr} seed {seed} failed (rc {proc.returncode}): {log.name}")
    rows = read_metrics(run_dir)
    evals = {r["step"]: r for r in rows if "eval/accuracy" in r}
    train = [r for r in rows if "reward/mean" in r]
    k = args.pass_k
    out = {
        "arm": arm,
        "lr": lr,
        "seed": seed,
        "run_dir": str(run_dir),
        "overrides": ARMS[arm] + [f"trainer.lr={lr:g}"] + list(args.override),
        "wall_s": wall,
        "eval": {
            step: {
                "greedy_acc": r["eval/accuracy"],
                "pass@1": r["eval/sampled/accuracy"],
                f"pass@{k}": r[f"eval/sampled/pass@{k}"],
            }
            for step, r in sorted(evals.items())
        },
        "first10_reward": statistics.fmean(r["reward/mean"] for r in train[:10]),
        "last10_reward": statistics.fmean(r["reward/mean"] for r in train[-10:]),
        "grad_norm_step1": train[0].get("grad_norm"),
        "step_s": statistics.fmean(r["time/step"] for r in train),
    }
    end = out["eval"][args.steps]
    print(
        f"{arm:>8} lr {lr:g} seed {seed}: held-out greedy {out['eval'][0]['greedy_acc']:.3f} -> "
        f"{end['greedy_acc']:.3f}, pass@{k} {end[f'pass@{k}']:.3f} ({wall or 0:.0f} s)",
        flush=True,
    )
    return out


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f} ({min(values):.3f}..{max(values):.3f})"


def table(results: list[dict], steps: int, k: int) -> str:
    mid = steps // 2
    lines = [
        f"| arm | lr | seeds | greedy acc, step 0 | greedy acc, step {mid} | greedy acc, step {steps} "
        f"| pass@1, step {steps} | pass@{k}, step 0 | pass@{k}, step {steps} | last-10 reward | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r["arm"], r["lr"]) for r in results)
    for arm, lr in keys:
        rs = [r for r in results if (r["arm"], r["lr"]) == (arm, lr)]

        def at(step: int, key: str, rs=rs) -> str:
            return spread([r["eval"][step][key] for r in rs])

        lines.append(
            f"| {arm} | {lr:g} | {len(rs)} | {at(0, 'greedy_acc')} | {at(mid, 'greedy_acc')} | "
            f"{at(steps, 'greedy_acc')} | {at(steps, 'pass@1')} | {at(0, f'pass@{k}')} | "
            f"{at(steps, f'pass@{k}')} | {spread([r['last10_reward'] for r in rs])} | "
            f"{statistics.fmean(r['step_s'] for r in rs):.2f} |"
        )
    return "\n".join(lines)


def best_lrs(results: list[dict], steps: int) -> dict[str, float]:
    """Each arm's lr with the best mean final greedy accuracy (ties: the smaller lr)."""
    best: dict[str, tuple[float, float]] = {}
    for arm, lr in sorted(dict.fromkeys((r["arm"], r["lr"]) for r in results)):
        acc = statistics.fmean(
            r["eval"][steps]["greedy_acc"] for r in results if (r["arm"], r["lr"]) == (arm, lr)
        )
        if arm not in best or acc > best[arm][1]:
            best[arm] = (lr, acc)
    return {arm: lr for arm, (lr, _) in best.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--arms", default=",".join(a for a in ARMS if a != "grpo_u4"),
        help=f"comma list of: {', '.join(ARMS)}",
    )
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="learning rates swept for every arm")
    p.add_argument(
        "--arm-lrs", default="", help="arm=lr,...: run these arms at this lr only (not --lrs)"
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=60, help="trainer.max_steps of every run")
    p.add_argument("--pass-k", type=int, default=8, help="responses per prompt of the sampled set")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--run-root", default="runs/compare")
    p.add_argument("--out", default=None, help="JSON of every run (default <run-root>/results.json)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs under --run-root")
    p.add_argument(
        "--override", action="append", default=[], help="extra Hydra override for every arm"
    )
    args = p.parse_args()
    arm_lrs = dict(x.split("=") for x in args.arm_lrs.split(",") if x)
    arms = list(arm_lrs) or [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"--arms/--arm-lrs: unknown {unknown}; known: {', '.join(ARMS)}")
    if args.steps < 10 or args.steps % 2:
        p.error("--steps must be an even number >= 10 (evaluated at 0, steps/2, steps)")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    root = Path(args.run_root)
    root.mkdir(parents=True, exist_ok=True)
    files = eval_files(root)

    jobs = [
        (a, lr, s)
        for s in seeds  # seed-major: partial results stay balanced
        for a in arms
        for lr in ([float(arm_lrs[a])] if a in arm_lrs else lrs)
    ]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda j: run_one(*j, args, files), jobs))
    elapsed = time.perf_counter() - start
    out = Path(args.out or root / "results.json")
    best = best_lrs(results, args.steps)
    out.write_text(
        json.dumps(
            {"steps": args.steps, "seeds": seeds, "pass_k": args.pass_k, "best_lr": best,
             "wall_s": elapsed, "runs": results},
            indent=1,
        )
    )  # fmt: skip
    print(f"\n{len(jobs)} runs in {elapsed / 60:.1f} min; figures in {out}\n")
    print("All learning rates:\n")
    print(table(results, args.steps, args.pass_k))
    print("\nEach arm at its best learning rate:\n")
    at_best = [r for r in results if best[r["arm"]] == r["lr"]]
    print(table(at_best, args.steps, args.pass_k))


if __name__ == "__main__":
    main()
