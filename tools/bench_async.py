"""Async rollout and engine/trainer mismatch on the demo, several seeds, arms interleaved.

    flock /tmp/bench.lock python tools/bench_async.py async     # sync vs max_staleness 1, 2
    python tools/bench_async.py mismatch                        # GVPO, GRPO, GRPO+TIS, bf16 engine
    python tools/bench_async.py mismatch --perturb temperature=1.5 --seeds 1 2 3
    python tools/bench_async.py async --arms sync max_staleness=1 --extra trainer.lr=3e-4 --tag _lr3e-4

``async`` reports times: run it under the lock. ``mismatch`` (and ``async``'s reward columns)
report rewards and logprob gaps, which are the same for the same seed whatever the load.
Results are appended to ``<out>/<mode>.jsonl`` (seeds may be run in separate calls, e.g. one
locked call per seed); the table printed at the end covers every seed in that file.

Each run is README's main command (``python -m megatron_gvpo.train``: the demo, GVPO, 60 steps)
with ``trainer.seed`` and ``data.seed`` set to the seed and the arm's overrides, in its own
process with ``OMP_NUM_THREADS=1`` (the engine's process too). Arms run interleaved within each
seed (A, B, C, A, B, C, ...) so machine load hits all of them.

``async`` reports per arm: loop seconds (the sum of ``time/step``: rollout wait, logprobs,
updates, sync; start-up and checkpoint writes excluded, they are the same for every arm; the
engine process's start-up is in the process wall time), steps per minute, the actor's wait on
the rollout per step, the first-10 and last-10 mean reward, the reward gain per loop minute, and
the last-10 reward at equal wall time (the steps done by the time the fastest run of the seed
finished). ``mismatch`` reports per arm the last-10 and final reward and the engine/actor
logprob gap (``rollout/logprob_abs_diff``), with the TIS weights where used. Both report the
run's own held-out greedy accuracy (``eval/accuracy``: at step 0, midway, at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ASYNC_ARMS = {
    "sync": [],
    "max_staleness=1": ["trainer.async_training.max_staleness=1"],
    "max_staleness=2": ["trainer.async_training.max_staleness=2"],
}


def mismatch_arms(perturb: str) -> dict[str, list[str]]:
    """GVPO and GRPO on the exact engine, and GVPO, GRPO, GRPO+TIS on the perturbed one."""
    if perturb == "bf16":
        bad = ["rollout.local.sampling_dtype=bfloat16"]
    elif perturb.startswith("temperature="):
        bad = [f"rollout.temperature={perturb.split('=')[1]}", "algorithm.temperature=1.0"]
    else:
        raise SystemExit(f"--perturb {perturb!r}: bf16 or temperature=<T>")
    grpo = ["algorithm=grpo"]
    return {
        "gvpo exact": [],
        "grpo exact": grpo,
        f"gvpo {perturb}": bad,
        f"grpo {perturb}": grpo + bad,
        f"grpo+tis {perturb}": grpo + bad + ["algorithm.use_tis=true"],
    }


def run(out: Path, arm: str, seed: int, overrides: list[str], steps: int) -> dict:
    """One training run; its metrics rows and process wall time."""
    run_dir = out / f"{_safe(arm)}_seed{seed}"
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable, "-m", "megatron_gvpo.train", f"trainer.run_dir={run_dir}",
        f"trainer.seed={seed}", f"data.seed={seed}", f"trainer.max_steps={steps}",
        "trainer.plot=false", f"trainer.eval_interval={steps // 2}", *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    return {"rows": [r for r in rows if r["step"] >= 1], "evals": evals, "wall_s": wall}


def heldout(runs: dict) -> dict[str, float]:
    """Held-out greedy accuracy at step 0, at the middle evaluation and at the end."""
    steps = sorted(runs["evals"])
    return {
        "heldout_start": runs["evals"][steps[0]],
        "heldout_mid": runs["evals"][steps[len(steps) // 2]],
        "heldout_end": runs["evals"][steps[-1]],
    }


def _safe(name: str) -> str:
    """A path part Hydra's override grammar takes (no '=', spaces, ...)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarise_async(runs: dict) -> dict:
    rows = runs["rows"]
    loop = [r["time/step"] for r in rows]
    reward = [r["reward/mean"] for r in rows]
    minutes = sum(loop) / 60
    return {
        "loop_s": sum(loop),
        "wall_s": runs["wall_s"],
        "steps_per_min": len(rows) / minutes,
        "wait_s_per_step": _mean([r["time/actor_wait"] for r in rows]),
        "first10": _mean(reward[:10]),
        "last10": _mean(reward[-10:]),
        "gain_per_min": (_mean(reward[-10:]) - _mean(reward[:10])) / minutes,
        "staleness_mean": _mean([r.get("async/staleness_mean", 0.0) for r in rows]),
        "dropped": sum(r.get("async/dropped_stale", 0) for r in rows),
        **heldout(runs),
        "cum": [sum(loop[: i + 1]) for i in range(len(loop))],
        "reward": reward,
    }


def summarise_mismatch(runs: dict) -> dict:
    rows = runs["rows"]
    reward = [r["reward/mean"] for r in rows]
    out = {
        "first10": _mean(reward[:10]),
        "last10": _mean(reward[-10:]),
        "final": reward[-1],
        "lp_diff_mean": _mean([r["rollout/logprob_abs_diff/mean"] for r in rows]),
        "lp_diff_max": max(r["rollout/logprob_abs_diff/max"] for r in rows),
        **heldout(runs),
    }
    if "tis_mean" in rows[0]:
        out["tis_mean"] = _mean([r["tis_mean"] for r in rows])
        out["tis_clip_fraction"] = _mean([r["tis_clip_fraction"] for r in rows])
    return out


def spread(xs: list[float]) -> str:
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {s:.3f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["async", "mismatch"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--perturb", default="bf16", help="mismatch: bf16 or temperature=<T>")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_async")
    p.add_argument("--table", action="store_true", help="only print the table of --out's log")
    p.add_argument("--arms", nargs="+", help="run only these arms (names as in the table)")
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every arm")
    p.add_argument("--tag", default="", help="suffix of the log's name (runs with --extra)")
    args = p.parse_args(argv)
    arms = ASYNC_ARMS if args.mode == "async" else mismatch_arms(args.perturb)
    if args.arms:
        arms = {a: arms[a] for a in args.arms}
    arms = {a: o + args.extra for a, o in arms.items()}
    tag = (args.mode if args.mode == "async" else f"mismatch_{args.perturb}") + args.tag
    log = args.out / f"{tag}.jsonl"  # appended: seeds may be run in separate locked calls
    log.parent.mkdir(parents=True, exist_ok=True)
    if args.table:
        print_table(log, list(arms))
        return
    for seed in args.seeds:
        per_seed = {}
        for arm, overrides in arms.items():  # interleaved: every arm once per seed
            per_seed[arm] = run(args.out / _safe(tag), arm, seed, overrides, args.steps)
            print(f"seed {seed} {arm}: {per_seed[arm]['wall_s']:.1f}s", file=sys.stderr)
        if args.mode == "async":
            stats = {a: summarise_async(r) for a, r in per_seed.items()}
            t_eq = min(s["loop_s"] for s in stats.values())  # the fastest run's loop time
            for s in stats.values():
                n = sum(1 for c in s["cum"] if c <= t_eq + 1e-9)
                s["last10_at_equal_time"] = _mean(s["reward"][max(0, n - 10) : n])
                s["steps_at_equal_time"] = n
                del s["cum"], s["reward"]
        else:
            stats = {a: summarise_mismatch(r) for a, r in per_seed.items()}
        with open(log, "a") as f:
            for a, s in stats.items():
                line = json.dumps({"mode": args.mode, "arm": a, "seed": seed, **s})
                print(line)
                f.write(line + "\n")
    print_table(log, list(arms))


def print_table(log: Path, arms: list[str]) -> None:
    """Mean ± std over the seeds in ``log`` (every seed run so far, also by earlier calls)."""
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        if r["arm"] in results:
            results[r["arm"]].append(r)
    seeds = sorted({r["seed"] for rs in results.values() for r in rs})
    skip = ("mode", "arm", "seed")
    keys = list(dict.fromkeys(k for rs in results.values() for r in rs for k in r if k not in skip))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{log.stem}: seeds {seeds}, {machine}; mean ± std over seeds")
    print("| arm | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for a, rs in results.items():
        cells = [spread([r[k] for r in rs]) if rs and k in rs[0] else "" for k in keys]
        print(f"| {a} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
