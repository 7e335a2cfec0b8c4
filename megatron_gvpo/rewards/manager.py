"""Configured rewards and their weighted sum: what the trainer calls once per batch of samples."""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from megatron_gvpo.rewards.base import RewardConfig, RewardInput, RewardStats
from megatron_gvpo.rewards.guard import RateLimitedLogger, RoundDeadline, call_guarded
from megatron_gvpo.rewards.registry import bind_reward, reward_entry

logger = logging.getLogger(__name__)


# Rewards are trained on as float32: a score (or weighted sum) beyond its range would be inf.
FLOAT32_MAX = 3.4028234663852886e38


def finite_in_float32(x: float) -> bool:
    """True when ``x`` stays finite once cast to float32, the dtype the loss uses."""
    return math.isfinite(x) and abs(x) <= FLOAT32_MAX


def _as_score(value: Any) -> float | None:
    """A float32-finite float from a reward's return value, or None when not a valid score."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if finite_in_float32(x) else None


def _as_list(value: Any) -> list | None:
    """A batched reward's return value as a list (list, tuple, array, tensor), else None."""
    if isinstance(value, (str, bytes, Mapping)):
        return None
    try:
        return list(value)
    except TypeError:
        return None


class Reward:
    """One configured reward: the bound function, its guard, counters and warning throttle."""

    def __init__(self, cfg: RewardConfig, warn_interval_s: float = 60.0) -> None:
        self.cfg = cfg
        self.key = cfg.key
        self.fn, self.batched = bind_reward(cfg)
        self._warn = RateLimitedLogger(logger, warn_interval_s)
        # Calls that may run at once: what the scorer declares (``concurrent_calls``, e.g. the
        # remote reward's max_concurrency), else 1; calls beyond it wait for this lock.
        self.concurrency = max(1, int(getattr(self.fn, "concurrent_calls", 1)))
        self._serial = threading.Lock() if self.concurrency == 1 else None

    def score(
        self, inputs: Sequence[RewardInput], deadline: RoundDeadline | None = None
    ) -> tuple[list[float], list[bool], RewardStats]:
        """Unweighted scores (0 for failed samples), which samples failed, and the counters;
        safe to call from several threads (a scorer that declares no concurrency runs alone).
        ``deadline`` reaches scorers that declare ``accepts_deadline`` (the remote reward)."""
        if self._serial is None:
            return self._score(inputs, deadline)
        with self._serial:
            return self._score(inputs, deadline)

    def _score(
        self, inputs: Sequence[RewardInput], deadline: RoundDeadline | None
    ) -> tuple[list[float], list[bool], RewardStats]:
        fn = self.fn
        if deadline is not None and getattr(fn, "accepts_deadline", False):
            fn = functools.partial(fn, deadline=deadline)
        n = len(inputs)
        stats = RewardStats(samples=n)
        scores = [0.0] * n
        failed = [False] * n
        if n == 0:
            return scores, failed, stats
        if self.batched:
            [(value, err)] = call_guarded(fn, [list(inputs)], self.cfg.timeout_s, 1)
            values = None if err is not None else _as_list(value)
            if err is None and (values is None or len(values) != n):
                got = type(value).__name__ if values is None else f"{len(values)} scores"
                err = ValueError(f"batched reward returned {got} for {n} inputs")
            outcomes = [(v, None) for v in values] if err is None else [(None, err)] * n
        else:
            outcomes = call_guarded(fn, list(inputs), self.cfg.timeout_s, self.cfg.num_workers)
        first_error: BaseException | None = None
        for i, (value, err) in enumerate(outcomes):
            x = None if err is not None else _as_score(value)
            if x is not None:
                scores[i] = x
                continue
            if isinstance(err, TimeoutError):
                stats.timeouts += 1
            else:
                stats.errors += 1
            failed[i] = True
            if first_error is None:
                first_error = err or ValueError(f"not a float32-finite score: {value!r}")
        stats.extra = self._pop_counters()
        if stats.failures:
            self._warn.warning(
                f"reward '{self.key}': {stats.failures}/{n} samples scored 0 "
                f"({stats.errors} errors, {stats.timeouts} timeouts); first: {first_error!r}"
            )
        return scores, failed, stats

    def _pop_counters(self) -> dict[str, int]:
        pop = getattr(self.fn, "pop_counters", None)
        if pop is None:
            return {}
        try:
            return {str(k): int(v) for k, v in pop().items()}
        except Exception as e:  # counters are diagnostics: never fail the batch for them
            self._warn.warning(f"reward '{self.key}': pop_counters failed: {e!r}")
            return {}

    def close(self) -> None:
        """Release what the scorer holds (HTTP sessions), where it has a ``close``."""
        close = getattr(self.fn, "close", None)
        if callable(close):
            close()


@dataclass
class RewardResult:
    """Scores of one batch: the weighted sum, each reward's own scores, and counters."""

    scores: list[float]  # sum over rewards of weight * score
    per_reward: dict[str, list[float]]  # unweighted; 0 where the sample is outside its domains
    stats: dict[str, RewardStats]
    means: dict[str, float] = field(default_factory=dict)  # over the samples each reward scored
    failed: list[bool] = field(default_factory=list)  # a reward failed, or the sum overflowed

    @classmethod
    def empty(cls, n: int) -> RewardResult:
        """``n`` samples scored 0 by no reward (``reward.rewards=[]``: an environment rewards)."""
        return cls([0.0] * n, {}, {}, {}, [False] * n)

    @classmethod
    def concat(cls, parts: Sequence[RewardResult]) -> RewardResult:
        """One result for the samples of ``parts``, in order (batches scored one by one)."""
        scores = [x for p in parts for x in p.scores]
        keys = list(dict.fromkeys(k for p in parts for k in p.stats))
        per_reward = {k: [x for p in parts for x in p.per_reward[k]] for k in keys}
        stats: dict[str, RewardStats] = {k: RewardStats() for k in keys}
        means: dict[str, float] = {}
        for k in keys:
            scored = 0
            total = 0.0
            for p in parts:
                stats[k].add(p.stats[k])
                if k in p.means:
                    total += p.means[k] * p.stats[k].samples
                    scored += p.stats[k].samples
            if scored:
                means[k] = total / scored
        failed = [x for p in parts for x in p.failed]
        return cls(scores, per_reward, stats, means, failed)

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Flat ``{prefix}/{key}/{counter}`` numbers for TensorBoard / metrics.jsonl."""
        out: dict[str, float] = {}
        if self.scores:
            out[f"{prefix}/total/mean"] = sum(self.scores) / len(self.scores)
        for key, stats in self.stats.items():
            if key in self.means:
                out[f"{prefix}/{key}/mean"] = self.means[key]
            for name, v in stats.as_dict().items():
                out[f"{prefix}/{key}/{name}"] = float(v)
        return out


_CONFIG_FIELDS = {f.name for f in fields(RewardConfig)}


def _to_config(c: RewardConfig | Mapping[str, Any], i: int) -> RewardConfig:
    if isinstance(c, RewardConfig):
        return c
    if not isinstance(c, Mapping):
        raise ValueError(
            f"rewards[{i}] must be a RewardConfig or a mapping, got {type(c).__name__}"
        )
    unknown = sorted(set(c) - _CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"rewards[{i}]: unknown fields {unknown}; known: {sorted(_CONFIG_FIELDS)}")
    if "name" not in c:
        raise ValueError(f"rewards[{i}]: missing field 'name'")
    return RewardConfig(**c)


def check_reward_configs(configs: Sequence[RewardConfig | Mapping[str, Any]]) -> None:
    """Each entry's fields, and its function found (a ``module:function`` imported, not called;
    a registered name known): the config check that runs before any model is built. Raises
    ValueError naming the entry."""
    for i, c in enumerate(configs):
        try:
            cfg = _to_config(c, i)
        except ValueError as e:
            raise ValueError(f"reward.{e}") from None  # "rewards[i]: ..."
        reward_entry(cfg, where=f"reward.rewards[{i}].name")


class RewardManager:
    """The weighted sum of several rewards; construction validates every config and fails early."""

    def __init__(
        self, configs: Sequence[RewardConfig | Mapping[str, Any]], warn_interval_s: float = 60.0
    ) -> None:
        cfgs = [_to_config(c, i) for i, c in enumerate(configs)]
        if not cfgs:
            raise ValueError("rewards: at least one reward must be configured")
        keys = [c.key for c in cfgs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"rewards: duplicate reward keys {dup}; give each a distinct 'tag'")
        self.rewards: list[Reward] = []
        try:
            for c in cfgs:
                self.rewards.append(Reward(c, warn_interval_s))
        except Exception:
            self.close()
            raise
        self.totals: dict[str, RewardStats] = {k: RewardStats() for k in keys}
        self._totals_lock = threading.Lock()

    @property
    def concurrency(self) -> int:
        """How many batches may be scored at once with profit: the largest concurrency a reward
        declares (1 unless one does, e.g. ``remote``'s max_concurrency). Calls are thread-safe."""
        return max(r.concurrency for r in self.rewards)

    def __call__(
        self, inputs: Sequence[RewardInput], deadline: RoundDeadline | None = None
    ) -> RewardResult:
        """Score ``inputs``; failures score 0 and are counted, they never raise. ``deadline``:
        the round's (scorers that take one stop at it; see ``unscored`` for the others)."""
        n = len(inputs)
        total = [0.0] * n
        per_reward: dict[str, list[float]] = {}
        stats: dict[str, RewardStats] = {}
        means: dict[str, float] = {}
        failed = [False] * n
        for r in self.rewards:
            domains = r.cfg.domains
            idx = [i for i in range(n) if domains is None or inputs[i].domain in domains]
            sub, bad, st = r.score([inputs[i] for i in idx], deadline)
            full = [0.0] * n
            for i, x, b in zip(idx, sub, bad, strict=True):
                full[i] = x
                total[i] += r.cfg.weight * x
                failed[i] |= b
            per_reward[r.key], stats[r.key] = full, st
            if idx:
                means[r.key] = sum(sub) / len(sub)
            with self._totals_lock:
                self.totals[r.key].add(st)
        for i, x in enumerate(total):
            if not finite_in_float32(x):  # each score fits, their weighted sum does not
                total[i], failed[i] = 0.0, True
        return RewardResult(total, per_reward, stats, means, failed)

    def unscored(self, inputs: Sequence[RewardInput]) -> RewardResult:
        """The result for ``inputs`` whose scoring missed the round's deadline: every sample
        failed (0, a timeout of each reward that covers it), handled like any reward failure."""
        n = len(inputs)
        per_reward: dict[str, list[float]] = {}
        stats: dict[str, RewardStats] = {}
        for r in self.rewards:
            domains = r.cfg.domains
            covered = sum(1 for x in inputs if domains is None or x.domain in domains)
            per_reward[r.key] = [0.0] * n
            stats[r.key] = RewardStats(samples=covered, timeouts=covered)
            with self._totals_lock:
                self.totals[r.key].add(stats[r.key])
        failed = [
            any(r.cfg.domains is None or x.domain in r.cfg.domains for r in self.rewards)
            for x in inputs
        ]
        return RewardResult([0.0] * n, per_reward, stats, {}, failed)

    def close(self) -> None:
        """Close every reward that holds resources."""
        for r in self.rewards:
            r.close()

    def __enter__(self) -> RewardManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
