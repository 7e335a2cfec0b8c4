"""The training loop end to end, run as users run it: ``python -m megatron_gvpo.train ...``.

The demo model is built once per session by the trainer itself (into a temporary cache) and
reused. Everything runs on CPU; the TP2 x PP2 run uses torchrun with 4 gloo ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, torchrun_cmd

# Keys that differ between two identical runs only because they measure wall time.
_TIMING = (
    "time/",
    "sync/",
    "throughput/",
    "rollout/tokens_per_s",
    "rollout/generate_s",
    "rollout/reward_busy_s",
)


def _env(cache: Path, extra_path: Path | None = None) -> dict:
    env = dict(os.environ, MEGATRON_GVPO_CACHE=str(cache), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        str(p) for p in (REPO, extra_path, env.get("PYTHONPATH")) if p
    )
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _train_cmd(*overrides: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megatron_gvpo.train", *overrides]
    return torchrun_cmd(nproc, "-m", "megatron_gvpo.train", *overrides)


def train(cache: Path, *overrides: str, nproc: int = 1, ok: bool = True, extra_path=None):
    proc = subprocess.run(
        _train_cmd(*overrides, nproc=nproc),
        env=_env(cache, extra_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def all_rows(run_dir: Path) -> list[dict]:
    """Every row of ``metrics.jsonl``: the step-0 eval row, then one per step."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict]:
    """The training steps' rows (step >= 1)."""
    return [r for r in all_rows(run_dir) if r["step"] >= 1]


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(_TIMING)}


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A cache holding the demo model, built by the trainer's own first-use path."""
    cache = tmp_path_factory.mktemp("cache")
    run = tmp_path_factory.mktemp("first_run")
    proc = train(cache, f"trainer.run_dir={run}", "trainer.max_steps=1")
    assert "building the demo model" in proc.stdout
    assert (cache / "toy_addition_v2" / "model.safetensors").is_file()
    return cache


def greedy_accuracy(hf_dir: Path, eval_file: Path) -> float:
    """Held-out greedy accuracy by plain transformers ``generate`` (no trainer code): the last
    integer of each decoded answer against the row's ``answer``."""
    import re

    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    rows = [json.loads(x) for x in eval_file.read_text().splitlines() if x]
    ids = torch.tensor([tok(r["prompt"])["input_ids"] for r in rows])  # one length: no padding
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    right = 0
    for r, seq in zip(rows, out[:, ids.shape[1] :].tolist(), strict=True):
        seq = seq[: seq.index(tok.eos_token_id)] if tok.eos_token_id in seq else seq
        found = re.findall(r"-?\d+", tok.decode(seq, skip_special_tokens=True))
        right += bool(found) and int(found[-1]) == int(r["answer"])
    return right / len(rows)


@pytest.mark.slow
@pytest.mark.one_leg
def test_demo_learns(demo_cache, tmp_path):
    """README's main command (the defaults): held-out greedy accuracy, in the run's own eval,
    rises by >= 0.2 and the sampled reward rises; an independent greedy decode by transformers
    of the starting model and of the exported final one agrees with the run's eval. (The other
    algorithms' learning on the demo: tools/compare_algorithms.py, docs/benchmarks.md.)"""
    run = tmp_path / "run"
    train(demo_cache, f"trainer.run_dir={run}", "trainer.export_hf=true")
    rows = all_rows(run)
    assert [r["step"] for r in rows] == list(range(0, 61))
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    assert list(evals) == [0, 10, 20, 30, 40, 50, 60]  # at start, every 10 steps, at the end
    assert 0.2 <= evals[0] <= 0.6 and evals[60] - evals[0] >= 0.2, evals
    steps = rows[1:]
    first = sum(r["reward/mean"] for r in steps[:10]) / 10
    last = sum(r["reward/mean"] for r in steps[-10:]) / 10
    assert last - first >= 0.1, (first, last)
    eval_file = run / "data" / "eval.jsonl"
    assert greedy_accuracy(demo_cache / "toy_addition_v2", eval_file) == pytest.approx(
        evals[0], abs=0.03
    )
    hf = run / "checkpoints" / "step_000060" / "hf"
    assert greedy_accuracy(hf, eval_file) == pytest.approx(evals[60], abs=0.03)
    keys = ("loss", "rollout/logprob_abs_diff/mean", "time/rollout", "time/train", "grad_norm")
    keys += ("entropy", "delta_std", "c_std", "reward_var_explained")
    for key in keys:
        assert all(key in r for r in steps), key
    # 4 updates per round against one theta': from the second on, s != s' and the variance term
    # acts (with one update per round delta would be 0 throughout).
    assert all(r["delta_std"] > 0 for r in steps)
    # Engine and actor see the same weights after every sync: fp32 logprobs agree closely.
    assert max(r["rollout/logprob_abs_diff/max"] for r in steps) < 1e-4
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "reward_curve.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000040", "step_000060"]  # save_interval 20, keep_last 2


@pytest.mark.slow
def test_eval_rows_best_checkpoint_and_resume(demo_cache, tmp_path):
    """Evaluations at 0, 2, 4 (first run), then 6 after a resume: each exactly once; the best
    step's checkpoint survives keep_last=1, is named by best.json, carries its HF export, and
    decodes to the accuracy the run reported for it."""
    run = tmp_path / "run"
    common = (
        f"trainer.run_dir={run}",
        *_SMALL,
        "trainer.eval_interval=2",
        "trainer.save_interval=100",
        "trainer.keep_last=1",
        "trainer.save_best=eval/accuracy",
        "trainer.export_hf=true",
    )
    out = train(demo_cache, *common, "trainer.max_steps=4")
    assert [x.split(":")[0] for x in out.stdout.splitlines() if x.startswith("eval step")] == [
        "eval step 0", "eval step 2", "eval step 4",
    ]  # fmt: skip
    out = train(demo_cache, *common, "trainer.max_steps=6")
    assert "at step 4" in out.stdout
    rows = all_rows(run)
    assert [r["step"] for r in rows] == list(range(0, 7))
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    assert list(evals) == [0, 2, 4, 6]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    trained = {s: v for s, v in evals.items() if s > 0}
    top = max(trained.values())
    assert best["metric"] == "eval/accuracy" and best["value"] == top
    assert best["step"] == min(s for s, v in trained.items() if v == top)  # ties: the first
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert kept == sorted({best["path"], "step_000006"})
    hf = run / "checkpoints" / best["path"] / "hf"
    assert greedy_accuracy(hf, run / "data" / "eval.jsonl") == pytest.approx(top, abs=0.03)


_SLOW_REWARD = """
import time
from megatron_gvpo.demo.task import toy_reward

def score(sample):
    time.sleep(0.03)  # slow enough that a kill lands inside a step
    return toy_reward(sample.response, sample.label or "")
"""
_SMALL = (
    "trainer.prompts_per_step=8",
    "rollout.n_samples_per_prompt=4",
    "trainer.save_interval=3",
    "data.builtin_eval_size=16",
)


# Library noise that must not reach the console (it goes to train.log), and transformers'
# deprecation of the KV-cache keyword, which our engine must not trigger at all.
_NOISE = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "cuda_graph_scope",
    "past_key_values",
    "fontManager",
    "Loading weights",
    # megatron-core 0.19 and PyPI's CUDA torch on a CPU machine (the Python 3.12 CI run)
    "GPTModel IS DEPRECATED",
    "MimoModelConfig",
    "async save is deprecated",
    "No CUDA runtime is found",
)


@pytest.mark.one_leg
def test_console_banner_one_line_per_step_and_library_lines_in_train_log(demo_cache, tmp_path):
    run = tmp_path / "run"
    out = train(demo_cache, f"trainer.run_dir={run}", "trainer.max_steps=2", *_SMALL[:2])
    lines = out.stdout.splitlines()
    assert "" not in [line.strip() for line in lines], out.stdout  # no blank lines
    banner = {line.split("  ")[0] for line in lines if "  " in line}
    assert {"model", "layout", "algorithm", "engine", "run dir", "resume"} <= banner, out.stdout
    assert "TP1 x PP1 x DP1" in out.stdout and str(run) in out.stdout
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == [
        "step 1",
        "step 2",
    ]
    for noise in _NOISE:
        assert noise not in out.stdout + out.stderr, noise
    log = (run / "train.log").read_text()
    assert "megatron.core" in log and "Setting up optimizer" in log  # library INFO, file only
    assert "Setting up optimizer" not in out.stderr

    # The checkpoint records its megatron-core; one from a newer release is refused at start.
    from importlib.metadata import version

    from packaging.version import Version

    state_file = run / "checkpoints" / "step_000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["megatron_core"] == version("megatron-core")
    v = Version(version("megatron-core"))
    newer = f"{v.major}.{v.minor + 1}.0"
    state_file.write_text(json.dumps({**state, "megatron_core": newer}))
    out = train(demo_cache, f"trainer.run_dir={run}", "trainer.max_steps=3", ok=False)
    assert out.returncode != 0
    assert f"written by megatron-core {newer}" in out.stderr, out.stderr[-3000:]
    assert f"runs megatron-core {version('megatron-core')}" in out.stderr
    assert "resume" not in out.stdout  # refused before the banner, so before any model is built
    assert not (run / "checkpoints" / "step_000003").exists()


@pytest.mark.slow
def test_resume_after_kill_gives_identical_metrics(demo_cache, tmp_path):
    (tmp_path / "slow_reward.py").write_text(_SLOW_REWARD)
    reward = 'reward.rewards=[{name: "slow_reward:score"}]'
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # Replay and two updates per round: the buffer and the scheduler must resume exactly too.
    common = (
        *_SMALL,
        "trainer.max_steps=6",
        "trainer.replay_ratio=0.5",
        "trainer.updates_per_round=2",
        reward,
    )
    train(demo_cache, f"trainer.run_dir={straight}", *common, extra_path=tmp_path)

    proc = subprocess.Popen(
        _train_cmd(f"trainer.run_dir={killed}", *common),
        env=_env(demo_cache, tmp_path),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = killed / "checkpoints" / "step_000003" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file()
    assert not (killed / "checkpoints" / "step_000006").exists(), "killed too late"

    out = train(demo_cache, f"trainer.run_dir={killed}", *common, extra_path=tmp_path)
    assert "resumed from" in out.stdout and "step_000003" in out.stdout
    a, b = all_rows(straight), all_rows(killed)
    # One row per step, the step-0 eval row once; the resumed run evaluates where the straight
    # one does (step 0 before the kill, step 6 at the end), with the same greedy results.
    assert [r["step"] for r in b] == list(range(0, 7))
    assert [r["step"] for r in b if "eval/accuracy" in r] == [0, 6]
    for x, y in zip(a, b, strict=True):
        assert comparable(x) == comparable(y), x["step"]


@pytest.mark.slow
@pytest.mark.one_leg
def test_sigusr1_saves_the_current_step_and_exits_for_requeue(demo_cache, tmp_path):
    """Slurm's ``--signal=USR1@T`` warning: finish the step, checkpoint it, exit 0; then resume."""
    (tmp_path / "slow_reward.py").write_text(_SLOW_REWARD)
    run = tmp_path / "run"
    args = (
        f"trainer.run_dir={run}",
        *_SMALL,
        "trainer.save_interval=100",
        'reward.rewards=[{name: "slow_reward:score"}]',
    )
    proc = subprocess.Popen(
        _train_cmd(*args, "trainer.max_steps=50"),
        env=_env(demo_cache, tmp_path),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    log = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:  # eval row 0, steps 1, 2
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    last = metrics(run)[-1]["step"]
    assert 2 <= last < 50 and "exiting to be resumed" in out
    assert (run / "checkpoints" / f"step_{last:06d}" / "trainer_state.json").is_file()
    out = train(demo_cache, *args, f"trainer.max_steps={last + 1}", extra_path=tmp_path)
    assert f"at step {last}" in out.stdout
    assert [r["step"] for r in all_rows(run)] == list(range(0, last + 2))


@pytest.mark.slow
def test_unfinished_checkpoint_write_leaves_previous_loadable(demo_cache, tmp_path):
    """What a kill during a write leaves (a ``.tmp`` folder) is never loaded; the last complete
    checkpoint is."""
    run = tmp_path / "run"
    # megatron's DistributedOptimizer (trainer=default's) writes and reads its state too
    dist_opt = "trainer.use_distributed_optimizer=true"
    train(demo_cache, f"trainer.run_dir={run}", *_SMALL, "trainer.max_steps=3", dist_opt)
    partial = run / "checkpoints" / "step_000006.tmp"
    shutil.copytree(run / "checkpoints" / "step_000003" / "model_optim", partial / "model_optim")
    for f in (partial / "model_optim").iterdir():
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[:50])  # truncated mid-write
    out = train(demo_cache, f"trainer.run_dir={run}", *_SMALL, "trainer.max_steps=4", dist_opt)
    assert "step_000003 at step 3" in out.stdout
    assert [r["step"] for r in all_rows(run)] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_split_groups_replay_and_hf_export(demo_cache, tmp_path):
    """Groups split over micro-batches (step-wide group statistics), GVPO replay, two updates per
    round, a length filter, and an HF export that transformers loads."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    train(
        demo_cache,
        f"trainer.run_dir={run}",
        *_SMALL,
        "trainer.max_steps=4",
        "trainer.save_interval=4",
        "trainer.replay_ratio=0.5",
        "trainer.updates_per_round=2",
        "trainer.keep_groups_whole=false",
        "trainer.max_tokens_per_microbatch=32",
        "trainer.min_response_tokens=3",
        "trainer.export_hf=true",
    )
    rows = metrics(run)
    assert rows[0].get("replay/groups", 0) == 0 and all(r["replay/groups"] > 0 for r in rows[1:])
    assert all(r["rollout/logprob_abs_diff/max"] < 1e-4 for r in rows)
    hf = run / "checkpoints" / "step_000004" / "hf"
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    start = load_file(str(demo_cache / "toy_addition_v2" / "model.safetensors"))
    trained = dict(model.named_parameters())
    assert set(start) == set(trained)
    changed = [n for n, w in start.items() if not torch.equal(w, trained[n].detach())]
    assert changed  # the exported weights are the trained ones, not the starting ones


_FLAKY_REWARD = """
from megatron_gvpo.demo.task import toy_reward

CALLS = [0]

def score(sample):
    CALLS[0] += 1
    if CALLS[0] % 3 == 0:
        raise RuntimeError("flaky reward")
    return toy_reward(sample.response, sample.label or "")
"""


@pytest.mark.slow
def test_reward_that_raises_on_a_third_is_counted_and_the_run_goes_on(demo_cache, tmp_path):
    (tmp_path / "flaky_reward.py").write_text(_FLAKY_REWARD)
    run = tmp_path / "run"
    reward = 'reward.rewards=[{name: "flaky_reward:score"}]'
    train(
        demo_cache,
        f"trainer.run_dir={run}",
        *_SMALL,
        "trainer.max_steps=3",
        reward,
        extra_path=tmp_path,
    )
    rows = metrics(run)
    assert len(rows) == 3
    for r in rows:
        samples = r["reward_fn/flaky_reward:score/samples"]
        errors = r["reward_fn/flaky_reward:score/errors"]
        assert samples == 32 and abs(errors - samples / 3) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dr_grpo", "dapo", "gspo", "gr_gvpo"])
def test_every_algorithm_trains(demo_cache, tmp_path, algorithm):
    run = tmp_path / "run"
    train(
        demo_cache,
        f"trainer.run_dir={run}",
        f"algorithm={algorithm}",
        *_SMALL,
        "trainer.max_steps=2",
        # one update per round: a step's metrics are then that update's (with several, each is
        # the mean over the round's updates, and the mean of per-update maxima is no maximum)
        "trainer.updates_per_round=1",
    )
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    assert all(0 < r["entropy"] < 10 for r in rows)  # mean response-token entropy (nats)
    if algorithm == "gr_gvpo":  # Group-Robust alpha over the task's two domains
        alpha = [rows[-1]["robust/alpha/carry"], rows[-1]["robust/alpha/nocarry"]]
        assert abs(sum(alpha) - 1) < 1e-9 and alpha != [0.5, 0.5]
        losses = [rows[-1][f"robust/loss/{d}"] for d in ("carry", "nocarry")]
        assert rows[-1]["robust/worst_loss"] == pytest.approx(max(losses))
    else:  # every diagnostic of the clipped-ratio losses reaches the log
        last = rows[-1]
        assert {"clip_fraction", "ratio_mean", "pg_loss", "num_tokens"} <= set(last)
        assert last["ratio_min"] <= last["ratio_mean"] <= last["ratio_max"]


@pytest.mark.slow
def test_async_rollout_with_bf16_engine_and_tis(demo_cache, tmp_path):
    """trainer.async_training.max_staleness=1 (the engine in its own process, generating round
    t + 1 while round t trains), a bf16 engine and GRPO with TIS: every trained sample is within
    the bound, the staleness and wait metrics are reported, TIS weights reach the log."""
    run = tmp_path / "run"
    train(
        demo_cache,
        f"trainer.run_dir={run}",
        "algorithm=grpo",
        "algorithm.kl_beta=0",
        "algorithm.use_tis=true",
        "rollout.local.sampling_dtype=bfloat16",
        "trainer.async_training.max_staleness=1",
        *_SMALL,
        "trainer.max_steps=4",
        "trainer.updates_per_round=1",
        "trainer.eval_interval=1",
    )
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Every eval samples with the weights just synced (version = step), never a round generated
    # ahead by older weights (the evaluator refuses other versions; here they are logged).
    assert [r["eval/weight_version"] for r in all_rows(run)] == [0, 1, 2, 3, 4]
    # Round 1 is sampled by the starting weights (version 0) and trained at version 0; round t
    # was generated while round t - 1 trained: by version t - 2, trained at t - 1.
    assert [r["async/staleness_max"] for r in rows] == [0, 1, 1, 1]
    assert all(r["async/dropped_stale"] == 0 and r["async/unknown_version"] == 0 for r in rows)
    assert all(r["async/rounds_ahead"] == 1 and r["time/actor_wait"] >= 0 for r in rows)
    assert all("time/rollout_wait" in r for r in rows)
    # bf16 engine weights: a visible logprob gap already on round 1 (fp32: < 1e-4, above).
    assert rows[0]["rollout/logprob_abs_diff/mean"] > 1e-3
    assert all(0 < r["tis_mean"] <= r["tis_max"] <= 2.0 for r in rows)
    # The clip ratio is against the actor's recomputed theta' (one update per round: ratio 1),
    # not against the stale bf16 engine, whose logprobs differ by the gap above.
    assert all(abs(r["ratio_min"] - 1) < 1e-5 and abs(r["ratio_max"] - 1) < 1e-5 for r in rows)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000003", "step_000004"]


@pytest.mark.slow
def test_demo_runs_at_tp2_pp2_under_torchrun(demo_cache, tmp_path):
    """Same first step as one process: same engine samples and rewards, same loss to 1e-5."""
    one, four = tmp_path / "one", tmp_path / "four"
    args = (*_SMALL, "trainer.max_steps=2")
    train(demo_cache, f"trainer.run_dir={one}", *args)
    train(demo_cache, f"trainer.run_dir={four}", "parallel=tp2pp2", *args, nproc=4)
    a, b = metrics(one)[0], metrics(four)[0]
    assert a["reward/mean"] == b["reward/mean"]
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]) + 1e-9
    assert (four / "checkpoints" / "step_000002" / "trainer_state.json").is_file()


@pytest.mark.slow
def test_sglang_backend_with_per_stage_sync_against_the_protocol_fake(demo_cache, tmp_path):
    """The trainer drives SGLangEngine at PP2 x DP2 with weight_sync=distributed: each pipeline
    stage broadcasts its own buckets (gloo). The servers are tests/sglang_fake_server.py, a
    PROTOCOL FAKE (fake tokens, no model): this checks the wiring, not SGLang."""
    run = tmp_path / "run"
    fake = [sys.executable, str(REPO / "tests" / "sglang_fake_server.py")]
    train(
        demo_cache,
        f"trainer.run_dir={run}",
        "parallel.pp=2",
        "rollout=sglang",
        "rollout.max_new_tokens=4",
        "rollout.n_samples_per_prompt=4",
        "trainer.prompts_per_step=4",
        "trainer.max_steps=2",
        "data.builtin_eval_size=8",
        "rollout.sglang.weight_sync=distributed",
        f"++rollout.sglang.launch_command=[{','.join(fake)}]",
        "++rollout.sglang.dist_backend=gloo",
        "++rollout.sglang.startup_timeout_s=60",
        nproc=4,
    )
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["sync/gb_per_s"] > 0 and r["response_length/mean"] == 4 for r in rows)
    # The engine's own counters reach the log, read at each rollout: one /generate per response
    # (the step-0 eval's 8 greedy requests, then 4 x 4 per step); by step 2's rollout, the
    # start-up sync and step 1's.
    assert rows[-1]["engine/generate_requests"] == 8 + 2 * 4 * 4
    assert rows[-1]["engine/weight_syncs"] == 2 and rows[-1]["engine/retries"] == 0
    # Eval goes through the same servers, on the weights just synced (step 0: the start-up ones).
    evals = [r for r in all_rows(run) if "eval/accuracy" in r]
    assert [(r["step"], r["eval/weight_version"]) for r in evals] == [(0, 0), (2, 2)]
    assert all(0 <= r["eval/accuracy"] <= 1 and r["eval/response_length"] > 0 for r in evals)


def _one_leg(overrides: list[str], key: str):
    """A CLI config-error case that needs no megatron-core release of its own: it runs in one of
    CI's two interpreter legs; three cases (a Hydra key, a section's value, a cross-section check,
    all cheap subprocesses) run in both."""
    return pytest.param(overrides, key, marks=pytest.mark.one_leg)


@pytest.mark.parametrize(
    "overrides,key",
    [
        _one_leg(["algorithm=ppo"], "algorithm=ppo: no such option"),
        (["rollout.device=cpu"], "rollout.device: no such key (did you mean rollout.local.device?)"),
        _one_leg(["trainer.max_steps=abc"], "trainer.max_steps"),
        _one_leg(["algorithm.name=ppo"], "algorithm.name"),
        _one_leg(["algorithm.beta=0"], "algorithm.beta"),
        _one_leg(["algorithm=dapo", "algorithm.eps_high=0.1"], "algorithm.eps_high"),
        _one_leg(["algorithm=grpo", "algorithm.ref_model=null"], "algorithm.kl_beta"),
        _one_leg(["algorithm=grpo", "algorithm.loss_agg_mode=seq-sum"], "algorithm.loss_agg_mode"),
        _one_leg(["algorithm=gr_gvpo", "data.domain_key=null"], "data.domain_key"),
        _one_leg(["parallel.tp=2"], "parallel.tp"),
        _one_leg(["data=jsonl", "data.path=/nonexistent/prompts.jsonl"], "data.path"),
        (["trainer.max_steps=0"], "trainer.max_steps"),
        _one_leg(["trainer.bogus=1"], "trainer.bogus: no such key"),
        _one_leg(['reward.rewards=[{name: "no_such_module:fn"}]'], "no_such_module"),
        _one_leg(["trainer.lr=5e-5"], "trainer.min_lr"),  # the demo's floor is 1e-4
        _one_leg(["trainer.max_steps=2.5"], "trainer.max_steps"),
        _one_leg(["algorithm.eps_low=0.2"], "algorithm.eps_low"),  # GVPO has no clip
        _one_leg(["rollout=sglang", "+rollout.sglang.bogus=1"], "rollout.sglang.bogus"),
        _one_leg(["rollout=sglang", "rollout.sglang.weight_sync=nccl"], "rollout.sglang"),
        (
            ["rollout=sglang", "trainer.async_training.max_staleness=1"],
            "rollout.sglang.weight_sync=tensor is the colocated mode",
        ),
        _one_leg(["eval.n_samples=4"], "eval.n_samples"),  # greedy samples would all be equal
        _one_leg(
            ["data.builtin_eval_size=0", "trainer.save_best=eval/accuracy"], "trainer.save_best"
        ),
        _one_leg(["+data.eval_sets={hard: /nonexistent/hard.jsonl}"], "data.eval_sets.hard"),
        # RL data has no pairs
        _one_leg(["data.chosen_key=better"], "data.chosen_key: no such key"),
        # a nested section's own check
        _one_leg(["rollout.local.device=gpu"], "rollout.local.device='gpu'"),
        _one_leg(["trainer.lr_decay_style=step"], "trainer.lr_decay_style"),
        _one_leg(["reward.round_timeout_s=0"], "reward.round_timeout_s"),
        # no FP8-capable Transformer Engine on a CPU box: the hardware check is a config error
        _one_leg(
            ["model.fp8.enabled=true", "model.precision=bf16"], "model.fp8.enabled=true needs"
        ),
        _one_leg(["algorithm=dapo", "trainer.replay_ratio=0.5"], "trainer.replay_ratio=0.5"),
    ],
)
def test_bad_config_fails_before_any_model_is_built(tmp_path, overrides, key):
    cache = tmp_path / "empty_cache"  # a model build would show up here
    proc = train(cache, f"trainer.run_dir={tmp_path / 'run'}", *overrides, ok=False)
    # one line naming the key, exit 2, no traceback: Hydra's composition errors included
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and key in lines[0], proc.stderr[-3000:]
    assert not cache.exists() or not any(cache.iterdir())
    assert not (tmp_path / "run" / "checkpoints").exists()
