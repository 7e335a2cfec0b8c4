"""``SGLangConfig``: where the SGLang servers are, how they are started and how weights reach them."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Literal

WeightSync = Literal["tensor", "distributed", "disk"]


def trainer_local_gpus() -> int:
    """GPUs the trainer's ranks use on this node: one per rank, ``cuda:LOCAL_RANK``."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


@dataclass
class SGLangConfig:
    """Where the SGLang servers are and how to use them.

    Three ways in: ``urls`` (attach to running servers), ``router_url`` (generate through an
    sglang-router; ``urls`` then lists the workers behind it, which receive weight updates), or
    neither (start ``num_servers`` servers from ``model_path``, a local HF folder).
    """

    model_path: str | None = None
    """Local HF folder the servers we start load (ignored when attaching)."""
    num_servers: int = 1
    """How many servers to start (each one a TP group of ``tp_size`` GPUs)."""
    tp_size: int = 1
    """Tensor-parallel size of each server we start."""
    host: str = "127.0.0.1"
    """Address servers we start listen on (loopback: single node)."""
    base_port: int = 0
    """0: free ports; else server k listens on ``base_port + k``."""
    base_gpu_id: int | None = None
    """Server k uses GPUs ``base_gpu_id + k * tp_size`` onwards. None: 0 in the colocated
    ``tensor`` mode (the servers share the trainer's GPUs by design), else the first GPU after
    the trainer's ranks on this node (``LOCAL_WORLD_SIZE``), so that no server rank shares a
    device with a trainer rank inside one NCCL update group."""
    mem_fraction_static: float = 0.8
    """SGLang's ``--mem-fraction-static`` for servers we start."""
    quantization: str | None = None
    """SGLang's ``--quantization`` (online quantization of a BF16 checkpoint). For FP8 weight
    sync use ``fp8`` instead: online FP8 has no ``weight_scale_inv`` parameters to receive."""
    fp8: bool = False
    """Start servers from a blockwise-FP8 copy of ``model_path`` (converted once into
    ``fp8_dir``), so blockwise-FP8 weight updates find the parameters they name."""
    fp8_dir: str | None = None
    """Where the FP8 copy is written (default: ``<log_dir>/fp8_model``)."""
    enable_memory_saver: bool | None = None
    """``--enable-memory-saver`` for servers we start; None: on in the colocated (tensor) mode,
    where the trainer releases and resumes the servers' memory around every training phase."""
    return_routed_experts: bool = False
    """``--enable-return-routed-experts`` for servers we start (set by the trainer for
    ``model.moe.routing_replay=rollout``; servers attached to must have been started with it)."""
    extra_args: list[str] = field(default_factory=list)
    """More ``sglang.launch_server`` flags, e.g. ``--enable-deterministic-inference``."""
    launch_command: list[str] = field(
        default_factory=lambda: [sys.executable, "-m", "sglang.launch_server"]
    )
    """The program started per server (tests swap in the protocol fake)."""
    log_dir: str | None = None
    """Where started servers write ``server_<k>.log`` (default: a temp folder)."""
    urls: list[str] = field(default_factory=list)
    """Running servers to attach to (they receive weight updates)."""
    router_url: str | None = None
    """An sglang-router to generate through; ``urls`` must list its workers."""
    weight_sync: WeightSync = "tensor"
    """``tensor`` (colocated, CUDA IPC), ``distributed`` (process group), ``disk`` (safetensors)."""
    sync_dir: str | None = None
    """Disk mode: a folder every server can read."""
    dist_master_address: str = "127.0.0.1"
    """This host, as the servers reach it (distributed mode)."""
    dist_master_port: int = 0
    """Port of the update group's store; 0: any free port."""
    dist_backend: str | None = None
    """Update-group backend; None: nccl with CUDA, gloo without."""
    group_name: str = "megatron_gvpo_weights"
    """Prefix of update-group names; a per-process token and a counter are appended."""
    no_stop_trim: bool = True
    """Response text keeps the stop string, like ``response_ids`` do."""
    skip_special_tokens: bool = True
    """SGLang's detokenizer option."""
    startup_timeout_s: float = 900.0
    """How long started servers may take to become healthy."""
    health_timeout_s: float = 30.0
    """One ``/health_generate`` probe (SGLang's takes >= 1 s; 503 after ~20 s when paused)."""
    health_poll_s: float = 2.0
    """Pause between health probes while waiting for servers."""
    router_recovery_timeout_s: float = 300.0
    """After a sync behind ``router_url``: how long to wait until the router counts every worker
    of ``urls`` healthy again (its ``GET /workers``). Its health checks mark workers that stayed
    paused through a long sync unhealthy, and it routes around them until enough checks pass
    (sglang-router 0.3.x: 3 failures, 2 successes, every 60 s by default; see README for the
    flags under which a sync does not trip them)."""
    connect_timeout_s: float = 5.0
    """TCP connect time-out of every request."""
    request_timeout_s: float = 1800.0
    """Read time-out of one ``/generate``."""
    control_timeout_s: float = 120.0
    """Read time-out of pause, flush, version, memory and info calls."""
    sync_timeout_s: float = 1800.0
    """Read time-out of weight updates, and the update group's collective time-out."""
    max_retries: int = 3
    """Retries of a failed (5xx, dropped, timed-out or aborted) request."""
    backoff_s: float = 1.0
    """First retry back-off; doubles per attempt."""
    backoff_max_s: float = 30.0
    """Largest back-off."""
    max_restarts: int = 3
    """Restarts per started server before it is given up."""
    max_concurrency: int = 256
    """Requests in flight per server (SGLang batches them continuously)."""
    shutdown_grace_s: float = 15.0
    """SIGTERM to SIGKILL delay when stopping started servers."""

    def __post_init__(self) -> None:
        if self.weight_sync not in ("tensor", "distributed", "disk"):
            raise ValueError(
                f"sglang.weight_sync must be tensor|distributed|disk, got {self.weight_sync!r}"
            )
        if self.weight_sync == "disk" and not self.sync_dir:
            raise ValueError("sglang.weight_sync='disk' needs sync_dir (readable by every server)")
        if self.router_url and not self.urls:
            raise ValueError("sglang.router_url needs urls: the workers that get weight updates")
        if not self.urls and not self.model_path:
            raise ValueError("sglang: give model_path (start servers), urls (attach) or router_url")
        if self.num_servers < 1 or self.tp_size < 1:
            raise ValueError(
                f"sglang: num_servers and tp_size must be >= 1, got {self.num_servers}, "
                f"{self.tp_size}"
            )
        if self.max_retries < 0 or self.max_concurrency < 1:
            raise ValueError("sglang: max_retries must be >= 0 and max_concurrency >= 1")
        self._check_gpus()
        if self.fp8 and self.quantization:
            raise ValueError(
                f"sglang: fp8=true starts servers from a blockwise-FP8 checkpoint; drop "
                f"quantization={self.quantization!r} (online quantization has no weight_scale_inv)"
            )

    def _check_gpus(self) -> None:
        """Servers we start in a non-colocated mode keep off the trainer's GPUs of this node."""
        if not self.launches or self.weight_sync == "tensor" or self.base_gpu_id is None:
            return
        trainer = trainer_local_gpus()
        if self.base_gpu_id < 0 or self.base_gpu_id < trainer:
            raise ValueError(
                f"sglang.base_gpu_id={self.base_gpu_id}: server 0 would use GPU "
                f"{self.base_gpu_id}, but the trainer's {trainer} rank(s) on this node use GPUs "
                f"0-{trainer - 1} (LOCAL_WORLD_SIZE); with weight_sync={self.weight_sync!r} a "
                f"server needs GPUs of its own: set base_gpu_id >= {trainer}, or leave it unset"
            )

    def first_gpu(self) -> int:
        """The first GPU of server 0 (``base_gpu_id``, or its default; see the field)."""
        if self.base_gpu_id is not None:
            return self.base_gpu_id
        return 0 if self.weight_sync == "tensor" else trainer_local_gpus()

    @property
    def launches(self) -> bool:
        """True when this engine starts (and owns) its servers."""
        return not self.urls

    @property
    def memory_saver(self) -> bool:
        """Whether servers we start get ``--enable-memory-saver``."""
        if self.enable_memory_saver is None:
            return self.weight_sync == "tensor"
        return self.enable_memory_saver
