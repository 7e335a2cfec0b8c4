"""The GPU check's stages, each a subprocess with its own time limit; one failing does not stop
the others. Started by tools/gpu_check.sh (which installs the wheels first); writes
``gpu_check.json`` and ``gpu_check.md`` (and one log per stage) into ``--out``.

    python tools/gpu_check.py --out OUT [--budget-s 480] [--cpu-smoke]

Stages: ``env`` (versions, device, pip check), ``gpu_tests`` (the ``gpu``-marked tests),
``logprob_parity`` (Megatron actor vs transformers, bf16, TP1, a 0.16B llama), ``bench_train``
(tools/bench_train.py --preset gpu-1b), ``demo`` (the trainer, actor and local engine on CUDA,
with its held-out eval at step 0 and at the end).
Without CUDA the GPU stages are skipped and say so; ``--cpu-smoke`` then runs each of them at
CPU size instead, to prove the plumbing (reported as ``smoke``, never as ``passed``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARITY_TOL_BF16 = 5e-2  # max |logprob diff| at bf16 on a random-init 0.2B model, 256 tokens


@dataclass
class Stage:
    name: str
    limit_s: int
    status: str = "not run"  # passed | failed | timeout | skipped | smoke | smoke-failed
    seconds: float = 0.0
    detail: str = ""
    result: dict = field(default_factory=dict)


def run(stage: Stage, cmds: list[list[str]], out: Path, deadline: float, env=None) -> str:
    """Run ``cmds`` in turn (stop at the first failure) under the stage's limit and the overall
    deadline; log all output to out/<stage>.log and return it."""
    t0 = time.monotonic()
    limit = min(stage.limit_s, deadline - t0)
    if limit < 10:
        stage.status, stage.detail = "skipped", "the overall time budget is spent"
        return ""
    text, stage.status = "", "passed"
    for cmd in cmds:
        text += f"$ {' '.join(cmd)}\n"
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env={**os.environ, **(env or {})},
                capture_output=True,
                text=True,
                timeout=max(1.0, t0 + limit - time.monotonic()),
            )
        except subprocess.TimeoutExpired as e:
            text += _text(e.stdout) + _text(e.stderr)
            stage.status, stage.detail = "timeout", f"killed after {limit:.0f} s"
            break
        text += proc.stdout + proc.stderr
        if proc.returncode != 0:
            stage.status = "failed"
            stage.detail = f"exit {proc.returncode}: " + _last_line(proc.stderr or proc.stdout)
            break
    stage.seconds = round(time.monotonic() - t0, 1)
    (out / f"{stage.name}.log").write_text(text)
    return text


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def _json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def env_stage(stage: Stage, out: Path, deadline: float) -> None:
    code = (
        "import json, torch, transformers, megatron.core as mc\n"
        "from importlib.metadata import version as v\n"
        "from megatron_gvpo.models.specs import te_available\n"
        "cuda = torch.cuda.is_available()\n"
        "print(json.dumps({'python': __import__('sys').version.split()[0],"
        " 'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'cuda': cuda,"
        " 'device': torch.cuda.get_device_name() if cuda else 'cpu',"
        " 'megatron_core': v('megatron-core'), 'megatron_core_path': mc.__file__,"
        " 'transformers': transformers.__version__, 'transformer_engine': te_available()}))"
    )
    text = run(stage, [[sys.executable, "-c", code]], out, deadline)
    stage.result = _json_line(text)
    check = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, cwd=REPO
    )
    stage.result["pip_check"] = check.stdout.strip().splitlines()[:20]


def gpu_tests_stage(stage: Stage, out: Path, deadline: float, cuda: bool, smoke: bool) -> None:
    files = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").glob("test_*.py")
        if "pytest.mark.gpu" in p.read_text()
    )
    if not cuda and not smoke:
        stage.status, stage.detail = "skipped", "no CUDA device"
        return
    text = run(stage, [[sys.executable, "-m", "pytest", "-q", "-m", "gpu", *files]], out, deadline)
    counts = dict(
        (k, int(n))
        for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)
    )
    stage.result = {"files": files, **counts}
    if not cuda:
        stage.status = "smoke" if stage.status == "passed" else "smoke-failed"
        stage.detail = "no CUDA: collected and skipped by the gpu marker " + str(counts)


def parity_stage(stage: Stage, out: Path, work: Path, deadline: float, cuda: bool, smoke: bool):
    if not cuda and not smoke:
        stage.status, stage.detail = "skipped", "no CUDA device"
        return
    hf = work / "parity_model"
    size = (
        "hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,"
        " num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024"
        if cuda
        else "max_position_embeddings=1024"
    )
    make = (
        "import torch; from megatron_gvpo.models.tiny import save_tiny_hf_model; "
        f"save_tiny_hf_model({str(hf)!r}, 'llama', seed=1, dtype=torch.bfloat16, {size})"
    )
    parity = [sys.executable, "tools/logprob_parity.py", "--hf-dir", str(hf), "--precision"]
    parity += ["bf16", "--random-tokens", "--seq-len", "256" if cuda else "32"]
    text = run(stage, [[sys.executable, "-c", make], parity], out, deadline)
    stage.result = _json_line(text)
    diff = stage.result.get("max_abs_diff")
    if stage.status == "passed" and (diff is None or diff > PARITY_TOL_BF16):
        stage.status, stage.detail = "failed", f"max_abs_diff {diff} > {PARITY_TOL_BF16}"
    if not cuda:
        stage.status = "smoke" if stage.status == "passed" else "smoke-failed"
        stage.detail = "no CUDA: tiny llama, bf16 on CPU " + stage.detail


def bench_stage(stage: Stage, out: Path, deadline: float, cuda: bool, smoke: bool) -> None:
    if not cuda and not smoke:
        stage.status, stage.detail = "skipped", "no CUDA device"
        return
    args = ["--preset", "gpu-1b"] if cuda else ["--preset", "cpu-58m", "--warmup", "0"]
    args += ["--steps", "3" if cuda else "1", "--out", str(out / "bench_train.json")]
    text = run(stage, [[sys.executable, "tools/bench_train.py", *args]], out, deadline)
    stage.result = _json_line(text)
    if not cuda:
        stage.status = "smoke" if stage.status == "passed" else "smoke-failed"
        stage.detail = "no CUDA: the CPU preset, one step " + stage.detail


def demo_stage(stage: Stage, out: Path, work: Path, deadline: float, cuda: bool, smoke: bool):
    if not cuda and not smoke:
        stage.status, stage.detail = "skipped", "no CUDA device"
        return
    run_dir = work / "demo_run"
    cmd = [sys.executable, "-m", "megatron_gvpo.train", f"trainer.run_dir={run_dir}"]
    cmd += ["trainer.max_steps=" + ("5" if cuda else "2"), "trainer.plot=false"]
    cmd += ["rollout.local.device=" + ("cuda" if cuda else "cpu")]
    env = {"MEGATRON_GVPO_CACHE": os.environ.get("MEGATRON_GVPO_CACHE", str(work / "cache"))}
    text = run(stage, [cmd], out, deadline, env=env)
    steps = [line for line in text.splitlines() if line.startswith("step ")]
    metrics = run_dir / "metrics.jsonl"
    for name in ("metrics.jsonl", "train.log"):  # small: they travel back with the summaries
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, out / f"demo_{name}")
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    train = [r for r in rows if r.get("step", 0) >= 1]
    stage.result = {
        "step_lines": steps,
        "reward_mean": [round(r.get("reward/mean", float("nan")), 3) for r in train],
        "step_s": [round(r.get("time/step", float("nan")), 2) for r in train],
        # held-out greedy accuracy through the CUDA engine (step 0 and the last step), its cost
        "eval_accuracy": {r["step"]: round(r["eval/accuracy"], 3) for r in rows if "eval/accuracy" in r},
        "eval_s": [round(r["time/eval"], 2) for r in rows if "time/eval" in r],
    }
    if not cuda:
        stage.status = "smoke" if stage.status == "passed" else "smoke-failed"
        stage.detail = "no CUDA: 2 steps on CPU " + stage.detail


def markdown(report: dict) -> str:
    env = report["stages"][0]["result"]
    lines = [
        "# GPU check",
        "",
        f"- when: {report['started']} UTC, {report['seconds']} s of a {report['budget_s']} s budget",
        f"- device: {env.get('device', '?')}, torch {env.get('torch', '?')} "
        f"(CUDA {env.get('torch_cuda')}), megatron-core {env.get('megatron_core', '?')}, "
        f"transformers {env.get('transformers', '?')}, TE {env.get('transformer_engine')}",
        f"- mode: {report['mode']}",
        f"- pip check: {'; '.join(env.get('pip_check', [])) or 'ok'}",
        "",
        "| stage | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    for s in report["stages"]:
        detail = s["detail"].replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {detail} |")
    lines.append("")
    for s in report["stages"][1:]:
        if s["result"]:
            lines += [f"## {s['name']}", "", "```json", json.dumps(s["result"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=int, default=480, help="all stages together")
    p.add_argument("--cpu-smoke", action="store_true", help="without CUDA: run CPU-size stages")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Models and run folders stay out of --out, which should hold only what is worth sending back.
    work = Path(tempfile.mkdtemp(prefix="gvpo_gpu_check_"))
    import torch

    cuda = torch.cuda.is_available()
    t0, started = time.monotonic(), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    # CPU smoke runs are not timed: a shared CPU box gets four times the GPU limits.
    scale = 4 if args.cpu_smoke and not cuda else 1
    deadline = t0 + args.budget_s * scale
    stages = [
        Stage("env", 120 * scale),
        Stage("gpu_tests", 120 * scale),
        Stage("logprob_parity", 75 * scale),
        Stage("bench_train", 140 * scale),
        Stage("demo", 120 * scale),
    ]
    env_stage(stages[0], out, deadline)
    gpu_tests_stage(stages[1], out, deadline, cuda, args.cpu_smoke)
    parity_stage(stages[2], out, work, deadline, cuda, args.cpu_smoke)
    bench_stage(stages[3], out, deadline, cuda, args.cpu_smoke)
    demo_stage(stages[4], out, work, deadline, cuda, args.cpu_smoke)
    shutil.rmtree(work, ignore_errors=True)
    mode = "cuda"
    if not cuda:
        mode = "no CUDA: GPU stages skipped"
        if args.cpu_smoke:
            mode += "; run at CPU size instead to test the plumbing (smoke, not a GPU result)"
    report = {
        "started": started,
        "seconds": round(time.monotonic() - t0, 1),
        "budget_s": args.budget_s * scale,
        "mode": mode,
        "stages": [asdict(s) for s in stages],
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    ok = {"passed", "smoke", "skipped"} if not cuda else {"passed"}
    return 0 if all(s.status in ok for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
