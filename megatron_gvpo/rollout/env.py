"""The environment plug-in of multi-turn rollouts (``rollout.env``) and its guarded calls.

A user environment is a class, named by ``path/to/file.py:Name`` or ``module:Name``, constructed
once per trajectory with the dataset row (a dict)::

    class Name:
        def __init__(self, row: dict): ...
        def reset(self) -> str | None: ...      # text after the prompt, before the first turn
        def step(self, action: str) -> tuple[str | None, float, bool]:
            ...                                 # (observation, this turn's reward, done)

Calls into it are guarded like reward calls: an exception or a call running past
``rollout.env_timeout_s`` ends that trajectory (the sample is dropped like a failed reward) and
is counted. A timed-out call is abandoned in its daemon thread (Python cannot stop a thread).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, Protocol

from megatron_gvpo.rewards.user import load_callable


class Environment(Protocol):
    """What ``rollout.env`` names (constructed with the dataset row)."""

    def reset(self) -> str | None:
        """Text appended after the prompt before the first turn (None: nothing)."""

    def step(self, action: str) -> tuple[str | None, float, bool]:
        """``(observation appended after the turn or None, this turn's reward, done)``."""


class EnvTimeout(TimeoutError):
    """An environment call ran past ``rollout.env_timeout_s`` and was abandoned."""


def load_env(spec: str) -> type:
    """The environment class of ``spec``; a one-line error naming ``rollout.env`` when the spec
    does not import or the class lacks ``reset``/``step``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"rollout.env={spec!r} must look like 'path/to/file.py:Name' or 'module:Name'"
        )
    cls = load_callable(spec, what="rollout.env")
    if not isinstance(cls, type):
        raise ValueError(f"rollout.env={spec!r} names a {type(cls).__name__}, not a class")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"rollout.env={spec!r}: class {cls.__name__} has no {', '.join(missing)}")
    return cls


def call_with_timeout(fn: Callable[..., Any], *args: Any, timeout_s: float | None) -> Any:
    """``fn(*args)``; raises :class:`EnvTimeout` after ``timeout_s`` seconds (None: no limit,
    run inline). The call runs in a daemon thread so a hung environment never blocks exit."""
    if timeout_s is None:
        return fn(*args)
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # our own thread: hand the error to the caller
            box["error"] = e
        done.set()

    threading.Thread(target=target, daemon=True, name="env-call").start()
    if not done.wait(timeout_s):
        raise EnvTimeout(f"no result after {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def check_step_result(value: Any) -> tuple[str | None, float, bool]:
    """``step``'s return value as ``(observation, reward, done)``; TypeError otherwise."""
    if not isinstance(value, tuple | list) or len(value) != 3:
        raise TypeError(f"step must return (observation, reward, done), got {value!r}")
    obs, reward, done = value
    if obs is not None and not isinstance(obs, str):
        raise TypeError(f"step's observation must be a str or None, got {type(obs).__name__}")
    reward = float(reward)
    if not math.isfinite(reward):
        raise ValueError(f"step returned a non-finite reward {reward!r}")
    return obs, reward, bool(done)
