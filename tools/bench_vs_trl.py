"""Our GRPO step against Hugging Face TRL's ``GRPOTrainer`` on the same tiny task, side by side.

    python tools/bench_vs_trl.py --trl-python /work/trlvenv/bin/python [--out docs_table.json]

The task (built once under ``--work``): a tiny Qwen2 (hidden 128, 2 layers, 4 heads, tied
embeddings: about 528k parameters) with random weights and the demo's character tokenizer, saved
as an HF folder (safetensors); ``a+b=`` prompts in JSONL with the sum as ``answer``; reward 1 for
the exact answer, else 0. Both trainers run GRPO with the same settings: clip 0.2, advantages
(R - group mean) / group std, no KL term (no reference model), Adam lr 5e-5 constant, betas
(0.9, 0.999), eps 1e-8, no weight decay, gradient norm clipped to 1.0, one optimizer step per
rollout (so the old policy is the current one), fp32, sampling at temperature 1 with no top-p/k.

Each side runs as its own subprocess with ``OMP_NUM_THREADS=1`` (and one torch thread), at
8 prompts x 4 and 32 prompts x 8. A figure is the *marginal* wall time per step: (wall time of a
``--long``-step run - wall time of a ``--short``-step run) / (long - short), each run timed from
process start to exit, so start-up, the final save and shutdown cancel. ``start-up`` is the
intercept, wall(short) - short x marginal. On a loaded machine the start-up time of a process
varies by seconds and swamps the difference; the tool therefore also reports the *median step
interval*: the median time between consecutive per-step lines each side prints (our console
summary; TRL's logged dict, ``logging_steps=1``), over the long run's steps after ``--short``:
every per-step cost on both sides, none of the start-up. Arms are interleaved (ours, TRL, ours, TRL...) so load
on a shared machine hits both; ``--repeats`` > 1 takes the median per arm. Our per-phase
breakdown is the mean of ``time/*`` from ``metrics.jsonl`` over the long run's steps after the
short run's (the same steps the marginal covers). Run under ``flock /tmp/bench.lock`` on a
shared machine.

TRL is not a dependency of this project: install it into its own venv, e.g.
``python3 -m venv /work/trlvenv && /work/trlvenv/bin/pip install torch==2.13.0 'trl==1.16.*'``.
``--ours-pythonpath`` runs our side from another checkout (e.g. a ``git worktree`` of an older
commit) to measure a "before".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_SCRIPT = Path(__file__).with_name("_trl_grpo_peer.py")
SHAPES = {"8x4": (8, 4), "32x8": (32, 8)}
LR = 5e-5
CLIP_EPS = 0.2
MAX_GRAD_NORM = 1.0
SEED = 1234

REWARD_SOURCE = '''"""Exact-match reward of the bench_vs_trl task: 1.0 for the exact sum, else 0.0."""


def exact_match(sample):
    return 1.0 if sample.response.strip() == str(sample.label).strip() else 0.0
'''


def build_task(work: Path, rows: int = 6000) -> dict[str, Path]:
    """The model folder, the prompt file and our reward module under ``work`` (kept if present)."""
    sys.path.insert(0, str(REPO))
    from megatron_gvpo.demo.task import save_char_tokenizer
    from megatron_gvpo.models.tiny import save_tiny_hf_model

    model = work / "model"
    data = work / "prompts.jsonl"
    reward = work / "exact_reward.py"
    if not (model / "model.safetensors").is_file():
        tok = save_char_tokenizer(model)
        save_tiny_hf_model(
            model,
            "qwen2",
            seed=0,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=len(tok),
            max_position_embeddings=64,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        save_char_tokenizer(model)  # after the model: its files must stay the tokenizer's
    if not data.is_file():
        rng = random.Random(0)
        with data.open("w") as f:
            for _ in range(rows):
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    reward.write_text(REWARD_SOURCE)
    return {"model": model, "data": data, "reward": reward}


def _env(threads: int, pythonpath: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def ours_command(args, task, shape: str, steps: int, run_dir: Path) -> list[str]:
    prompts, k = SHAPES[shape]
    reward = f"[{{name:'{task['reward']}:exact_match',timeout_s:null}}]"
    return [
        args.ours_python,
        "-m",
        "megatron_gvpo.train",
        "model=hf",
        "data=jsonl",
        "rollout=local",
        "algorithm=grpo",
        f"model.path={task['model']}",
        "model.precision=fp32",
        f"data.path={task['data']}",
        "data.apply_chat_template=false",
        "data.shuffle=true",
        f"reward.rewards={reward}",
        f"rollout.n_samples_per_prompt={k}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "rollout.temperature=1.0",
        f"trainer.prompts_per_step={prompts}",
        "trainer.updates_per_round=1",
        f"trainer.max_steps={steps}",
        f"trainer.lr={LR}",
        f"trainer.min_lr={LR}",
        "trainer.lr_decay_style=constant",
        "trainer.weight_decay=0.0",
        f"trainer.clip_grad={MAX_GRAD_NORM}",
        "trainer.adam_beta2=0.999",
        f"trainer.seed={SEED}",
        f"trainer.save_interval={steps}",
        "trainer.plot=false",
        f"trainer.run_dir={run_dir}",
        f"algorithm.eps_low={CLIP_EPS}",
        f"algorithm.eps_high={CLIP_EPS}",
        "algorithm.kl_beta=0.0",
    ]


def trl_command(args, task, shape: str, steps: int, run_dir: Path) -> list[str]:
    prompts, k = SHAPES[shape]
    return [
        args.trl_python,
        str(TRL_SCRIPT),
        f"--model={task['model']}",
        f"--data={task['data']}",
        f"--out={run_dir}",
        f"--prompts={prompts}",
        f"--k={k}",
        f"--steps={steps}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--lr={LR}",
        f"--epsilon={CLIP_EPS}",
        f"--max-grad-norm={MAX_GRAD_NORM}",
        f"--seed={SEED}",
    ]


# A line each side prints once per optimizer step: our console summary, TRL's logged dict
# (``logging_steps=1``; with tqdm off, transformers' PrinterCallback prints it).
STEP_LINE = {"ours": re.compile(r"^step \d+:"), "trl": re.compile(r"^\{.*'step_time'")}


def timed(cmd: list[str], env: dict, log: Path, cwd: Path, step_line: re.Pattern) -> tuple:
    """Wall time of ``cmd`` from start to exit, and when each per-step line arrived."""
    t0 = time.perf_counter()
    stamps = []
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            if step_line.match(line):
                stamps.append(time.perf_counter())
            f.write(line)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {rc}; log {log}:\n{tail}")
    return wall, stamps


def median_interval(stamps: list[float], skip: int) -> float | None:
    """Median time between consecutive per-step lines after the first ``skip`` steps."""
    gaps = [b - a for a, b in zip(stamps[skip:], stamps[skip + 1 :], strict=False)]
    return statistics.median(gaps) if gaps else None


def phase_means(run_dir: Path, after_step: int) -> dict[str, float]:
    """Mean ``time/*`` of our metrics over the steps past ``after_step``."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    rows = [r for r in rows if r["step"] > after_step]
    keys = sorted({k for r in rows for k in r if k.startswith("time/")})
    return {k: statistics.mean(r.get(k, 0.0) for r in rows) for k in keys}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trl-python", required=True, help="python of a venv with trl installed")
    p.add_argument("--ours-python", default=sys.executable)
    p.add_argument("--ours-pythonpath", default=str(REPO), help="our package's checkout")
    p.add_argument("--work", default="/tmp/bench_vs_trl", help="task files and run folders")
    p.add_argument("--shapes", default="8x4,32x8", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--short", type=int, default=20)
    p.add_argument("--long", type=int, default=120)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--arms", default="ours,trl", help="ours, trl or both (comma list)")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.long <= args.short:
        p.error("--long must exceed --short")
    shapes = args.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: {s!r} is not one of {', '.join(SHAPES)}")
    arms = args.arms.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    task = build_task(work)
    # ``python -m`` puts the working directory first on sys.path: ours runs from its checkout.
    runners = {
        "ours": (ours_command, _env(args.threads, args.ours_pythonpath), Path(args.ours_pythonpath)),
        "trl": (trl_command, _env(args.threads, None), work),
    }
    results = {}
    for shape in shapes:
        walls = {(a, n): [] for a in arms for n in (args.short, args.long)}
        intervals = {a: [] for a in arms}
        phases = []
        for rep in range(args.repeats):
            for n in (args.short, args.long):
                for arm in arms:  # interleaved: ours, trl, ours, trl
                    make, env, cwd = runners[arm]
                    run_dir = work / "runs" / f"{arm}_{shape}_{n}_{rep}"
                    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
                    run_dir.mkdir(parents=True)
                    cmd = make(args, task, shape, n, run_dir)
                    log = run_dir.parent / f"{run_dir.name}.log"
                    wall, stamps = timed(cmd, env, log, cwd, STEP_LINE[arm])
                    walls[(arm, n)].append(wall)
                    if n == args.long:
                        if len(stamps) != n:
                            raise RuntimeError(f"{log}: {len(stamps)} step lines for {n} steps")
                        intervals[arm].append(median_interval(stamps, args.short))
                    print(f"{shape} {arm} {n} steps: {wall:.2f} s", flush=True)
                    if arm == "ours" and n == args.long:
                        phases.append(phase_means(run_dir, args.short))
        row = {}
        for arm in arms:
            short = statistics.median(walls[(arm, args.short)])
            long = statistics.median(walls[(arm, args.long)])
            per_step = (long - short) / (args.long - args.short)
            row[arm] = {
                "s_per_step": round(per_step, 4),
                "median_step_interval_s": round(statistics.median(intervals[arm]), 4),
                "startup_s": round(short - args.short * per_step, 2),
                "wall_short": [round(w, 2) for w in walls[(arm, args.short)]],
                "wall_long": [round(w, 2) for w in walls[(arm, args.long)]],
            }
        if phases:
            row["ours"]["phases"] = {
                k: round(statistics.median(ph[k] for ph in phases), 4) for k in phases[0]
            }
        if "ours" in row and "trl" in row:
            row["ratio"] = round(row["ours"]["s_per_step"] / row["trl"]["s_per_step"], 3)
            row["ratio_median_interval"] = round(
                row["ours"]["median_step_interval_s"] / row["trl"]["median_step_interval_s"], 3
            )
        results[shape] = row
        print(json.dumps({shape: row}), flush=True)
    line = json.dumps(results)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
