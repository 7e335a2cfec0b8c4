"""Whole runs under faults: huge rewards, non-finite steps, a stop signal during a
stuck step, kill -9, hostile checkpoint metadata, a full disk, a torn metrics line, a changed
config, secrets in reward kwargs, a converted checkpoint as ``model.path``.

Each run is ``python -m megatron_gvpo.train`` on a tiny random llama with the demo's character
tokenizer (seconds per step on CPU). Every wait is bounded: no test waits for a real hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, run_tool
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

_SMALL = (
    "trainer.prompts_per_step=4",
    "rollout.n_samples_per_prompt=4",
    "trainer.plot=false",
    "data.builtin_size=64",
    "data.builtin_eval_size=0",  # no held-out eval: the fault rewards count their calls
    # one optimizer step per round at lr 1e-3 (the demo's defaults are 4 and 1e-4): the skip
    # counts and config-change messages below are written for these
    "trainer.updates_per_round=1",
    "trainer.lr=0.001",
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from megatron_gvpo.demo.task import build_char_tokenizer
    from megatron_gvpo.models.tiny import save_tiny_hf_model

    d = tmp_path_factory.mktemp("model") / "tiny"
    tok = build_char_tokenizer()
    save_tiny_hf_model(d, "llama", vocab_size=len(tok), num_hidden_layers=2)
    tok.save_pretrained(d)
    return d


def _env(extra: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO, extra, env.get("PYTHONPATH")) if p)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _cmd(model: Path, run: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "megatron_gvpo.train",
        f"model.path={model}",
        f"trainer.run_dir={run}",
        *_SMALL,
        *overrides,
    ]


def train(model, run, *overrides, ok=True, extra=None, timeout=300):
    proc = subprocess.run(
        _cmd(model, run, *overrides),
        env=_env(extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _reward_module(tmp: Path, body: str) -> str:
    (tmp / "fault_rewards.py").write_text(body)
    return tmp


_REWARDS = """
import itertools, os, time
from megatron_gvpo.demo.task import toy_reward

_calls = itertools.count()

def huge(sample):
    # 1e39 and 1e300: finite in float64, inf in float32; every 3rd sample
    n = next(_calls)
    return [1e39, 1e300][n % 2] if n % 3 == 0 else toy_reward(sample.response, sample.label or "")

def overflowing_loss(sample):
    # float32-finite, but its square is not: the loss is inf on every step
    return 1e30 if next(_calls) % 5 == 0 else 0.5

def fails_in_the_first_round(sample):
    # every reward of round 1 (4 prompts x 4 samples) fails, then the toy reward
    if next(_calls) < 16:
        return float("nan")
    return toy_reward(sample.response, sample.label or "")

def hangs_after_first_step(sample):
    if next(_calls) >= 16:  # 4 prompts x 4 samples per step
        time.sleep(3600)
    return 0.5

def keyed(sample, api_key="", headers=None, token="", access_key="", auth="", openai_key="",
          url=""):
    assert api_key == "sk-LITERAL-123" and token == os.environ["FAULT_TOKEN"]
    assert headers == {"Authorization": "Bearer HEADER-SECRET-456"}
    assert access_key == "AK-SECRET-1" and auth == "AUTH-SECRET-2" and openai_key == "OK-SECRET-3"
    assert url == "https://user:PASS-SECRET-4@rm.example/score?token=TOK-SECRET-5&v=1"
    return toy_reward(sample.response, sample.label or "")
"""
_SECRETS = (
    b"sk-LITERAL-123", b"HEADER-SECRET-456", b"ENV-SECRET-789", b"AK-SECRET-1", b"AUTH-SECRET-2",
    b"OK-SECRET-3", b"PASS-SECRET-4", b"TOK-SECRET-5",
)  # fmt: skip
_KEYED = (
    'reward.rewards=[{name: "fault_rewards:keyed", kwargs: {api_key: sk-LITERAL-123, '
    "token: ${oc.env:FAULT_TOKEN}, headers: {Authorization: Bearer HEADER-SECRET-456}, "
    "access_key: AK-SECRET-1, auth: AUTH-SECRET-2, openai_key: OK-SECRET-3, "
    "url: 'https://user:PASS-SECRET-4@rm.example/score?token=TOK-SECRET-5&v=1'}}]"
)


def _hf_weights_finite(ckpt: Path) -> bool:
    tensors = load_file(str(next((ckpt / "hf").glob("*.safetensors"))))
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_float32_overflowing_rewards_are_dropped_and_weights_stay_finite(tiny_model, tmp_path):
    extra = _reward_module(tmp_path, _REWARDS)
    run = tmp_path / "run"
    train(
        tiny_model,
        run,
        "trainer.max_steps=2",
        "trainer.export_hf=true",
        'reward.rewards=[{name: "fault_rewards:huge", timeout_s: null}]',
        extra=extra,
    )
    rows = metrics(run)
    assert all(r["filter/reward_failed"] > 0 for r in rows)
    assert all(r["reward_fn/fault_rewards:huge/errors"] > 0 for r in rows)
    assert all(r["train/skipped_steps"] == 0 for r in rows)
    for r in rows:
        assert all(v == v and abs(v) != float("inf") for v in r.values() if isinstance(v, float))
    assert _hf_weights_finite(run / "checkpoints" / "step_000002")


def test_nonfinite_loss_skips_steps_then_stops_with_a_clear_error(tiny_model, tmp_path):
    extra = _reward_module(tmp_path, _REWARDS)
    run = tmp_path / "run"
    proc = train(
        tiny_model,
        run,
        "trainer.max_steps=5",
        "trainer.save_interval=1",
        "trainer.export_hf=true",
        "trainer.max_consecutive_skips=2",
        'reward.rewards=[{name: "fault_rewards:overflowing_loss", timeout_s: null}]',
        ok=False,
        extra=extra,
    )
    assert proc.returncode != 0
    assert "2 optimizer steps in a row skipped" in proc.stderr
    assert "trainer.max_consecutive_skips=2" in proc.stderr
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1] and rows[0]["train/skipped_steps"] == 1
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000001"]
    assert _hf_weights_finite(run / "checkpoints" / "step_000001")


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} not written (exit code {proc.poll()})"


@pytest.mark.one_leg
def test_stop_signal_during_a_stuck_step_exits_after_the_grace_without_saving(tiny_model, tmp_path):
    extra = _reward_module(tmp_path, _REWARDS)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(
            tiny_model,
            run,
            "trainer.max_steps=50",
            "trainer.save_interval=1",
            "trainer.stop_grace_s=2",
            'reward.rewards=[{name: "fault_rewards:hangs_after_first_step", timeout_s: null}]',
        ),
        env=_env(extra),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(run / "checkpoints" / "step_000001" / "trainer_state.json", proc, 240)
        time.sleep(1.0)  # step 2's reward is now stuck
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert time.monotonic() - sent < 15
    assert proc.returncode == 143, err[-3000:]
    assert "did not end within trainer.stop_grace_s=2" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]


def test_kill9_after_a_checkpoint_leaves_no_process_behind(tiny_model, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(tiny_model, run, "trainer.max_steps=50", "trainer.save_interval=1"),
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(run / "checkpoints" / "step_000002" / "trainer_state.json", proc, 240)
        children = psutil.Process(proc.pid).children(recursive=True)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert children == [], [c.cmdline() for c in children]  # no helper process per save
    time.sleep(1.0)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == []


_HOSTILE = """
import os, pickle, sys
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
with open(sys.argv[1], "wb") as f:
    pickle.dump(Evil(), f)
"""


def _poison(metadata: Path, marker: Path) -> None:
    subprocess.run([sys.executable, "-c", _HOSTILE, str(metadata), str(marker)], check=True)


@pytest.fixture(scope="module")
def one_step_run(tiny_model, tmp_path_factory) -> Path:
    """A run directory after one step (one checkpoint); tests resume from copies of it."""
    run = tmp_path_factory.mktemp("one_step") / "run"
    train(tiny_model, run, "trainer.max_steps=1")
    return run


def _copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".lock*"))
    return to


def test_hostile_metadata_never_runs_on_resume(tiny_model, one_step_run, tmp_path):
    run = _copy_run(one_step_run, tmp_path / "run")
    metadata = run / "checkpoints" / "step_000001" / "model_optim" / ".metadata"
    marker = tmp_path / "PWNED"
    _poison(metadata, marker)
    proc = train(tiny_model, run, "trainer.max_steps=2", ok=False)
    assert proc.returncode != 0
    assert not marker.exists()
    assert f"{metadata}: refusing to load posix.system" in proc.stderr


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    run_tool("convert_hf_to_mcore.py", "--hf-dir", str(tiny_model), "--out-dir", str(out))
    return out


def test_converted_checkpoint_as_model_path_trains(converted, tmp_path):
    run = tmp_path / "run"
    proc = train(converted, run, "trainer.max_steps=1", "trainer.export_hf=true")
    assert [r["step"] for r in metrics(run)] == [1], proc.stdout[-2000:]
    exported = run / "checkpoints" / "step_000001" / "hf"
    assert (exported / "config.json").is_file() and (exported / "tokenizer.json").is_file()
    # the engine got the checkpoint's weights with the first sync: actor and engine agree
    assert metrics(run)[0]["rollout/logprob_abs_diff/max"] < 1e-4


def test_hostile_metadata_in_converted_checkpoints_never_runs(converted, tmp_path):
    import shutil

    bad = tmp_path / "bad_ckpt"
    shutil.copytree(converted, bad)
    metadata = bad / "model" / ".metadata"
    marker = tmp_path / "PWNED"
    _poison(metadata, marker)
    expect = f"{metadata}: refusing to load posix.system"
    proc = train(bad, tmp_path / "run1", "trainer.max_steps=1", ok=False)  # model.path
    assert proc.returncode != 0 and expect in proc.stderr and not marker.exists()
    ref = ("algorithm=grpo", f"algorithm.ref_model={bad}")
    proc = train(converted, tmp_path / "run2", "trainer.max_steps=1", *ref, ok=False)
    assert proc.returncode != 0 and expect in proc.stderr and not marker.exists()
    code, _, err = run_tool(
        "convert_mcore_to_hf.py",
        "--mcore-dir",
        str(bad),
        "--out-dir",
        str(tmp_path / "hf"),
        expect_ok=False,
    )
    assert code != 0 and expect in err and not marker.exists()


_HOSTILE_BYTES = """
import dataclasses, io, os, pickle, sys
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

folder, marker = sys.argv[1], sys.argv[2]

class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + marker,))

buf = io.BytesIO()
torch.save([Evil()], buf)
payload = buf.getvalue()
if len(sys.argv) > 3:  # common.pt instead of the bytes records
    with open(os.path.join(folder, "common.pt"), "wb") as f:
        f.write(payload)
    sys.exit()
with open(os.path.join(folder, ".metadata"), "rb") as f:
    md = pickle.load(f)  # written by this test a moment ago: benign
# Every bytes record (the layers' _extra_state) now points at the payload, appended to its file;
# .metadata itself stays plain metadata.
for idx, info in list(md.storage_data.items()):
    if isinstance(md.state_dict_metadata[idx.fqn], BytesStorageMetadata):
        path = os.path.join(folder, info.relative_path)
        offset = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(payload)
        md.storage_data[idx] = dataclasses.replace(info, offset=offset, length=len(payload))
with open(os.path.join(folder, ".metadata"), "wb") as f:
    pickle.dump(md, f)
"""


def test_hostile_bytes_records_never_run_on_any_load_path(
    tiny_model, one_step_run, converted, tmp_path
):
    import shutil

    marker = tmp_path / "PWNED"
    run = _copy_run(one_step_run, tmp_path / "run")
    optim = run / "checkpoints" / "step_000001" / "model_optim"
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(converted, bad)
    for folder in (optim, bad / "model"):
        subprocess.run([sys.executable, "-c", _HOSTILE_BYTES, folder, marker], check=True)
    grpo = ("algorithm=grpo", f"algorithm.ref_model={bad}")
    to_hf = ["--mcore-dir", str(bad), "--out-dir", str(tmp_path / "hf")]
    launches = {  # started together: each is refused within seconds
        "resume": _cmd(tiny_model, run, "trainer.max_steps=2"),
        "model.path": _cmd(bad, tmp_path / "run1", "trainer.max_steps=1"),
        "ref_model": _cmd(converted, tmp_path / "run2", "trainer.max_steps=1", *grpo),
        "convert": [sys.executable, str(REPO / "tools" / "convert_mcore_to_hf.py"), *to_hf],
    }
    procs = {
        name: subprocess.Popen(
            cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in launches.items()
    }
    errs = {name: p.communicate(timeout=300)[1] for name, p in procs.items()}
    assert not marker.exists(), "a checkpoint's pickle ran code"
    for name, p in procs.items():
        assert p.returncode != 0, name
    record = "refusing to load posix.system from a bytes record"
    assert f"{optim}/__0_" in errs["resume"] and record in errs["resume"]
    for name in ("model.path", "ref_model", "convert"):
        assert f"{bad / 'model'}/__0_" in errs[name] and record in errs[name], errs[name][-2000:]


def test_hostile_common_pt_never_runs_even_when_the_environment_turns_weights_only_off(
    tmp_path, monkeypatch
):
    # megatron-core 0.16-0.18 torch.load common.pt without weights_only: torch's default then
    # decides, and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns it off.
    from megatron_gvpo.bridge.safe_metadata import UnsafeCheckpointError, restricted_loads

    marker = tmp_path / "PWNED"
    subprocess.run([sys.executable, "-c", _HOSTILE_BYTES, tmp_path, marker, "common"], check=True)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load posix\.system"):
        with restricted_loads(tmp_path):
            torch.load(tmp_path / "common.pt", map_location="cpu")  # as megatron-core 0.16 does
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # restored afterwards


_ENOSPC_RUNNER = """
import errno, functools, io, os, runpy, sys
from megatron.core.dist_checkpointing.strategies import filesystem_async

real = filesystem_async._write_item

@functools.wraps(real)  # megatron inspects its signature
def full_disk(*args, **kwargs):
    stream = next(a for a in args if isinstance(a, io.BufferedWriter))
    if "step_000002" in str(stream.name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(*args, **kwargs)

filesystem_async._write_item = full_disk
sys.argv = ["megatron_gvpo.train", *sys.argv[1:]]
runpy.run_module("megatron_gvpo.train", run_name="__main__")
"""


@pytest.mark.one_leg
def test_full_disk_during_a_checkpoint_names_the_cause_and_keeps_the_data(tiny_model, tmp_path):
    run = tmp_path / "run"
    args = _cmd(tiny_model, run, "trainer.max_steps=3", "trainer.save_interval=1")[3:]
    proc = subprocess.run(
        [sys.executable, "-c", _ENOSPC_RUNNER, *args],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    tmp = run / "checkpoints" / "step_000002.tmp"
    assert f"no space left on device while writing checkpoint {tmp}" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]
    out = train(tiny_model, run, "trainer.max_steps=2")  # the last checkpoint loads
    assert "step_000001 at step 1" in out.stdout


@pytest.mark.one_leg
def test_torn_metrics_line_resumes_and_config_changes_are_refused(tiny_model, tmp_path):
    run = tmp_path / "run"
    train(tiny_model, run, "trainer.max_steps=1")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 0.')  # a kill mid-write
    proc = train(tiny_model, run, "trainer.max_steps=2", "trainer.lr=0.01", ok=False)
    assert proc.returncode != 0
    assert "trainer.lr: 0.001 -> 0.01" in proc.stderr
    assert "trainer.allow_config_change=true" in proc.stderr
    proc = train(tiny_model, run, "trainer.max_steps=2", "algorithm=dr_grpo", ok=False)
    assert "algorithm.name: 'gvpo' -> 'dr_grpo'" in proc.stderr
    # Allowed: a new group size (the optimizer state does not depend on it; megatron-core 0.19
    # cannot load optimizer state into changed lr/wd parameter groups, which then fails clearly).
    train(
        tiny_model,
        run,
        "trainer.max_steps=2",
        "rollout.n_samples_per_prompt=2",
        "trainer.allow_config_change=true",
    )
    assert [r["step"] for r in metrics(run)] == [1, 2]


@pytest.mark.one_leg
def test_secrets_in_reward_kwargs_are_not_written(tiny_model, tmp_path):
    """Credentials by key name (api_key, token, headers, access_key, auth, openai_key) and in a
    URL (user information, a token query parameter): in no file of the run, not on the console,
    not in the report of a run that fails (Hydra's would print the overrides as given)."""
    extra = _reward_module(tmp_path, _REWARDS)

    def run_with(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            _cmd(tiny_model, run_dir, "trainer.max_steps=1", *overrides),
            env={**_env(extra), "FAULT_TOKEN": "ENV-SECRET-789"},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )

    run = tmp_path / "run"
    proc = run_with(run, _KEYED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics(run)[0]["reward_fn/fault_rewards:keyed/errors"] == 0  # the reward saw them all
    written = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.parent.name == "hydra" for p in written)
    assert any(p.name == "trainer_state.json" for p in written)
    for p in written:
        data = p.read_bytes()
        for secret in _SECRETS:
            assert secret not in data, (p, secret)
    for secret in _SECRETS:
        assert secret.decode() not in proc.stdout + proc.stderr, secret
    failed = run_with(tmp_path / "run2", "trainer.lr=-1", _KEYED)  # fails after Hydra composed
    # a config error: one line naming the key, exit status 2, no traceback
    assert failed.returncode == 2 and "error: trainer.lr must be > 0" in failed.stderr
    assert "Traceback" not in failed.stderr
    for secret in _SECRETS:
        assert secret.decode() not in failed.stdout + failed.stderr, secret
    # a reward that cannot load: a config error naming the entry
    missing = run_with(
        tmp_path / "run3", _KEYED.replace("fault_rewards:keyed", "fault_rewards:no_such_reward")
    )
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert missing.stderr.startswith("error: reward.rewards[0].name") and "no_such_reward" in (
        missing.stderr
    )
    assert "Traceback" not in missing.stderr
    # a failure past the config checks (kwargs the function refuses)
    crashed = run_with(tmp_path / "run4", _KEYED.replace("fault_rewards:keyed", "fault_rewards:huge"))
    assert crashed.returncode == 1 and "do not fit" in crashed.stderr, crashed.stderr[-2000:]
    assert "Error executing job" not in crashed.stderr  # Hydra's report, overrides and all
    for secret in _SECRETS:
        for proc in (missing, crashed):
            assert secret.decode() not in proc.stdout + proc.stderr, secret


_LOCK_HOLDER = """
import fcntl, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}".encode())
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_trainer_on_a_held_run_dir_refuses_and_a_killed_holder_does_not_block(
    tiny_model, tmp_path
):
    # The holder takes the documented lock (an exclusive flock on <run_dir>/.lock) with fcntl
    # itself, as a running trainer does; the second trainer must stop before writing anything.
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(run / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = train(tiny_model, run, "trainer.max_steps=1", ok=False, timeout=120)
    finally:
        holder.kill()  # like kill -9: the kernel drops the flock, the file stays
        holder.wait(timeout=30)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert f"trainer.run_dir={run} " in lines[0] and f"pid {holder.pid}" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # no hydra/, log or metrics
    from megatron_gvpo.trainer.runlock import hold_run_dir

    assert hold_run_dir(run) == run / ".lock"  # the killed holder's file does not block
    assert f"pid {os.getpid()} " in (run / ".lock").read_text()


def test_a_round_whose_rewards_all_fail_is_skipped_and_counted(tiny_model, tmp_path):
    extra = _reward_module(tmp_path, _REWARDS)
    run = tmp_path / "run"
    train(
        tiny_model,
        run,
        "trainer.max_steps=2",
        'reward.rewards=[{name: "fault_rewards:fails_in_the_first_round", timeout_s: null}]',
        extra=extra,
    )
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["train/skipped_rounds"] for r in rows] == [1, 0]
    assert rows[0]["filter/reward_failed"] == 16 and "loss" not in rows[0]
    assert rows[1]["filter/reward_failed"] == 0 and "loss" in rows[1]


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(
    tiny_model, one_step_run, tmp_path
):
    import shutil

    run = _copy_run(one_step_run, tmp_path / "run")
    # A newer checkpoint whose weights file was cut short (a crash or a full disk mid-copy).
    step1, step2 = run / "checkpoints" / "step_000001", run / "checkpoints" / "step_000002"
    shutil.copytree(step1, step2)
    state = json.loads((step2 / "trainer_state.json").read_text())
    (step2 / "trainer_state.json").write_text(json.dumps({**state, "step": 2}))
    shard = sorted((step2 / "model_optim").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    env = {k: v for k, v in _env().items() if k != "PYTHONWARNINGS"}  # what a user sees
    proc = subprocess.run(
        _cmd(tiny_model, run, "trainer.max_steps=2"),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = f"warning: checkpoint {step2} is unreadable (EOFError); resuming from {step1}\n"
    assert warning in proc.stderr
    assert f"resumed from {step1} at step 1" in proc.stdout
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert "FutureWarning" not in proc.stderr  # library deprecations stay in train.log
