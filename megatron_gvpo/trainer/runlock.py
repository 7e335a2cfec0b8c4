"""One trainer per run directory: an exclusive ``flock`` held for the life of the process.

Two trainers writing one ``trainer.run_dir`` corrupt it for good (interleaved ``metrics.jsonl``
steps, one deleting the other's ``step_N.tmp``). Every rank takes an exclusive, non-blocking
``flock`` on its own file before it writes anything (``<run_dir>/.lock`` for rank 0,
``.lock.rank<r>`` for the others, so the ranks of one job do not exclude each other while a
second job's ranks collide with the first's) and keeps it until the process ends. The file
names the holder (host, pid, rank, start time); a second trainer stops at once with one line
naming the directory and that holder.

The kernel releases a ``flock`` when its process dies, however it dies (kill -9 included), so a
stale file never blocks a requeued job; the file itself stays and is rewritten by the next holder.

Shared filesystems: on NFS (v4, or v3 with the NLM lock manager; Linux maps ``flock`` onto NFS
byte-range locks) the lock excludes trainers on other nodes; a lock held by a node that crashed
is released only when the server's lease expires (about 90 s on NFSv4). Mounts with ``nolock`` or
``local_lock=flock`` and Lustre mounted with ``localflock`` exclude only processes on the same
node. Lustre with ``noflock`` (and filesystems without locks) refuse ``flock``: the run then goes
on unguarded, with a warning saying so.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

LOCK_NAME = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD: dict[Path, int] = {}  # run dir -> descriptor holding its lock in this process


class RunDirError(RuntimeError):
    """The run directory cannot be used: not writable, or held by another trainer."""


class RunDirBusy(RunDirError):
    """Another live process holds the run directory's lock."""


def lock_path(run_dir: str | Path, rank: int) -> Path:
    """The lock file of ``rank`` in ``run_dir``."""
    name = LOCK_NAME if rank == 0 else f"{LOCK_NAME}.rank{rank}"
    return Path(run_dir) / name


def hold_run_dir(run_dir: str | Path, rank: int | None = None) -> Path:
    """Lock ``run_dir`` for this process until it exits (idempotent); returns the lock file.

    Raises :class:`RunDirBusy` naming the directory and the holder when another live process
    has it, :class:`RunDirError` when the directory cannot be created or written (read-only
    filesystem, no permission, a file in the way). ``rank`` defaults to ``$RANK`` (0 outside
    torchrun).
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    run_dir = Path(run_dir).absolute()
    if run_dir in _HELD:
        return lock_path(run_dir, rank)
    path = lock_path(run_dir, rank)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RunDirError(
            f"trainer.run_dir={run_dir} cannot be written ({e.strerror or e}: {e.filename or path})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(
                f"trainer.run_dir={run_dir} is in use by another trainer ({holder}); "
                "stop it or choose another trainer.run_dir"
            ) from None
        if e.errno not in _UNSUPPORTED:
            os.close(fd)
            raise
        logging.getLogger(__name__).warning(
            "%s: the filesystem refuses flock (%s); a second trainer on this run dir would not "
            "be stopped",
            path,
            os.strerror(e.errno),
        )
    os.ftruncate(fd, 0)
    holder = f"host {socket.gethostname()} pid {os.getpid()} rank {rank} since "
    holder += time.strftime("%Y-%m-%dT%H:%M:%S%z")
    os.pwrite(fd, (holder + "\n").encode(), 0)
    _HELD[run_dir] = fd
    return path


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    return text or "holder not recorded yet"


class RunDirLockCallback(Callback):
    """Hydra callback: take the lock before Hydra writes ``<run_dir>/hydra/`` (a refused second
    trainer must not overwrite the running one's config files). Exits with one line if busy."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        try:
            hold_run_dir(config.trainer.run_dir)
        except RunDirError as e:
            raise SystemExit(f"error: {e}") from None
