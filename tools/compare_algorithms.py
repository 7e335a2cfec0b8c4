"""GVPO against the GRPO family on the embedded demo, at equal rollouts, over several seeds.

    python tools/compare_algorithms.py --steps 100 --seeds 0,1,2,3,4 --out runs/compare/results.json

Every run is an independent ``python -m megatron_gvpo.train`` subprocess on the demo config (README
command 1) with ``OMP_NUM_THREADS=1``, at most ``--jobs`` at a time. For a given seed every arm
sees the same prompts in the same order (``data.seed``), the same prompts per step, responses per
prompt and steps, and the same per-request sampling seeds (``trainer.seed``); arms differ only in
``algorithm.*`` and the overrides listed in ``ARMS``.

Two figures per run:

- ``last10_reward``: the mean of ``reward/mean`` (the sampled rollouts' reward) over the last 10
  steps, from the run's ``metrics.jsonl``;
- ``heldout_greedy_acc`` (and ``heldout_greedy_reward``): greedy decoding of the final policy
  (the HF export of the last checkpoint, loaded by transformers) on held-out prompts, scored by
  the demo reward. Held-out prompts are the pairs of the demo task's held-out split (never in the
  warm-start data) that appear in none of the runs' RL prompt files, so no run trains on them.

Prints a Markdown table (mean, sample std and min..max over seeds) and writes every run's figures
to ``--out`` (JSON). ``--reuse`` keeps finished runs found under ``--run-root``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_gvpo.demo.task import (  # noqa: E402
    generate_toy_dataset,
    is_heldout,
    toy_prompt,
    toy_reward,
)
from megatron_gvpo.trainer.data import DataSection  # noqa: E402

# Arm name -> Hydra overrides on top of the demo config. Defaults of each algorithm otherwise.
ARMS: dict[str, list[str]] = {
    "gvpo": ["algorithm=gvpo"],  # beta 0.1 (the paper's), 1 update per rollout
    "gvpo_u4": ["algorithm=gvpo", "trainer.updates_per_round=4"],  # the paper's 4 per rollout
    "grpo": ["algorithm=grpo"],  # clip 0.2, std advantages, k3 KL 0.04 to the initial policy
    "dr_grpo": ["algorithm=dr_grpo"],
    # DAPO with dynamic sampling, as configs/algorithm/dapo.yaml says to use it
    "dapo": ["algorithm=dapo", "trainer.dynamic_sampling=true"],
}
# Ablations that look for why arms differ (docs/benchmarks.md); run with --arms.
DIAGNOSTIC_ARMS: dict[str, list[str]] = {
    "grpo_nokl": ["algorithm=grpo", "algorithm.kl_beta=0"],
    "grpo_u4": ["algorithm=grpo", "trainer.updates_per_round=4"],
    "gvpo_u4_beta1": ["algorithm=gvpo", "trainer.updates_per_round=4", "algorithm.beta=1.0"],
    # 4 Adam steps per rollout move the policy about 4x as far: the same lr / 4
    "gvpo_u4_lr2.5e-4": ["algorithm=gvpo", "trainer.updates_per_round=4", "trainer.lr=2.5e-4"],
    "grpo_u4_lr2.5e-4": ["algorithm=grpo", "trainer.updates_per_round=4", "trainer.lr=2.5e-4"],
    "dr_grpo_u4_lr2.5e-4": ["algorithm=dr_grpo", "trainer.updates_per_round=4", "trainer.lr=2.5e-4"],
    # the lower lr alone, one update per rollout
    "gvpo_lr2.5e-4": ["algorithm=gvpo", "trainer.lr=2.5e-4"],
    "grpo_lr2.5e-4": ["algorithm=grpo", "trainer.lr=2.5e-4"],
    "grpo_nokl_lr2.5e-4": ["algorithm=grpo", "algorithm.kl_beta=0", "trainer.lr=2.5e-4"],
    "dr_grpo_lr2.5e-4": ["algorithm=dr_grpo", "trainer.lr=2.5e-4"],
    # With one update per rollout GVPO's gradient is Dr.GRPO's times
    # beta * max_new_tokens * samples / ((k - 1) * groups) = 0.1 * 4 * 128 / (7 * 16) = 0.457 on
    # the demo; Adam is blind to that factor except through clip_grad, scaled here to match.
    "gvpo_clip0.457": ["algorithm=gvpo", "trainer.clip_grad=0.457"],
}
ALL_ARMS = {**ARMS, **DIAGNOSTIC_ARMS}
DIGITS = 2
DATA_ROWS = DataSection().builtin_size  # rows of each run's RL prompt file (data.builtin_size)


def heldout_rows(seeds: list[int]) -> list[dict[str, str]]:
    """Held-out-split pairs (not in warm-start training) absent from every seed's RL prompts."""
    used = set()
    for s in seeds:
        used.update(r["prompt"] for r in generate_toy_dataset(DATA_ROWS, seed=s, digits=DIGITS))
    hi = 10**DIGITS
    rows = []
    for a in range(hi):
        for b in range(hi):
            p = toy_prompt(a, b, DIGITS)
            if is_heldout(a, b, DIGITS) and p not in used:
                rows.append({"prompt": p, "answer": str(a + b)})
    return rows


_EVAL_LOCK = threading.Lock()


def greedy_eval(hf_path: Path, rows: list[dict[str, str]]) -> dict[str, float]:
    """Greedy accuracy (exact answers) and mean reward of the HF model at ``hf_path``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from megatron_gvpo.data.tokenizer import load_tokenizer
    from megatron_gvpo.demo.model import sample_answers

    with _EVAL_LOCK:  # one evaluation at a time: the runs own the cores
        torch.set_num_threads(1)
        hf_logging.disable_progress_bar()
        tok = load_tokenizer(hf_path)
        model = AutoModelForCausalLM.from_pretrained(str(hf_path), dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(0)  # unused at temperature 0
        texts = sample_answers(model, tok, [r["prompt"] for r in rows], 0.0, gen)
    rewards = [toy_reward(t, r["answer"]) for t, r in zip(texts, rows, strict=True)]
    return {
        "heldout_greedy_acc": sum(x == 1.0 for x in rewards) / len(rows),
        "heldout_greedy_reward": sum(rewards) / len(rows),
    }


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_hf(run_dir: Path, steps: int) -> Path:
    return run_dir / "checkpoints" / f"step_{steps:06d}" / "hf"


def run_one(arm: str, seed: int, args, rows) -> dict:
    """Train one arm at one seed (unless ``--reuse`` finds it done), then score it."""
    run_dir = Path(args.run_root) / f"{arm}_s{seed}"
    hf = final_hf(run_dir, args.steps)
    done = len(read_metrics(run_dir)) >= args.steps and (hf / "config.json").is_file()
    wall = None
    if not (args.reuse and done):
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cmd = [
            sys.executable, "-m", "megatron_gvpo.train",
            f"trainer.run_dir={run_dir}",
            f"trainer.seed={seed}",
            f"data.seed={seed}",
            f"trainer.max_steps={args.steps}",
            f"trainer.save_interval={args.steps}",
            "trainer.keep_last=1",
            "trainer.export_hf=true",
            "trainer.plot=false",
            *ALL_ARMS[arm],
            *args.override,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{arm} seed {seed} failed (rc {proc.returncode}): see {log.name}")
    train_file = run_dir / "data" / "toy_addition.jsonl"
    trained = {json.loads(line)["prompt"] for line in train_file.read_text().splitlines() if line}
    leaked = trained & {r["prompt"] for r in rows}
    if leaked:  # e.g. a data.builtin_size or data.seed override the held-out set did not expect
        raise RuntimeError(f"{train_file} holds held-out prompts: {sorted(leaked)[:5]}")
    metrics = read_metrics(run_dir)[: args.steps]
    rewards = [m["reward/mean"] for m in metrics]
    out = {
        "arm": arm,
        "seed": seed,
        "run_dir": str(run_dir),
        "overrides": ALL_ARMS[arm] + list(args.override),
        "wall_s": wall,
        "first_reward": rewards[0],
        "last10_reward": statistics.fmean(rewards[-10:]),
        "reward_curve": rewards,
        # before clipping; the mean over the round's updates when there are several
        "grad_norm_step1": metrics[0].get("grad_norm"),
        "step_s": statistics.fmean(m["time/step"] for m in metrics),
    }
    out.update(greedy_eval(hf, rows))
    print(
        f"{arm:>8} seed {seed}: last10 {out['last10_reward']:.3f} heldout greedy acc "
        f"{out['heldout_greedy_acc']:.3f} ({wall or 0:.0f} s)",
        flush=True,
    )
    return out


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f} ({min(values):.3f}..{max(values):.3f})"


def table(results: list[dict], baseline: dict[str, float]) -> str:
    lines = [
        "| arm | overrides | last-10 reward | held-out greedy acc | held-out greedy reward | "
        "grad norm, step 1 | s/step |",
        "|---|---|---|---|---|---|---|",
        f"| initial policy | - | - | {baseline['heldout_greedy_acc']:.3f} | "
        f"{baseline['heldout_greedy_reward']:.3f} | - | - |",
    ]
    for arm in dict.fromkeys(r["arm"] for r in results):
        rs = [r for r in results if r["arm"] == arm]
        over = " ".join(f"`{o}`" for o in rs[0]["overrides"])
        lines.append(
            f"| {arm} (n={len(rs)}) | {over} | {spread([r['last10_reward'] for r in rs])} | "
            f"{spread([r['heldout_greedy_acc'] for r in rs])} | "
            f"{spread([r['heldout_greedy_reward'] for r in rs])} | "
            f"{statistics.fmean(r['grad_norm_step1'] for r in rs):.3g} | "
            f"{statistics.fmean(r['step_s'] for r in rs):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--arms", default=",".join(ARMS), help=f"comma list of: {', '.join(ALL_ARMS)}"
    )
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=100, help="trainer.max_steps of every run")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--run-root", default="runs/compare")
    p.add_argument("--out", default=None, help="JSON of every run (default <run-root>/results.json)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs under --run-root")
    p.add_argument(
        "--override", action="append", default=[], help="extra Hydra override for every arm"
    )
    args = p.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ALL_ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; known: {', '.join(ALL_ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.steps < 10:
        p.error("--steps must be >= 10 (the last-10 mean)")
    rows = heldout_rows(seeds)
    Path(args.run_root).mkdir(parents=True, exist_ok=True)

    from megatron_gvpo.demo.model import demo_model_path

    cache = os.environ.get("MEGATRON_GVPO_CACHE", "~/.cache/megatron_gvpo")
    baseline = greedy_eval(demo_model_path(cache), rows)
    print(f"{len(rows)} held-out prompts; initial policy: {baseline}", flush=True)

    jobs = [(a, s) for s in seeds for a in arms]  # seed-major: partial results stay balanced
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda j: run_one(j[0], j[1], args, rows), jobs))
    elapsed = time.perf_counter() - start
    out = Path(args.out or Path(args.run_root) / "results.json")
    out.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "seeds": seeds,
                "heldout_prompts": len(rows),
                "baseline": baseline,
                "wall_s": elapsed,
                "runs": results,
            },
            indent=1,
        )
    )
    print(f"\n{len(jobs)} runs in {elapsed / 60:.1f} min; figures in {out}\n")
    print(table(results, baseline))


if __name__ == "__main__":
    main()
