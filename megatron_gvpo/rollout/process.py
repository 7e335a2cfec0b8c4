"""The embedded engine in its own process, so that generation overlaps training on a CPU box.

``ProcessEngine`` starts one ``spawn`` child that builds a :class:`LocalEngine` with the given
arguments and serves the calls of the ``RolloutEngine`` contract over a pipe, one at a time in
arrival order. Samples are the child engine's, unchanged: the same per-response seeding
(``response_seed``), the same batching rule, so for the same weights and seeds they equal the
in-process engine's. Weight buckets cross as tensors in shared memory (torch's multiprocessing
reductions); each is a private copy, so the actor may go on changing its parameters.

Calls are serialised by a lock: a weight update sent while another thread's ``generate`` is in
flight waits for it to finish (weights never change under a running generation).
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

from megatron_gvpo.rollout.base import (
    GenerateRequest,
    NamedTensors,
    RolloutEngine,
    Sample,
    SamplingParams,
)

_START_TIMEOUT_S = 600.0


def _serve(conn, kwargs: dict[str, Any]) -> None:
    """The child: build the engine, then answer ``(command, *args)`` messages until shutdown."""
    try:
        from transformers.utils import logging as hf_logging

        from megatron_gvpo.rollout.local import LocalEngine

        hf_logging.set_verbosity_error()  # the parent's console shows our lines, not library noise
        hf_logging.disable_progress_bar()

        engine = LocalEngine(**kwargs)
        conn.send(("ok", engine.vocab_size))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent went away
            return
        cmd = msg[0]
        try:
            if cmd == "generate":
                conn.send(("ok", engine.generate(msg[1], msg[2])))
            elif cmd == "update_weights":
                engine.update_weights(_received_buckets(conn), msg[1])
                conn.send(("ok", None))
            elif cmd == "shutdown":
                engine.shutdown()
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except Exception:
            if cmd == "update_weights":
                _drain_buckets(conn)
            conn.send(("error", traceback.format_exc()))


def _received_buckets(conn):
    """Buckets as they arrive, until the parent's ``end``."""
    while True:
        msg = conn.recv()
        if msg[0] == "end":
            return
        yield msg[1]


def _drain_buckets(conn) -> None:
    """After a failed update: read the rest of its buckets (the parent sends them all)."""
    for _ in _received_buckets(conn):
        pass


class ProcessEngine(RolloutEngine):
    """``LocalEngine(**engine_kwargs)`` in a ``spawn`` child process (see the module docstring)."""

    def __init__(self, **engine_kwargs: Any):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve, args=(child, engine_kwargs), name="local-rollout-engine", daemon=True
        )
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self._version = -1
        self._closed = False
        if not self._conn.poll(_START_TIMEOUT_S):
            self.shutdown()
            raise RuntimeError(f"local rollout engine process did not start in {_START_TIMEOUT_S}s")
        self.vocab_size = self._reply("starting the engine")

    def _reply(self, what: str) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(timeout=5)
            raise RuntimeError(
                f"local rollout engine process exited (code {self._proc.exitcode}) while "
                f"{what}"
            ) from None
        if status != "ok":
            raise RuntimeError(f"local rollout engine process failed while {what}:\n{value}")
        return value

    def _check_alive(self) -> None:
        if self._closed:
            raise RuntimeError("ProcessEngine was shut down")

    def generate(
        self, requests: Sequence[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Sample]]:
        self._check_alive()
        with self._lock:
            self._conn.send(("generate", list(requests), sampling))
            return self._reply("generating")

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[NamedTensors], version: int) -> None:
        """Stream the buckets (private copies, in shared memory); the version changes only when
        the child has loaded them all."""
        self._check_alive()
        with self._lock:
            self._conn.send(("update_weights", version))
            try:
                for bucket in buckets:
                    self._conn.send(("bucket", [(n, t.detach().clone()) for n, t in bucket]))
            finally:
                self._conn.send(("end",))  # the child drains to here whatever happened
            self._reply("loading weights")
            self._version = version

    @property
    def weight_version(self) -> int:
        return self._version

    def health(self) -> bool:
        return not self._closed and self._proc.is_alive()

    def shutdown(self) -> None:
        """Ask the child to stop, then make sure it has (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        if self._proc.is_alive() and self._lock.acquire(timeout=5):
            try:
                self._conn.send(("shutdown",))
                self._conn.poll(5)
            except (OSError, BrokenPipeError):
                pass
            finally:
                self._lock.release()
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
        self._conn.close()
