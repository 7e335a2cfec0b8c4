"""Held-out evaluation during training, and the best checkpoint it selects.

An eval set is a prompt file with the training data's row schema (``data.eval_path``, or several
named ones in ``data.eval_sets``), scored by the run's own rewards. The driver rank samples it
through the run's own engine (local, the local engine in its own process, or SGLang) with the
``eval.*`` sampling settings (greedy by default), right after a weight sync: the engine then holds
the weights just trained and nothing else is in flight, so no round generated ahead (async) is
ever scored as if it were current. Every response's weight version is checked against the
actor's. Greedy is temperature 0 on every engine: the local engine takes the argmax, and SGLang
0.5.23 turns a temperature below 1e-6 into top_k = 1 (``srt/sampling/sampling_params.py:245``).

Metrics, per set (``eval/`` for ``data.eval_path``, ``eval/<name>/`` for a named set):

- ``reward``: mean reward over all responses (a failed reward counts 0, and is counted in
  ``reward_failed``);
- ``accuracy``: share of responses whose reward is at least ``eval.correct_threshold``, also per
  domain (``accuracy/<domain>``) when the set has more than one;
- with ``eval.n_samples = n > 1``: ``pass@k`` for k = 2, 4, 8, ... below n and k = n, with the
  unbiased estimator of Chen et al. 2021 (1 - C(n - c, k) / C(n, k) per prompt with c correct
  responses, averaged over prompts), and ``mean@n``, the mean over prompts of the mean reward of
  their n responses;
- ``response_length``: mean response tokens.

The schedule (``trainer.eval_at_start``, ``trainer.eval_interval``) and the best checkpoint
(``trainer.save_best``) are shared by every driver through :class:`EvalSchedule`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from megatron_gvpo.data.prompts import Prompt
from megatron_gvpo.rewards import RewardManager
from megatron_gvpo.rollout.base import RolloutEngine, SamplingParams
from megatron_gvpo.rollout.turns import TurnRunner
from megatron_gvpo.trainer.groups import PromptGroup, request_seed, rollout_and_score

EVAL_SEED = 7_919  # eval sampling seeds are a stream of their own, the same at every evaluation


@dataclass
class EvalSection:
    """``eval.*``: how held-out prompts are sampled and scored. The sets are ``data.eval_path``
    and ``data.eval_sets``; when they run, ``trainer.eval_interval`` and
    ``trainer.eval_at_start``."""

    temperature: float = 0.0
    """Sampling temperature of eval responses; 0 = greedy."""
    n_samples: int = 1
    """Responses per eval prompt (n); pass@k and mean@n are reported when n > 1 (needs
    eval.temperature > 0: greedy responses would all be equal)."""
    max_new_tokens: int | None = None
    """Response length limit; None: rollout.max_new_tokens."""
    top_p: float = 1.0
    """Nucleus sampling of eval responses (with eval.temperature > 0)."""
    correct_threshold: float = 1.0
    """A response counts as correct (accuracy, pass@k) when its reward is at least this."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"eval.temperature must be >= 0, got {self.temperature}")
        if isinstance(self.n_samples, bool) or self.n_samples < 1:
            raise ValueError(f"eval.n_samples must be >= 1, got {self.n_samples}")
        if self.n_samples > 1 and self.temperature == 0:
            raise ValueError(
                f"eval.n_samples={self.n_samples} with eval.temperature=0: greedy responses "
                "are all equal; set eval.temperature > 0 (e.g. 1.0) for pass@k"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"eval.top_p must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.correct_threshold):
            raise ValueError(f"eval.correct_threshold must be finite, got {self.correct_threshold}")


def eval_set_config(base: EvalSection, name: str, spec: Any) -> tuple[Any, EvalSection]:
    """``data.eval_sets.<name>``: a path (file, folder or list), or a mapping with ``path`` and
    any ``eval.*`` field to use for that set instead (e.g. ``{path: x.jsonl, temperature: 1.0,
    n_samples: 8}`` for pass@8 beside a greedy set). Returns (path, that set's settings)."""
    if not isinstance(spec, Mapping):
        return spec, base
    spec = dict(spec)
    if "path" not in spec:
        raise ValueError(f"data.eval_sets.{name}: a mapping needs a 'path'")
    path = spec.pop("path")
    known = {f.name for f in fields(EvalSection)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(
            f"unknown config key data.eval_sets.{name}.{unknown[0]} (known: path, "
            f"{', '.join(sorted(known))})"
        )
    try:
        return path, EvalSection(**{**asdict(base), **spec})
    except (TypeError, ValueError) as e:
        raise ValueError(f"data.eval_sets.{name}: {e}") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n responses of which c are correct: 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k of the reported pass@k: powers of two between 1 and n (exclusive), and n."""
    ks, k = [], 2
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n] if n > 1 else []


def set_metrics(groups: Sequence[PromptGroup], n: int, threshold: float) -> dict[str, float]:
    """One set's metrics from its scored groups (every group holds the prompt's n responses)."""
    rewards = [r for g in groups for r in g.rewards]
    correct = [[r >= threshold for r in g.rewards] for g in groups]
    lengths = [len(r) for g in groups for r in g.responses]
    out = {
        "reward": sum(rewards) / len(rewards),
        "accuracy": sum(map(sum, correct)) / len(rewards),
        "response_length": sum(lengths) / len(lengths),
        "reward_failed": float(sum(sum(g.reward_failed) for g in groups)),
    }
    by_domain: dict[str, list[bool]] = {}
    for g, c in zip(groups, correct, strict=True):
        by_domain.setdefault(str(g.domain), []).extend(c)
    if len(by_domain) > 1:
        for d, cs in sorted(by_domain.items()):
            out[f"accuracy/{d}"] = sum(cs) / len(cs)
    for k in pass_ks(n):
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(c), k) for c in correct) / len(groups)
    if n > 1:
        out[f"mean@{n}"] = sum(sum(g.rewards) / n for g in groups) / len(groups)
    return out


class Evaluator:
    """Samples and scores the eval sets through an engine (driver rank only). ``sets`` maps a
    set's name ("" for data.eval_path) to its prompts and its ``eval.*`` settings."""

    def __init__(
        self,
        sets: Mapping[str, tuple[Sequence[Prompt], EvalSection]],
        rollout_max_new_tokens: int,
        stop: Sequence[str] = (),
        seed: int = 0,
        round_timeout_s: float | None = None,
        turns: TurnRunner | None = None,
    ):
        self.sets = dict(sets)
        self.max_new_tokens = rollout_max_new_tokens
        self.stop = list(stop)
        self.seed = seed
        self.round_timeout_s = round_timeout_s  # reward.round_timeout_s, per eval set
        self.turns = turns

    @classmethod
    def build(
        cls,
        sets: Mapping[str, Sequence[Prompt]],
        cfg: EvalSection,
        specs: Mapping[str, Any],
        rollout_max_new_tokens: int,
        stop: Sequence[str] = (),
        seed: int = 0,
        round_timeout_s: float | None = None,
        turns: TurnRunner | None = None,
    ) -> Evaluator:
        """From the loaded sets, ``eval.*`` and ``data.eval_sets`` (each set's own settings)."""
        with_cfg = {
            name: (prompts, eval_set_config(cfg, name, specs[name])[1] if name else cfg)
            for name, prompts in sets.items()
        }
        return cls(with_cfg, rollout_max_new_tokens, stop, seed, round_timeout_s, turns)

    def _sampling(self, cfg: EvalSection) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=cfg.max_new_tokens or self.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop=self.stop,
        )

    def run(
        self, engine: RolloutEngine, rewards: RewardManager | None, version: int | None = None
    ) -> dict[str, float]:
        """Every set's metrics under ``eval/``; ``version``: the weight version the engine must
        hold (checked against every response that reports one)."""
        start = time.perf_counter()
        out: dict[str, float] = {}
        versions: set[int] = set()
        for name, (prompts, cfg) in self.sets.items():
            n = cfg.n_samples
            seeds = [request_seed(self.seed + EVAL_SEED, 0, i) for i in range(len(prompts))]
            sampling = self._sampling(cfg)
            result = rollout_and_score(
                engine, rewards, prompts, sampling, n, seeds,
                round_timeout_s=self.round_timeout_s, turns=self.turns,
            )
            versions.update(v for g in result.groups for v in g.weight_versions if v >= 0)
            prefix = f"eval/{name}/" if name else "eval/"
            metrics = set_metrics(result.groups, n, cfg.correct_threshold)
            for key in ("turns/mean", "multi_turn_rate"):  # multi-turn rollouts
                if f"rollout/{key}" in result.metrics:
                    metrics[key.replace("/", "_")] = result.metrics[f"rollout/{key}"]
            out.update({prefix + k: v for k, v in metrics.items()})
        if version is not None and versions - {version}:
            raise RuntimeError(
                f"evaluation sampled by engine weight version(s) {sorted(versions)}, but the "
                f"actor is at version {version}: eval must run on the weights just synced"
            )
        if versions:
            out["eval/weight_version"] = float(min(versions))
        out["time/eval"] = time.perf_counter() - start
        return out


class EvalSchedule:
    """When a driver evaluates, and which checkpoint is the best so far.

    ``trainer.eval_at_start``: a step-0 row before any update (fresh runs only: a resumed run
    already has it). ``trainer.eval_interval``: every that many steps (0: only at the end); the
    last step always evaluates. ``trainer.save_best=<metric>``: the checkpoint of the step whose
    eval metric is best so far (``trainer.save_best_mode``: max or min) is kept beside the
    ``keep_last`` ones and named in ``checkpoints/best.json``. Its state is checkpointed, so a
    resumed run goes on comparing against the same best.
    """

    def __init__(
        self, interval: int, at_start: bool, max_steps: int, metric: str | None, mode: str = "max"
    ):
        self.interval, self.at_start, self.max_steps = interval, at_start, max_steps
        self.metric, self.mode = metric, mode
        self.best_value: float | None = None
        self.best_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether step ``step`` (0: before training) evaluates."""
        if step == 0:
            return self.at_start
        return step == self.max_steps or bool(self.interval and step % self.interval == 0)

    def after_step(
        self, step: int, evaluate: Callable[[], dict[str, float]], metrics: dict[str, float]
    ) -> bool:
        """When step ``step`` is due, ``evaluate()`` into ``metrics``; True when that is a new
        best (the driver then saves this step)."""
        if not self.due(step):
            return False
        evals = evaluate()
        metrics.update(evals)
        return self.improved(step, evals)

    def improved(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Record ``metrics`` of ``step``; True when they hold a new best (save this step)."""
        if self.metric is None or self.metric not in metrics:
            return False
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            return False
        if self.best_value is not None:
            better = value > self.best_value if self.mode == "max" else value < self.best_value
            if not better:
                return False
        self.best_value, self.best_step = value, step
        return True

    def protected_steps(self) -> set[int]:
        """Checkpoint steps pruning must keep (the best one)."""
        return {self.best_step} if self.best_step else set()

    def write_best(self, ckpt_root: Path) -> None:
        """``best.json``: the best step, its folder, metric and value (driver rank)."""
        if self.best_step is None:
            return
        record = {
            "step": self.best_step,
            "path": f"step_{self.best_step:06d}",
            "metric": self.metric,
            "value": self.best_value,
        }
        tmp = ckpt_root / f"best.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, ckpt_root / "best.json")

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_value, self.best_step = state["best_value"], state["best_step"]
