"""Starting and stopping SGLang server processes: command line, environment, health, shutdown."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from megatron_gvpo.rollout.sglang.client import Endpoint, HTTPClient, SGLangError
from megatron_gvpo.rollout.sglang.config import SGLangConfig

log = logging.getLogger(__name__)

# Variables torchrun (torch.distributed.elastic) sets in the trainer's processes. SGLang starts
# its own process groups; inheriting TORCHELASTIC_USE_AGENT_STORE makes torch's env:// rendezvous
# look for an agent store that is not SGLang's, and RANK/WORLD_SIZE/MASTER_* describe the trainer.
TORCHRUN_VARS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)
TORCHRUN_PREFIXES = ("TORCHELASTIC_", "TORCH_ELASTIC_")
WATCHDOG = Path(__file__).with_name("watchdog.py")  # run by path: no package imports


def clean_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) without what torchrun set for the trainer."""
    env = dict(os.environ if env is None else env)
    for key in list(env):
        if key in TORCHRUN_VARS or key.startswith(TORCHRUN_PREFIXES):
            del env[key]
    return env


def launch_command(cfg: SGLangConfig, model_path: str, s: Endpoint) -> list[str]:
    """``sglang.launch_server`` flags for server ``s`` (flag names of 0.5.x ``server_args.py``)."""
    cmd = [
        *cfg.launch_command,
        "--model-path", str(model_path),
        "--tp-size", str(cfg.tp_size),
        "--port", str(s.port),
        "--host", cfg.host,
        "--mem-fraction-static", str(cfg.mem_fraction_static),
        "--base-gpu-id", str(cfg.first_gpu() + s.index * cfg.tp_size),
    ]
    if cfg.quantization:
        cmd += ["--quantization", cfg.quantization]
    if cfg.memory_saver:
        # release/resume_memory_occupation free nothing without it
        # (srt/utils/torch_memory_saver_adapter.py: the no-op adapter when disabled)
        cmd.append("--enable-memory-saver")
    if cfg.return_routed_experts:
        # meta_info.routed_experts only with it (srt/state_capturer/routed_experts.py:50)
        cmd.append("--enable-return-routed-experts")
    return cmd + list(cfg.extra_args)


def start(cfg: SGLangConfig, model_path: str, s: Endpoint) -> None:
    """Start server ``s`` in its own session (so its whole process group can be stopped), under a
    watchdog that kills it if this process dies without stopping it (``watchdog.py``)."""
    cmd = launch_command(cfg, model_path, s)
    log.info("starting SGLang server %d: %s", s.index, " ".join(cmd))
    cmd = [sys.executable, str(WATCHDOG), str(os.getpid()), "--", *cmd]
    with open(s.log_path, "ab") as logf:  # the child keeps its own descriptor
        s.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True,
                                  env=clean_env())


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: Path | None, chars: int = 3000) -> str:
    if path is None or not path.is_file():
        return "(no log)"
    return path.read_text(errors="replace")[-chars:]


def terminate(servers: list[Endpoint], grace_s: float) -> None:
    """SIGTERM each started server's process group, then SIGKILL what is left."""
    procs = [s.proc for s in servers if s.proc is not None and s.proc.poll() is None]
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def wait_healthy(client: HTTPClient, servers: list[Endpoint]) -> None:
    """Poll ``/health_generate`` until every server answers 200 (or exits, or times out)."""
    cfg = client.cfg
    deadline = time.monotonic() + cfg.startup_timeout_s
    pending = list(servers)
    while pending:
        for s in list(pending):
            if s.exited():
                raise SGLangError(
                    f"SGLang server {s.url} exited with code {s.proc.returncode} while "
                    f"starting; log {s.log_path}:\n{log_tail(s.log_path)}"
                )
            if client.probe(s):
                pending.remove(s)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise SGLangError(
                f"SGLang servers not healthy after {cfg.startup_timeout_s:.0f}s: "
                f"{[s.url for s in pending]}"
            )
        time.sleep(cfg.health_poll_s)


def check_model_path(path: str | None) -> Path:
    """The local HF folder servers start from; a clear error before anything starts."""
    p = Path(str(path))
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"SGLang model path {str(p)!r} does not exist or has no config.json "
            "(servers are started from a local HF folder)"
        )
    return p


def fp8_model_path(cfg: SGLangConfig, log_dir: Path) -> str:
    """The blockwise-FP8 checkpoint servers start from: ``cfg.model_path`` when it already is
    one, else a copy converted once into ``fp8_dir`` (default ``<log_dir>/fp8_model``)."""
    import json

    from megatron_gvpo.bridge.fp8_checkpoint import convert_hf_to_fp8

    config = json.loads((Path(cfg.model_path) / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == "fp8" and quant.get("weight_block_size"):
        return str(cfg.model_path)
    out = Path(cfg.fp8_dir) if cfg.fp8_dir else log_dir / "fp8_model"
    convert_hf_to_fp8(cfg.model_path, out, reuse=True)
    return str(out)
