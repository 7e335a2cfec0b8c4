"""The reward contract: what a reward function sees, how it is configured, and what it reports.

A reward function scores samples. It is either per-sample, ``fn(inp: RewardInput, **kwargs) ->
float``, or batched, ``fn(inputs: list[RewardInput], **kwargs) -> list[float | None]`` where
``None`` marks a sample the function could not score (it gets 0 and is counted as an error).
Stateful rewards (an HTTP client, a compiled regex) are registered as factories
``factory(**kwargs) -> fn``. A scorer may also define ``pop_counters() -> dict[str, int]``;
the counts it returns (retries, parse errors, ...) are added to its ``RewardStats.extra``.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardInput:
    """One sample to score: the prompt and response as text, the reference answer and domain."""

    prompt: str
    response: str
    label: str | None = None  # reference answer, as the dataset gives it
    domain: str | None = None  # data domain (e.g. "math", "code"); rewards may be limited to some
    metadata: dict[str, Any] = field(default_factory=dict)


USER_REWARD_TIMEOUT_S = 300.0  # default deadline of a user reward call (a sample or a batch)

PerSampleFn = Callable[..., float]
BatchFn = Callable[..., list[float | None]]


@dataclass
class RewardConfig:
    """One reward in the mix: ``name`` is a registered name or a ``module:function`` spec.

    ``timeout_s`` (None: run inline, unguarded) runs the function in daemon threads and scores 0
    any sample (batched: any batch) that takes longer; a timed-out thread cannot be killed and
    keeps running in the background. Left unset ("auto"), user ``module:function`` rewards get
    ``USER_REWARD_TIMEOUT_S`` (a hang costs samples, not the run) and registered rewards run
    inline (math-verify's own SIGALRM timeouts need the main thread; the remote reward bounds
    its requests itself). ``batched`` applies to ``module:function`` specs only.
    """

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | str | None = "auto"
    num_workers: int = 4  # concurrent threads when timeout_s is set
    batched: bool | None = None
    tag: str | None = None  # key in scores and metrics; defaults to name
    domains: list[str] | None = None  # score only samples of these domains (others get 0)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"reward config 'name' must be a non-empty string, got {self.name!r}")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(
                f"reward '{self.key}': 'weight' must be a finite number, got {self.weight!r}"
            )
        self.weight = float(self.weight)
        if self.timeout_s == "auto":
            self.timeout_s = USER_REWARD_TIMEOUT_S if ":" in self.name else None
        if self.timeout_s is not None and (
            isinstance(self.timeout_s, (str, bool)) or not self.timeout_s > 0
        ):
            raise ValueError(f"reward '{self.key}': 'timeout_s' must be > 0, got {self.timeout_s}")
        if self.num_workers < 1:
            raise ValueError(
                f"reward '{self.key}': 'num_workers' must be >= 1, got {self.num_workers}"
            )
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(
                f"reward '{self.key}': 'kwargs' must be a mapping, got {self.kwargs!r}"
            )
        self.kwargs = dict(self.kwargs)
        if self.domains is not None:
            self.domains = list(self.domains)

    @property
    def key(self) -> str:
        """The name this reward's scores and counters are reported under."""
        return self.tag or self.name


@dataclass
class RewardStats:
    """Counters of one reward over one scoring call (or accumulated over many)."""

    samples: int = 0  # samples given to the reward
    errors: int = 0  # samples scored 0 because the function raised or returned no valid score
    timeouts: int = 0  # samples scored 0 because the function ran past timeout_s
    extra: dict[str, int] = field(default_factory=dict)  # the scorer's own pop_counters()

    @property
    def failures(self) -> int:
        """Samples that got 0 because the reward failed."""
        return self.errors + self.timeouts

    def add(self, other: RewardStats) -> None:
        """Accumulate ``other`` into these counters."""
        self.samples += other.samples
        self.errors += other.errors
        self.timeouts += other.timeouts
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0) + v

    def as_dict(self) -> dict[str, int]:
        """Flat counters for logging."""
        return {
            "samples": self.samples,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "failures": self.failures,
            **self.extra,
        }


class EventCounts:
    """Thread-safe counters a scorer reports through ``pop_counters()`` (reset on each pop)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def pop(self) -> dict[str, int]:
        with self._lock:
            out, self._counts = dict(self._counts), Counter()
        return out
