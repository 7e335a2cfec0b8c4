"""Our GRPO step against Hugging Face TRL's ``GRPOTrainer`` on the same task, side by side.

    python tools/bench_vs_trl.py --trl-python /work/trlvenv/bin/python \
        [--base-pythonpath /path/to/older/checkout] [--shapes 8x4,32x8] [--repeats 3] [--out r.json]

The task, the same on both sides:

- Model: the demo's warm-started model (``megatron_gvpo/demo/model.py``; llama family, hidden 64,
  2 layers, 4 heads / 2 KV heads, the 100-symbol character tokenizer), the HF folder the demo
  config uses (built into the cache on first use, or ``--model``). Its temperature-1 samples are
  right about half the time, so groups have mixed rewards, non-zero advantages and real gradients;
  the tool prints each side's mean reward, share of groups with reward spread and grad norm, and
  fails when either side's gradients are all zero.
- Prompts: two-digit additions ``"07+45="`` from the demo task's training split (JSONL, the sum as
  ``answer``); both sides read the same file and shuffle it.
- Reward: 1 when the last integer of the response is the sum, else 0 (the demo's rule), one Python
  file both sides load. Ours names it ``<file>:toy_sum`` in ``reward.rewards`` with nothing else
  set, so it runs as a user's reward does by default: guarded, with the default timeout
  (``rewards/base.py`` ``USER_REWARD_TIMEOUT_S``) on the guard's persistent workers. TRL calls it
  as a plain reward function (TRL has no guard).
- GRPO with the same settings: clip 0.2 (both ends), advantages (R - group mean) / group std,
  per-sequence token mean then mean over sequences, no KL term and no reference model, Adam lr
  5e-5 constant, betas (0.9, 0.999), eps 1e-8, no weight decay, gradient norm clipped to 1.0, one
  optimizer step per rollout (the old policy is the current one), fp32, sampling at temperature 1
  with no top-p/top-k, ``--max-new-tokens`` (default 24, the demo's) new tokens at most, stop at EOS.

How TRL is matched (read in trl 1.16.0, ``trl/trainer/grpo_trainer.py`` and ``grpo_config.py``;
the fields are set in ``tools/_trl_grpo_peer.py``):

- ``num_generations=k``, ``per_device_train_batch_size=prompts * k`` (TRL counts completions),
  ``steps_per_generation=1``, ``gradient_accumulation_steps=1``, ``num_iterations=1``: each
  optimizer step generates ``prompts`` prompts x k and takes one step on them, as ours with
  ``trainer.prompts_per_step=prompts``, ``rollout.n_samples_per_prompt=k``,
  ``trainer.updates_per_round=1``. With these TRL skips its old-logprob forward
  (``_generate_and_score_completions``: ``gradient_accumulation_steps % generate_every == 0``);
  ours takes theta' from the update's own forward (``trainer/batch.py`` ``ThetaPrime``).
- Generation: ``use_vllm=False``, ``use_transformers_continuous_batching=False``: TRL's
  ``_generate_single_turn`` calls transformers ``generate`` on the left-padded batch (KV cache on,
  transformers' default); ours runs the local engine (``rollout=local``, ``rollout/local.py``).
- ``beta=0.0`` (ours ``algorithm.kl_beta=0``), ``loss_type="grpo"`` (TRL's default is "dapo"),
  ``scale_rewards="group"``, ``epsilon=epsilon_high=0.2``, ``importance_sampling_level="token"``,
  ``mask_truncated_completions=False``, ``top_p=1.0``, ``top_k=0``, ``bf16=False``,
  ``gradient_checkpointing=False`` (TRL's default is True; we do not recompute either),
  ``disable_dropout=True``, ``lr_scheduler_type="constant"``, ``logging_steps=1``.
- Both sides log every step (ours: TensorBoard, ``metrics.jsonl`` and a console line; TRL: its
  printed dict) and compute the entropy of the response tokens.

Measures. Each side runs as its own subprocess with ``OMP_NUM_THREADS=1`` (and one torch thread).
Arms are interleaved (base, ours, TRL, base, ours, TRL ...; ``base`` only with
``--base-pythonpath``) and each repetition runs every arm ``--short`` and ``--long`` steps:

- *marginal* s/step: (wall(long) - wall(short)) / (long - short), each run timed from process
  start to exit, so start-up, the final save and shutdown cancel;
- *median step interval*: the median time between consecutive per-step lines (our console line;
  TRL's logged dict) over the long run's steps after ``--short``: every per-step cost, none of the
  start-up; robust to a slow start on a loaded machine;
- *first step*: from process start to the first per-step line (imports, model and optimizer
  set-up, the first rollout and update);
- *CPU* s/step: (CPU(long) - CPU(short)) / (long - short), user + system time of the process and
  its waited-for children (``os.wait4``), beside the wall figure: on a shared machine CPU time is
  the less load-sensitive of the two.

Ratios are computed pair by pair (the same repetition of two arms, run back to back) and reported
as min / median / max over the repetitions. ``--trl-malloc`` adds TRL run with the glibc malloc
settings our trainer applies to itself on CPU (``parallel/cpu_malloc.py``), as environment
variables: what TRL gains from the same setting. Our per-phase breakdown is the mean of ``time/*`` from
``metrics.jsonl`` over the long run's steps after ``--short``. Run under ``flock /tmp/bench.lock``
on a shared machine and note the load average (printed).

TRL is not a dependency of this project: install it into its own venv, e.g.
``python3 -m venv /work/trlvenv && /work/trlvenv/bin/pip install torch==2.13.0 'trl==1.16.*'``.
``--base-pythonpath`` adds an arm that runs our side from another checkout (e.g. a ``git worktree``
of an older commit), interleaved with the others, to measure a "before".
"""

from __future__ import annotations

import argparse
import ast
import json
import os
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
TEMPERATURE = 1.0
SEED = 1234
PROMPT_ROWS = 6000


REWARD_SOURCE = '''"""The bench_vs_trl reward: 1.0 when the last integer of the response is the sum, else 0.0
(the demo task's rule). ``toy_sum`` has our per-sample signature, ``trl_toy_sum`` TRL's."""

import re

_INTEGER = re.compile(r"-?\\d+")


def _score(text, answer):
    try:
        expected = int(str(answer).strip())
    except ValueError:
        return 0.0
    found = _INTEGER.findall(text)
    return float(bool(found) and int(found[-1]) == expected)


def toy_sum(sample):
    return _score(sample.response, sample.label)


def trl_toy_sum(prompts, completions, answer, **kwargs):
    return [_score(c, a) for c, a in zip(completions, answer, strict=True)]
'''


def default_model() -> Path:
    """The demo's warm-start model, where the demo config finds it (built on first use)."""
    sys.path.insert(0, str(REPO))
    from megatron_gvpo.demo.model import demo_model_path

    cache = os.environ.get("MEGATRON_GVPO_CACHE", os.path.expanduser("~/.cache/megatron_gvpo"))
    return demo_model_path(cache)


def build_task(work: Path, model: Path) -> dict[str, Path]:
    """The prompt file (kept if present) and the reward file under ``work``."""
    sys.path.insert(0, str(REPO))
    from megatron_gvpo.demo.task import generate_toy_dataset, write_jsonl

    data = work / "prompts.jsonl"
    reward = work / "bench_reward.py"
    if not data.is_file():
        rows = generate_toy_dataset(PROMPT_ROWS, seed=0, split="train")
        write_jsonl(({"prompt": r["prompt"], "answer": r["answer"]} for r in rows), data)
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
    # Only the name: timeout and workers stay at their defaults (a user reward is guarded).
    reward = f"[{{name:'{task['reward']}:toy_sum'}}]"
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
        f"rollout.temperature={TEMPERATURE}",
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
        "trainer.eval_interval=0",
        "trainer.eval_at_start=false",
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
        f"--reward-file={task['reward']}",
        f"--out={run_dir}",
        f"--prompts={prompts}",
        f"--k={k}",
        f"--steps={steps}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--temperature={TEMPERATURE}",
        f"--lr={LR}",
        f"--epsilon={CLIP_EPS}",
        f"--max-grad-norm={MAX_GRAD_NORM}",
        f"--seed={SEED}",
    ]


def is_step_line(arm: str, line: str) -> bool:
    """A line each side prints once per optimizer step: our console summary ("step N: ..."),
    TRL's logged dict (``logging_steps=1``; with tqdm off, transformers' PrinterCallback prints
    it)."""
    if arm.startswith("trl"):
        return line.startswith("{") and "'step_time'" in line
    head = line.split(":", 1)[0].split(" ")
    return len(head) == 2 and head[0] == "step" and head[1].isdigit()


def timed(cmd: list[str], env: dict, log: Path, cwd: Path, arm: str) -> dict:
    """Wall and CPU time of ``cmd`` from start to exit, and when each per-step line arrived
    (seconds from the start)."""
    t0 = time.perf_counter()
    stamps, lines = [], []
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            if is_step_line(arm, line):
                stamps.append(time.perf_counter() - t0)
                lines.append(line)
            f.write(line)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's CPU time, its children's included
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {rc}; log {log}:\n{tail}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "stamps": stamps, "lines": lines}


def median_interval(stamps: list[float], skip: int) -> float | None:
    """Median time between consecutive per-step lines after the first ``skip`` steps."""
    gaps = [b - a for a, b in zip(stamps[skip:], stamps[skip + 1 :], strict=False)]
    return statistics.median(gaps) if gaps else None


def ours_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def phase_means(rows: list[dict], after_step: int) -> dict[str, float]:
    """Mean ``time/*`` of our metrics over the steps past ``after_step``."""
    rows = [r for r in rows if r["step"] > after_step]
    keys = sorted({k for r in rows for k in r if k.startswith("time/")})
    return {k: statistics.mean(r.get(k, 0.0) for r in rows) for k in keys}


def learning_signal(arm: str, run: dict, run_dir: Path) -> dict[str, float]:
    """Mean reward and mean gradient norm (before clipping) over a run's steps, from each side's
    own per-step log; for TRL also the share of groups whose rewards differ. With no KL term a
    non-zero gradient means non-zero advantages."""
    if arm.startswith("trl"):
        rows = [ast.literal_eval(x.strip()) for x in run["lines"]]
        out = {
            "reward": statistics.mean(float(r["reward"]) for r in rows),
            "grad_norm": statistics.mean(float(r["grad_norm"]) for r in rows),
            "mixed_groups": statistics.mean(1.0 - float(r["frac_reward_zero_std"]) for r in rows),
        }
    else:
        rows = [r for r in ours_rows(run_dir) if "grad_norm" in r]
        out = {
            "reward": statistics.mean(float(r["reward/mean"]) for r in rows),
            "grad_norm": statistics.mean(float(r["grad_norm"]) for r in rows),
        }
    out["steps"] = len(rows)
    return {k: round(v, 4) for k, v in out.items()}


def spread(xs: list[float]) -> dict[str, float]:
    """min / median / max, rounded."""
    return {
        "min": round(min(xs), 4), "median": round(statistics.median(xs), 4), "max": round(max(xs), 4)
    }


def summarise(arms, runs, signal, phases, short: int, long: int) -> dict:
    """Per arm: the spread of each measure over the repetitions; per arm against TRL: the spread
    of the pair-by-pair ratios (repetition r of the arm over repetition r of TRL)."""
    row, per_rep = {}, {}
    d = long - short
    for arm in arms:
        shorts, longs = runs[(arm, short)], runs[(arm, long)]
        per_rep[arm] = {
            "marginal": [(b["wall"] - a["wall"]) / d for a, b in zip(shorts, longs, strict=True)],
            "interval": [b["interval"] for b in longs],
            "cpu": [(b["cpu"] - a["cpu"]) / d for a, b in zip(shorts, longs, strict=True)],
            # both runs of a repetition measure the same start-up: their mean
            "first_step": [
                (a["first_step"] + b["first_step"]) / 2 for a, b in zip(shorts, longs, strict=True)
            ],
        }
        row[arm] = {
            "marginal_s_per_step": spread(per_rep[arm]["marginal"]),
            "median_step_interval_s": spread(per_rep[arm]["interval"]),
            "cpu_s_per_step": spread(per_rep[arm]["cpu"]),
            "first_step_s": spread(per_rep[arm]["first_step"]),
            "wall_short": [round(r["wall"], 2) for r in shorts],
            "wall_long": [round(r["wall"], 2) for r in longs],
            "signal": signal[arm],
        }
        if phases.get(arm):
            row[arm]["phases"] = {
                k: round(statistics.median(ph[k] for ph in phases[arm]), 4) for k in phases[arm][0]
            }
    for ref in ("trl", "trl_malloc"):
        if ref not in arms:
            continue
        for arm in arms:
            if arm != ref and not (ref == "trl_malloc" and arm.startswith("trl")):
                row[f"{arm}/{ref}"] = {
                    key: spread([a / b for a, b in zip(per_rep[arm][key], per_rep[ref][key],
                                                       strict=True)])
                    for key in per_rep[arm]
                }
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trl-python", required=True, help="python of a venv with trl installed")
    p.add_argument("--ours-python", default=sys.executable)
    p.add_argument("--ours-pythonpath", default=str(REPO), help="our package's checkout")
    p.add_argument("--base-pythonpath", help="another checkout of ours: adds the arm 'base'")
    p.add_argument("--model", type=Path, help="HF model folder (default: the demo model)")
    p.add_argument("--work", default="/tmp/bench_vs_trl", help="task files and run folders")
    p.add_argument("--shapes", default="8x4,32x8", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--short", type=int, default=10)
    p.add_argument("--long", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--arms", default="ours,trl", help="comma list of ours, trl")
    p.add_argument(
        "--trl-malloc", action="store_true",
        help="add the arm trl_malloc: TRL with the glibc malloc settings our trainer applies on "
        "CPU (parallel/cpu_malloc.py), set through MALLOC_* variables",
    )
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.long <= args.short:
        p.error("--long must exceed --short")
    shapes = args.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: {s!r} is not one of {', '.join(SHAPES)}")
    arms = args.arms.split(",")
    if args.base_pythonpath:
        arms = ["base", *arms]
    if args.trl_malloc:
        arms.append("trl_malloc")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    task = build_task(work, args.model or default_model())
    print(f"model {task['model']}; load average {os.getloadavg()}", flush=True)
    # ``python -m`` puts the working directory first on sys.path: ours runs from its checkout.
    runners = {
        "ours": (ours_command, _env(args.threads, args.ours_pythonpath), Path(args.ours_pythonpath)),
        "trl": (trl_command, _env(args.threads, None), work),
    }
    if args.trl_malloc:
        sys.path.insert(0, str(REPO))
        from megatron_gvpo.parallel.cpu_malloc import MMAP_THRESHOLD, TRIM_THRESHOLD

        env = _env(args.threads, None)
        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
        runners["trl_malloc"] = (trl_command, env, work)
    if args.base_pythonpath:
        runners["base"] = (
            ours_command, _env(args.threads, args.base_pythonpath), Path(args.base_pythonpath)
        )
    results = {}
    for shape in shapes:
        runs = {(a, n): [] for a in arms for n in (args.short, args.long)}
        phases = {a: [] for a in arms if not a.startswith("trl")}
        signal = {a: [] for a in arms}
        loads = []
        for rep in range(args.repeats):
            for n in (args.short, args.long):
                for arm in arms:  # interleaved: base, ours, trl, base, ours, trl ...
                    make, env, cwd = runners[arm]
                    run_dir = work / "runs" / f"{arm}_{shape}_{n}_{rep}"
                    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
                    run_dir.mkdir(parents=True)
                    log = run_dir.parent / f"{run_dir.name}.log"
                    loads.append(os.getloadavg()[0])
                    run = timed(make(args, task, shape, n, run_dir), env, log, cwd, arm)
                    if len(run["stamps"]) != n:
                        raise RuntimeError(f"{log}: {len(run['stamps'])} step lines for {n} steps")
                    run["first_step"] = run["stamps"][0]
                    msg = (
                        f"{shape} rep {rep} {arm} {n} steps: wall {run['wall']:.2f} s, "
                        f"cpu {run['cpu']:.2f} s, first step at {run['first_step']:.2f} s"
                    )
                    if n == args.long:
                        run["interval"] = median_interval(run["stamps"], args.short)
                        sig = learning_signal(arm, run, run_dir)
                        if not sig["grad_norm"] > 0:
                            raise RuntimeError(f"{log}: no gradient ({sig})")
                        signal[arm].append(sig)
                        if not arm.startswith("trl"):
                            phases[arm].append(phase_means(ours_rows(run_dir), args.short))
                        msg += f", median interval {run['interval']:.4f} s, {sig}"
                    runs[(arm, n)].append(run)
                    print(msg, flush=True)
        row = {"load_average_1min": spread(loads)}
        row.update(summarise(arms, runs, signal, phases, args.short, args.long))
        results[shape] = row
        print(json.dumps({shape: row}), flush=True)
    line = json.dumps(results)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
