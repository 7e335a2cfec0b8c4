"""Process groups: torch.distributed (NCCL with CUDA, gloo without) and megatron-core parallel_state."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_gvpo.parallel.cpu_compat import enable_cpu_compat
from megatron_gvpo.parallel.cpu_malloc import keep_freed_memory
from megatron_gvpo.parallel.store import listening_store


@dataclass
class ParallelConfig:
    """Model-parallel layout; DP is whatever world size is left over."""

    tp: int = 1
    """Tensor-parallel size (attention and dense MLPs)."""
    pp: int = 1
    """Pipeline-parallel size."""
    ep: int = 1
    """Expert-parallel size: a mixture-of-experts layer's experts are split over ``ep`` ranks,
    taken from the data-parallel ranks (megatron-core's expert model parallelism)."""
    etp: int | None = None
    """Expert tensor-parallel size: each expert split over ``etp`` ranks; None: the same as ``tp``."""
    seed: int = 1234
    timeout_minutes: int = 30


def validate_layout(cfg: ParallelConfig, world_size: int) -> None:
    """Raise a ValueError naming the flag when TP x PP does not divide the world size."""
    if cfg.tp < 1 or cfg.pp < 1:
        raise ValueError(f"parallel.tp={cfg.tp} and parallel.pp={cfg.pp} must both be >= 1")
    if world_size % (cfg.tp * cfg.pp) != 0:
        raise ValueError(
            f"parallel.tp * parallel.pp = {cfg.tp} x {cfg.pp} = {cfg.tp * cfg.pp} does not divide "
            f"the world size {world_size}"
        )
    etp = expert_tp(cfg)
    if cfg.ep < 1 or etp < 1:
        raise ValueError(f"parallel.ep={cfg.ep} and parallel.etp={cfg.etp} must both be >= 1")
    if world_size % (etp * cfg.ep * cfg.pp) != 0:
        raise ValueError(
            f"parallel.etp * parallel.ep * parallel.pp = {etp} x {cfg.ep} x {cfg.pp} does not "
            f"divide the world size {world_size} (experts take their ranks from TP x DP)"
        )


def expert_tp(cfg: ParallelConfig) -> int:
    """The expert tensor-parallel size: ``parallel.etp``, or ``parallel.tp`` when unset."""
    return cfg.tp if cfg.etp is None else cfg.etp


def layout_world_size(cfg: ParallelConfig) -> int:
    """The fewest ranks the layout needs: PP x lcm(TP, EP x ETP) (experts' ranks come from
    TP x DP, so DP grows until they fit)."""
    return cfg.pp * math.lcm(cfg.tp, expert_tp(cfg) * cfg.ep)


def device() -> torch.device:
    """The device this rank computes on (its GPU, else the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize(cfg: ParallelConfig) -> None:
    """Initialise torch.distributed from torchrun's env (or a single process) and megatron's groups.

    Without CUDA, the CPU compatibility layer is enabled first so megatron-core runs on gloo.
    Calling it again with the same layout is a no-op; a different layout re-creates the groups.
    On one node, the store and gloo's sockets listen on loopback only.
    """
    with _gloo_on_loopback():
        _initialize(cfg)


def _initialize(cfg: ParallelConfig) -> None:
    on_cpu = enable_cpu_compat()
    if on_cpu:
        keep_freed_memory()  # a CPU step reuses its buffers instead of faulting them in again
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        validate_layout(cfg, world_size)
        if world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "0")
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(minutes=cfg.timeout_minutes)
        store = _rendezvous_store(world_size, rank, timeout)
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            world_size=world_size,
            rank=rank,
            timeout=timeout,
            store=store,
        )
    validate_layout(cfg, dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == cfg.tp
            and parallel_state.get_pipeline_model_parallel_world_size() == cfg.pp
            and parallel_state.get_expert_model_parallel_world_size() == cfg.ep
            and parallel_state.get_expert_tensor_parallel_world_size() == expert_tp(cfg)
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        expert_model_parallel_size=cfg.ep,
        expert_tensor_parallel_size=expert_tp(cfg),
        distributed_timeout_minutes=cfg.timeout_minutes,
        create_gloo_process_groups=True,
    )
    # Same seed on every rank; megatron offsets the TP-sharded init stream by TP rank itself.
    torch.manual_seed(cfg.seed)
    model_parallel_cuda_manual_seed(cfg.seed)


def destroy() -> None:
    """Tear down megatron's groups and torch.distributed (safe to call twice)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _rendezvous_store(world_size: int, rank: int, timeout: timedelta):
    """The job's store: rank 0 hosts it listening on ``MASTER_ADDR`` only (loopback for one
    process), the other ranks dial it. None under torchrun, whose agent serves the store.
    Every rank passes its store explicitly, so all use the same (unprefixed) keys."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    store = listening_store(address, port, world_size, timeout)
    os.environ["MASTER_PORT"] = str(store.port)
    return store


@contextlib.contextmanager
def _gloo_on_loopback():
    """``GLOO_SOCKET_IFNAME=lo`` while our groups are made, when every rank is on this node and
    dials a loopback master (restored after: engines started later keep their own choice)."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1" if world_size == "1" else "")
    local = os.environ.get("LOCAL_WORLD_SIZE", world_size) == world_size
    loopback = local and addr in ("127.0.0.1", "localhost") and _has_loopback()
    if "GLOO_SOCKET_IFNAME" in os.environ or not loopback:
        yield
        return
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        yield
    finally:
        del os.environ["GLOO_SOCKET_IFNAME"]


def _has_loopback() -> bool:
    import socket

    return "lo" in (name for _, name in socket.if_nameindex())
