"""Fault isolation for reward functions: a raise or a hang costs one sample, not the run.

Timeouts run each call on a daemon worker thread and stop *waiting* for it at the deadline.
Python cannot kill a thread: a hung call keeps its worker (and some CPU, and the GIL now and then)
until it returns, but being a daemon it does not block interpreter exit (a ThreadPoolExecutor
worker would: executors join their threads at exit). Workers persist between calls, so a step
pays for no thread start-up; a worker held by a hung call is replaced by a fresh one, so the
slot it held goes to the next call.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


class RewardTimeout(TimeoutError):
    """A reward call ran past its deadline and was abandoned."""


_PENDING = object()
Outcome = tuple[Any, "BaseException | None"]  # (value, None) or (None, error)


def _call(fn: Callable, arg: Any) -> Outcome:
    try:
        return fn(arg), None
    except Exception as e:  # any reward failure scores 0; the caller counts it
        return None, e


class _WorkerPool:
    """Daemon threads that run queued callables; idle ones wait for the next call.

    ``submit`` hands a task to an idle worker or starts one, so a task never waits behind a
    hung call. At most ``max_idle`` workers stay parked; the rest exit when their call returns.
    """

    def __init__(self, max_idle: int = 64) -> None:
        self.max_idle = max_idle
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # workers parked on the queue with no task reserved for them
        self._started = 0

    def submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # reserved: a parked worker will take this task
            else:
                self._started += 1
        self._tasks.put(task)
        if spawn:
            threading.Thread(target=self._work, daemon=True, name="reward-worker").start()

    def _work(self) -> None:
        while True:
            self._tasks.get()()
            with self._lock:
                if self._idle >= self.max_idle:
                    return
                self._idle += 1

    @property
    def threads_started(self) -> int:
        """Workers started so far (for tests and benchmarks: it stays flat across calls)."""
        return self._started


_POOL = _WorkerPool()


def call_guarded(
    fn: Callable, args: Sequence[Any], timeout_s: float | None, num_workers: int = 4
) -> list[Outcome]:
    """``fn(a)`` for each ``a`` in order; each outcome is (value, None) or (None, error).

    ``timeout_s=None`` runs inline in the calling thread (needed by signal-based timeouts, which
    only work in the main thread). Otherwise at most ``num_workers`` calls run at once on the
    module's persistent daemon workers, and one still running ``timeout_s`` after it started
    gets a ``RewardTimeout`` outcome. Safe to call from several threads at once.
    """
    if timeout_s is None:
        return [_call(fn, a) for a in args]
    n = len(args)
    results: list[Any] = [_PENDING] * n
    cond = threading.Condition()
    deadlines: dict[int, float] = {}  # started and in flight: index -> deadline

    def task(i: int) -> Callable[[], None]:
        def run() -> None:
            with cond:
                deadlines[i] = time.monotonic() + timeout_s
            try:
                out: Outcome = (fn(args[i]), None)
            except BaseException as e:  # a worker thread: report, never propagate
                out = (None, e)
            with cond:
                if results[i] is _PENDING:  # not already given up on
                    results[i] = out
                cond.notify()

        return run

    submitted = 0
    done = 0
    with cond:
        while done < n:
            while submitted < n and submitted - done < num_workers:
                _POOL.submit(task(submitted))
                submitted += 1
            now = time.monotonic()
            for i, deadline in list(deadlines.items()):
                if results[i] is _PENDING and now >= deadline:
                    results[i] = (None, RewardTimeout(f"no result after {timeout_s:g} s"))
                if results[i] is not _PENDING:
                    del deadlines[i]
            done = sum(r is not _PENDING for r in results[:submitted])
            if done < n and (submitted == n or submitted - done >= num_workers):
                wait = min(deadlines.values(), default=now + timeout_s) - now
                cond.wait(max(0.0, wait))
    return results


class RoundDeadline:
    """When a round's rewards are due: unset (never) until :meth:`start`, then ``seconds`` later.

    A round's groups are scored while the others still generate, so scoring starts before the
    deadline is known: it is started when the last response arrives, and everything that waits
    on a reward (:meth:`wait`, :meth:`acquire`) re-reads it at least every ``poll_s``.
    ``seconds=None``: no deadline (``start`` does nothing).
    """

    poll_s = 0.05

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._at = math.inf

    def start(self) -> None:
        """Start the clock (the round's last response arrived)."""
        if self.seconds is not None:
            self._at = time.monotonic() + self.seconds

    def remaining(self) -> float:
        """Seconds left (inf while unset; <= 0 once passed)."""
        return self._at - time.monotonic()

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.remaining() <= 0

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """Wait for ``event`` at most ``timeout_s`` and never past the deadline; True if set."""
        if self.seconds is None:
            return event.wait(timeout_s)
        end = time.monotonic() + timeout_s
        while True:
            left = min(end - time.monotonic(), self.remaining())
            if left <= 0:
                return event.is_set()
            if event.wait(min(left, self.poll_s)):
                return True

    def acquire(self, lock: threading.Semaphore) -> bool:
        """Acquire ``lock`` unless the deadline passes first; True if acquired."""
        if self.seconds is None:
            return lock.acquire()
        while True:
            left = self.remaining()
            if left <= 0:
                return False
            if lock.acquire(timeout=min(left, self.poll_s)):
                return True


class RateLimitedLogger:
    """Logs at most one warning per ``interval_s`` and says how many it held back meanwhile."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last = -float("inf")
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, msg: str) -> bool:
        """Log ``msg`` unless one was logged less than ``interval_s`` ago; True when logged."""
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                self._suppressed += 1
                return False
            if self._suppressed:
                msg = f"{msg} ({self._suppressed} similar warnings suppressed)"
            self._last, self._suppressed = now, 0
        self.logger.warning(msg)
        return True
