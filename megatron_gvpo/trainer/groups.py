"""Prompt groups, from the engine to the round's batch: rollout and scoring on the driver rank,
filters, replay, and the per-sample ``RolloutBatch`` every rank trains on."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import torch

from megatron_gvpo.data.prompts import Prompt
from megatron_gvpo.models.routing_replay import check_engine_routes
from megatron_gvpo.parallel.cpu_compat import native_torch
from megatron_gvpo.rewards import RewardInput, RewardManager, RewardResult
from megatron_gvpo.rewards.guard import RoundDeadline
from megatron_gvpo.rollout.base import GenerateRequest, RolloutEngine, Sample, SamplingParams
from megatron_gvpo.rollout.round import generate_round
from megatron_gvpo.rollout.turns import Trajectory, TurnRunner, trajectory_metrics
from megatron_gvpo.trainer.batch import RolloutBatch
from megatron_gvpo.trainer.replay import ReplayBuffer


@dataclass
class PromptGroup:
    """One prompt and its sampled responses: what GVPO and GRPO compare with each other."""

    prompt_ids: list[int]
    responses: list[list[int]]
    rewards: list[float]
    domain: str | None = None
    engine_logprobs: list[list[float]] = field(default_factory=list)
    """The engine's logprob of each response token (empty for replayed groups)."""
    reward_failed: list[bool] = field(default_factory=list)
    """Responses whose reward failed (scored 0; empty: none, or a replayed group)."""
    weight_versions: list[int] = field(default_factory=list)
    """The engine weight version that sampled each response (empty for replayed groups)."""
    loss_masks: list[list[int]] = field(default_factory=list)
    """Per response, 1 on the model's tokens and 0 on observations (multi-turn trajectories;
    empty: every response token is the model's)."""
    routes: list[torch.Tensor | None] = field(default_factory=list)
    """Per response, the engine's experts per token [MoE layers, tokens, top-k] (``Sample.routes``,
    for ``model.moe.routing_replay=rollout``; empty when the engine reported none)."""

    def select(self, keep: Sequence[int]) -> PromptGroup:
        """The group restricted to the responses at ``keep``."""

        def pick(xs: list) -> list:
            return [xs[j] for j in keep] if xs else []

        return PromptGroup(
            self.prompt_ids,
            pick(self.responses),
            pick(self.rewards),
            self.domain,
            pick(self.engine_logprobs),
            pick(self.reward_failed),
            pick(self.weight_versions),
            pick(self.loss_masks),
            pick(self.routes),
        )

    def to_replay(self) -> tuple:
        return (self.prompt_ids, self.responses, self.rewards, self.domain, self.loss_masks)

    @classmethod
    def from_replay(cls, stored: Sequence) -> PromptGroup:
        prompt_ids, responses, rewards, domain = stored[:4]
        masks = [list(m) for m in stored[4]] if len(stored) > 4 else []  # older checkpoints: 4
        return cls(
            list(prompt_ids), [list(r) for r in responses], list(rewards), domain, loss_masks=masks
        )


@dataclass
class RolloutResult:
    """What the driver rank broadcasts after a rollout: the groups and the phase's metrics."""

    groups: list[PromptGroup]
    metrics: dict[str, float]
    reward_seconds: float
    """Time spent waiting for rewards after the last response arrived."""


_DEADLINE_GRACE_S = 0.5
"""How long past a round's reward deadline scoring may take to hand back what it has."""


def request_seed(seed: int, step: int, i: int) -> int:
    """The sampling seed of prompt ``i`` of round ``step`` (reproducible per run seed)."""
    return ((seed * 1_000_003 + step) * 100_003 + i) % (2**31 - 1)


def env_row(prompt: Prompt) -> dict:
    """The dataset row an environment is built with: the row's other fields, the prompt text
    (template applied), ``answer`` and ``domain``."""
    return {**prompt.metadata, "prompt": prompt.text, "answer": prompt.answer,
            "domain": prompt.domain}


@native_torch()  # the round's sampling, scoring and grouping make no CUDA assumption
def rollout_and_score(
    engine: RolloutEngine,
    rewards: RewardManager | None,
    rows: Sequence[Prompt],
    sampling: SamplingParams,
    n: int,
    seeds: Sequence[int],
    *,
    round_timeout_s: float | None = None,
    turns: TurnRunner | None = None,
) -> RolloutResult:
    """Driver rank: ``n`` responses per prompt, every request in flight at once (engines that
    batch continuously keep their servers busy), each group scored as soon as its last response
    arrives while the others still generate (up to ``rewards.concurrency`` groups at once: a
    remote reward's ``max_concurrency``, else one).

    ``round_timeout_s`` (``reward.round_timeout_s``): the round's rewards are due that long after
    its last response arrives. Scorers that take the deadline (the remote reward) stop at it;
    groups still unscored then fail (``reward.on_error`` decides: dropped or trained as 0) and
    are counted in ``reward_fn/round_deadline_missed``; their threads are not waited for.

    With ``turns`` every response is a multi-turn trajectory with the ``rollout.env``
    environment; its reward is the sum of its turns' rewards plus ``rewards`` (None: none) on
    its model turns, and an environment failure fails its reward."""
    requests = [GenerateRequest(row.prompt_ids, n, s) for row, s in zip(rows, seeds, strict=True)]
    arrived = [0] * len(requests)
    scoring: dict[int, Future] = {}
    deadline = RoundDeadline(round_timeout_s)
    busy = [0.0]
    busy_lock = threading.Lock()

    def inputs(i: int) -> list[RewardInput]:
        row = rows[i]
        return [RewardInput(row.text, s.text, row.answer, row.domain) for s in samples[i]]

    def with_env(i: int, result: RewardResult) -> RewardResult:
        return with_env_rewards(result, samples[i]) if turns is not None else result

    def score(i: int) -> RewardResult:
        clock = time.perf_counter()
        try:
            if rewards is None:
                return with_env(i, RewardResult.empty(n))
            return with_env(i, rewards(inputs(i), deadline))
        finally:
            with busy_lock:
                busy[0] += time.perf_counter() - clock

    start = time.perf_counter()
    samples: list[list[Sample | None]] = [[None] * n for _ in requests]
    pool = ThreadPoolExecutor(rewards.concurrency if rewards is not None else 1,
                              thread_name_prefix="reward")
    missed = 0
    try:

        def on_sample(i: int, j: int, sample: Sample) -> None:
            samples[i][j] = sample
            arrived[i] += 1
            if arrived[i] == n:
                scoring[i] = pool.submit(score, i)

        if turns is None:
            generate_round(engine, requests, sampling, on_sample=on_sample)
        else:
            turns.run(engine, requests, [env_row(r) for r in rows], sampling, on_sample)
        gen_s = time.perf_counter() - start
        clock = time.perf_counter()
        deadline.start()
        # a scorer that takes the deadline returns right after it: wait that long, plus a grace
        bound = None if round_timeout_s is None else deadline.remaining() + _DEADLINE_GRACE_S
        wait_futures(list(scoring.values()), timeout=bound)
        parts = []
        for i in range(len(requests)):
            if scoring[i].done():
                parts.append(scoring[i].result())
            else:
                parts.append(with_env(i, rewards.unscored(inputs(i))))
                missed += n
        result = RewardResult.concat(parts)
        wait_s = time.perf_counter() - clock
    finally:  # never wait for scoring that missed the deadline (queued groups never start)
        pool.shutdown(wait=round_timeout_s is None, cancel_futures=round_timeout_s is not None)
    groups, offset = [], 0
    for row, group in zip(rows, samples, strict=True):
        groups.append(
            PromptGroup(
                list(row.prompt_ids),
                [s.response_ids for s in group],
                result.scores[offset : offset + n],
                row.domain,
                [s.logprobs for s in group],
                result.failed[offset : offset + n],
                [s.weight_version for s in group],
                [s.loss_mask for s in group] if turns is not None else [],
                [s.routes for s in group] if any(s.routes is not None for s in group) else [],
            )
        )
        offset += n
    flat = [s for group in samples for s in group]
    finish = Counter(s.finish_reason for s in flat)
    gen_tokens = sum(len(s.response_ids) for s in flat)
    metrics = {
        "rollout/tokens_per_s": gen_tokens / max(gen_s, 1e-9),
        "rollout/generate_s": gen_s,
        "rollout/reward_busy_s": busy[0],  # scoring time, mostly hidden behind generation
        **{f"rollout/finish_{k}": v / max(len(flat), 1) for k, v in finish.items()},
        **result.metrics("reward_fn"),
        **({"reward_fn/round_deadline_missed": missed} if round_timeout_s is not None else {}),
        **{f"engine/{k}": v for k, v in engine.metrics().items()},
    }
    if turns is not None:
        metrics.update(trajectory_metrics(flat))
    return RolloutResult(groups, metrics, wait_s)


def with_env_rewards(result: RewardResult, group: Sequence[Trajectory]) -> RewardResult:
    """``result`` plus each trajectory's environment reward; a trajectory whose environment
    failed counts as a failed reward (``reward.on_error`` decides what happens to it)."""
    result.scores = [x + t.env_reward for x, t in zip(result.scores, group, strict=True)]
    failed = result.failed or [False] * len(group)
    result.failed = [f or t.env_error is not None for f, t in zip(failed, group, strict=True)]
    return result


def filter_groups(
    groups: list[PromptGroup],
    min_response_tokens: int,
    dynamic_sampling: bool,
    drop_failed: bool,
    metrics: dict,
) -> list[PromptGroup]:
    """Drop responses shorter than ``min_response_tokens`` (at least 1 token) and, with
    ``drop_failed`` (``reward.on_error=drop``), responses whose reward failed (a failure is no
    0: the group's statistics use the others); then, with ``dynamic_sampling`` (DAPO), groups
    whose rewards are all equal. Counts what was dropped."""
    kept, short, failed = [], 0, 0
    for g in groups:
        keep = [j for j, r in enumerate(g.responses) if len(r) >= max(1, min_response_tokens)]
        short += len(g.responses) - len(keep)
        failed += sum(g.reward_failed)
        if drop_failed and g.reward_failed:
            keep = [j for j in keep if not g.reward_failed[j]]
        kept.append(g.select(keep))
    metrics["filter/short_responses"] = short
    metrics["filter/reward_failed"] = failed
    if dynamic_sampling:
        before = len(kept)
        kept = [g for g in kept if g.rewards and max(g.rewards) > min(g.rewards)]
        metrics["filter/constant_reward_groups"] = before - len(kept)
    return kept


def drop_stale(
    groups: list[PromptGroup], actor_version: int, max_staleness: int, metrics: dict
) -> list[PromptGroup]:
    """Drop responses sampled by weights older than ``actor_version - max_staleness`` (counted
    in ``async/dropped_stale``) and report the staleness ``actor_version - weight version`` of
    the kept ones. Responses of unknown version (-1: an engine that does not report one) are
    kept and counted in ``async/unknown_version``."""
    kept, dropped, unknown, staleness = [], 0, 0, []
    for g in groups:
        keep = []
        for j, v in enumerate(g.weight_versions or [-1] * len(g.responses)):
            if v < 0:
                unknown += 1
                keep.append(j)
            elif actor_version - v <= max_staleness:
                staleness.append(actor_version - v)
                keep.append(j)
        dropped += len(g.responses) - len(keep)
        kept.append(g if len(keep) == len(g.responses) else g.select(keep))
    metrics["async/dropped_stale"] = dropped
    metrics["async/unknown_version"] = unknown
    if staleness:
        metrics["async/staleness_mean"] = sum(staleness) / len(staleness)
        metrics["async/staleness_max"] = max(staleness)
        metrics["async/version_lag"] = min(staleness)  # how many syncs the newest sample missed
    return kept


def mix_replay(
    fresh: list[PromptGroup], replay: ReplayBuffer, ratio: float, rng: random.Random, metrics: dict
) -> list[PromptGroup]:
    """Fresh groups followed by ``ratio`` replayed groups per fresh one (GVPO, Theorem 2); the
    fresh ones then join the buffer."""
    if ratio <= 0:
        return fresh
    replayed = [PromptGroup.from_replay(g) for g in replay.sample(round(ratio * len(fresh)), rng)]
    replay.add([g.to_replay() for g in fresh])
    metrics["replay/groups"] = len(replayed)
    return fresh + replayed


def to_batch(
    groups: Sequence[PromptGroup],
    domains: Sequence[str],
    moe_layers: int = 0,
) -> RolloutBatch:
    """One row per response; group ids are the groups' positions, domains index ``domains``.

    ``moe_layers`` (``model.moe.routing_replay=rollout``: the model's number of MoE layers): the
    engine's routes become ``batch.routes``, as reported; a response without them, or with
    another number of layers, is an error (on every rank, before any forward)."""
    prompt_ids, response_ids, gids, rewards, doms = [], [], [], [], []
    engine = [torch.tensor(lp, dtype=torch.float32) for g in groups for lp in g.engine_logprobs]
    masks = [
        torch.tensor(g.loss_masks[j], dtype=torch.bool) if g.loss_masks else None
        for g in groups
        for j in range(len(g.responses))
    ]
    for gi, g in enumerate(groups):
        d = domains.index(g.domain) if g.domain in domains else 0
        for resp, rew in zip(g.responses, g.rewards, strict=True):
            prompt_ids.append(list(g.prompt_ids))
            response_ids.append(list(resp))
            gids.append(gi)
            rewards.append(float(rew))
            doms.append(d)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        group_ids=torch.tensor(gids, dtype=torch.long),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        domains=torch.tensor(doms, dtype=torch.long),
        rollout_logprobs=engine if _aligned(engine, response_ids) else None,
        loss_masks=_full_masks(masks, response_ids),
        routes=_batch_routes(groups, moe_layers) if moe_layers else None,
    )


def _batch_routes(groups: Sequence[PromptGroup], moe_layers: int) -> list[torch.Tensor]:
    """Per response, the engine's [MoE layers, tokens, top-k] routes (replay targets)."""
    out = [r for g in groups for r in (g.routes or [None] * len(g.responses))]
    if any(r is None for r in out):
        raise RuntimeError(
            "model.moe.routing_replay=rollout: the rollout engine reported no routes for a response"
        )
    check_engine_routes(out, moe_layers)
    return out


def _full_masks(
    masks: list[torch.Tensor | None], responses: list[list[int]]
) -> list[torch.Tensor] | None:
    """Per-response loss masks, all-true where a group has none; None when no group has one."""
    if all(m is None for m in masks):
        return None
    return [
        m if m is not None else torch.ones(len(r), dtype=torch.bool)
        for m, r in zip(masks, responses, strict=True)
    ]


def _aligned(engine: list[torch.Tensor], responses: list[list[int]]) -> bool:
    """Every response has one engine logprob per token (replayed groups have none)."""
    return len(engine) == len(responses) and all(
        e.numel() == len(r) for e, r in zip(engine, responses, strict=True)
    )


def reward_metrics(groups: Sequence[PromptGroup]) -> dict[str, float]:
    """Reward mean/std/accuracy (overall and per domain), response lengths, size-1 groups."""
    metrics: dict[str, float] = {}
    rewards = [x for g in groups for x in g.rewards]
    lengths = [len(r) for g in groups for r in g.responses]
    if rewards:
        t = torch.tensor(rewards, dtype=torch.float64)
        metrics["reward/mean"] = t.mean().item()
        metrics["reward/std"] = t.std(correction=0).item()
        metrics["reward/accuracy"] = (t >= 1.0 - 1e-9).double().mean().item()
    by_domain: dict[str, list[float]] = {}
    for g in groups:
        by_domain.setdefault(str(g.domain), []).extend(g.rewards)
    if len(by_domain) > 1:
        for d, xs in by_domain.items():
            if not xs:  # every response of the domain was dropped
                continue
            metrics[f"reward/mean/{d}"] = sum(xs) / len(xs)
            metrics[f"reward/accuracy/{d}"] = sum(x >= 1.0 - 1e-9 for x in xs) / len(xs)
    if lengths:
        metrics["response_length/mean"] = sum(lengths) / len(lengths)
        metrics["response_length/max"] = max(lengths)
    metrics["groups/size1"] = sum(1 for g in groups if len(g.responses) == 1)
    return metrics


@dataclass(frozen=True)
class BatchRules:
    """What a round keeps of its groups, and how replayed groups join them (fixed for the run)."""

    min_response_tokens: int
    """``trainer.min_response_tokens``: shorter responses are dropped."""
    dynamic_sampling: bool
    """``trainer.dynamic_sampling``: groups whose rewards are all equal are dropped (DAPO)."""
    drop_failed: bool
    """``reward.on_error=drop``: responses whose reward failed are dropped."""
    max_staleness: int
    """``trainer.async_training.max_staleness``: responses of older weights are dropped."""
    replay_ratio: float
    """``trainer.replay_ratio``: replayed groups per fresh group."""
    moe_layers: int = 0
    """``model.moe.routing_replay=rollout``: the model's number of MoE layers, whose routes the
    engine reports and the batch carries (:func:`to_batch`); 0: no routes."""


def assemble_batch(
    groups: list[PromptGroup],
    rules: BatchRules,
    actor_version: int,
    replay: ReplayBuffer,
    rng: random.Random,
    domains: Sequence[str],
    metrics: dict,
) -> tuple[RolloutBatch | None, list[PromptGroup]]:
    """A round's batch from its groups, and the fresh groups in it: the filters, then the reward
    metrics of what is left; None when no group with two responses is left (nothing joins the
    replay buffer then), else the fresh groups followed by replayed ones. The actor is at
    ``actor_version``; samples older than the staleness bound are dropped."""
    groups = filter_groups(
        groups, rules.min_response_tokens, rules.dynamic_sampling, rules.drop_failed, metrics
    )
    groups = drop_stale(groups, actor_version, rules.max_staleness, metrics)
    metrics.update(reward_metrics(groups))
    fresh = [g for g in groups if g.responses]
    if not any(len(g.responses) >= 2 for g in fresh):
        return None, fresh
    batch = to_batch(mix_replay(fresh, replay, rules.replay_ratio, rng, metrics), domains,
                     rules.moe_layers)  # fmt: skip
    return batch, fresh
