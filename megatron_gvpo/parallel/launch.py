"""Run a function on N local ranks: directly under torchrun, else by spawning CPU/GPU workers.

Lets ``python tools/convert_hf_to_mcore.py --tp 2 --pp 2`` work without torchrun, while
``torchrun --nproc_per_node 4 tools/...`` (or srun) keeps full control of the ranks.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def under_launcher() -> bool:
    """True when torchrun/srun already started this process as one rank of a job."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _worker(local_rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(*args)


def is_rank0() -> bool:
    """True on global rank 0 (or when torch.distributed is not initialised)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when torch.distributed is initialised, else nothing."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's small picklable Python object on every rank (``obj`` is ignored elsewhere)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for a rendezvous or a server we start)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_on_ranks(fn: Callable, world_size: int, *args) -> None:
    """Call ``fn(*args)`` on every rank; spawns ``world_size`` local processes if needed."""
    if under_launcher():
        env_ws = int(os.environ["WORLD_SIZE"])
        if env_ws != world_size:
            raise ValueError(
                f"launched with WORLD_SIZE={env_ws} but the requested layout needs {world_size} ranks"
            )
        fn(*args)
        return
    port = free_port()
    if world_size == 1:
        _worker(0, 1, port, fn, args)
        return
    mp.start_processes(
        _worker, args=(world_size, port, fn, args), nprocs=world_size, start_method="spawn"
    )
