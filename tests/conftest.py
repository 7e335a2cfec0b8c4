"""Shared fixtures: tiny random HF models of each family, and running the tools as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_gvpo.parallel.launch import free_port

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One random-init tiny fp32 HF checkpoint per supported family."""
    from megatron_gvpo.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny_hf_model(root / f, f, seed=i) for i, f in enumerate(FAMILIES)}


def run_tool(script: str, *args: str, expect_ok: bool = True, timeout: int = 600):
    """Run ``python tools/<script> args`` like a user; return (returncode, stdout, stderr)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(TOOLS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return proc.returncode, proc.stdout, proc.stderr


def torchrun_cmd(nproc: int, *target: str) -> list[str]:
    """``torchrun --nproc_per_node nproc target...`` on loopback with a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *target,
    ]


def run_torchrun(worker: Path, nproc: int, *args: str, timeout: int = 300):
    """``torchrun --nproc_per_node nproc worker args`` on loopback; return the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = torchrun_cmd(nproc, str(worker), *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in output:\n{stdout}"
    return json.loads(lines[-1])
