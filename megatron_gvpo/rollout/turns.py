"""Multi-turn rollouts: the turn loop between any engine and a ``rollout.env`` environment.

Token ids in, token ids out. A trajectory is the prompt followed by one id list: the engine's
turns, appended exactly as the engine returned them (never re-tokenised from text), and the
observations between them, each tokenised alone. ``loss_mask`` is 1 on the model's tokens and 0
on observation and template tokens; ``logprobs`` are the engine's on model tokens (0 elsewhere).
Every turn's request to the engine is the prompt plus the trajectory so far, so the ids the actor
trains on are the ids the engine saw.

A turn ends at EOS, at a stop string (``rollout.stop`` and ``rollout.turn_stop``, kept in the
ids and in the action text) or at ``rollout.max_new_tokens``. A trajectory ends when ``step``
says done, after ``rollout.max_turns`` turns, or when its tokens after the prompt reach
``rollout.max_total_tokens``; the last two flag it ``truncated``. Each turn is rewarded by
``step``; the sum is the trajectory's environment reward. The final observation of a trajectory
(after ``done``, or when it is cut) is not appended: nothing would follow it.

Concurrency: environment calls run in a thread pool (``rollout.env_workers``), each turn's
``step`` as soon as that turn arrives, concurrently with the other trajectories' generation and
steps. With an engine that batches continuously (``engine.continuous_batching``: SGLang), each
trajectory runs on its own: its next turn is submitted the moment its ``step`` returns, so every
live trajectory's next turn is in flight and a slow step holds up only its own trajectory. Other
engines (the embedded transformers model, which gains from batching a whole round) get turns in
waves: every live trajectory's next turn in one ``generate_stream`` call, the next wave once the
last step of this one is done. Both give the same trajectories: each turn's request and seed
depend on its own trajectory only. An environment exception or timeout ends its trajectory with
``env_error`` set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_gvpo.rollout.base import (
    GenerateRequest,
    RolloutEngine,
    Sample,
    SamplingParams,
    response_seed,
)
from megatron_gvpo.rollout.env import EnvTimeout, call_with_timeout, check_step_result

OBSERVATION_ROLES = ("tool", "user")
# Stands in for the model's turn when the chat template renders an observation after it.
_TURN_MARKER = "\u2063MODEL-TURN\u2063"


@dataclass
class TurnSettings:
    """How a trajectory is cut into turns and where it ends (``rollout.*``)."""

    max_turns: int = 1
    max_total_tokens: int = 256
    """Tokens after the prompt (model turns and observations) a trajectory may hold."""
    turn_stop: list[str] = field(default_factory=list)
    """Stop strings that end a turn (kept in the turn), on top of the sampling's own."""
    env_timeout_s: float | None = None
    """Seconds one constructor, ``reset`` or ``step`` call may take (None: no limit)."""
    env_workers: int = 16
    """Environment calls that may run at once."""

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"rollout.max_turns must be >= 1, got {self.max_turns}")
        if self.max_total_tokens < 1:
            raise ValueError(f"rollout.max_total_tokens must be >= 1, got {self.max_total_tokens}")
        if self.env_timeout_s is not None and not self.env_timeout_s > 0:
            raise ValueError(f"rollout.env_timeout_s must be > 0, got {self.env_timeout_s!r}")
        if self.env_workers < 1:
            raise ValueError(f"rollout.env_workers must be >= 1, got {self.env_workers}")


@dataclass
class Trajectory(Sample):
    """A multi-turn response: ``response_ids`` hold model turns and observations after the
    prompt; ``text`` is the model's turns only, concatenated (what ``reward.rewards`` score)."""

    loss_mask: list[int] = field(default_factory=list)
    """1 on tokens the model generated, 0 on observation and template tokens."""
    turns: int = 0
    env_reward: float = 0.0
    """The sum of the turns' rewards from ``step``."""
    truncated: bool = False
    """Cut by ``rollout.max_turns`` or ``rollout.max_total_tokens`` before ``done``."""
    env_error: str | None = None
    """``"error"`` or ``"timeout"`` when an environment call failed (the sample is dropped)."""
    env_seconds: float = 0.0
    """Wall time spent inside this trajectory's environment calls."""

    @property
    def model_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def env_tokens(self) -> int:
        return len(self.loss_mask) - sum(self.loss_mask)


class ObservationEncoder:
    """Observation text to token ids, tokenised alone (never glued to the turn before).

    ``role=None`` tokenises the text as it is. ``role="tool"|"user"`` wraps it as that role's
    message with the tokenizer's chat template: the ids are what the template renders after an
    assistant message up to the next assistant generation prompt (the end of the assistant's
    turn included, unless the model's turn already ended with that special token).
    """

    def __init__(self, tokenizer: Any, role: str | None = None):
        if role is not None and role not in OBSERVATION_ROLES:
            raise ValueError(
                f"rollout.env_observation_role={role!r}: {', '.join(OBSERVATION_ROLES)} or null"
            )
        if role is not None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"rollout.env_observation_role={role} needs a tokenizer with a chat template "
                "(this one has none); set it to null to append observations as plain text"
            )
        self.tokenizer = tokenizer
        self.role = role
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def encode(self, text: str, last_model_token: int | None = None) -> list[int]:
        """The observation's ids; ``last_model_token`` is the id that ended the model's turn."""
        if self.role is not None:
            text = self._wrap(text)
            if last_model_token in self._special:
                end = self.tokenizer.decode([last_model_token], skip_special_tokens=False)
                if end and text.startswith(end):
                    text = text[len(end) :]
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _wrap(self, text: str) -> str:
        messages = [
            {"role": "user", "content": "."},
            {"role": "assistant", "content": _TURN_MARKER},
            {"role": self.role, "content": text},
        ]
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        at = rendered.find(_TURN_MARKER)
        if at < 0:
            raise ValueError(
                "rollout.env_observation_role: the chat template does not render an assistant "
                "message's content"
            )
        return rendered[at + len(_TURN_MARKER) :]


def turn_seed(seed: int | None, j: int, turn: int) -> int | None:
    """The sampling seed of turn ``turn`` of trajectory ``j`` of a request seeded ``seed``."""
    if seed is None:
        return None
    return response_seed(response_seed(seed, j), turn)


@dataclass
class _Live:
    """One trajectory being rolled out."""

    slot: tuple[int, int]
    prompt: list[int]
    seed: int | None
    env: Any = None
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish: str = "length"
    turns: int = 0
    reward: float = 0.0
    over: bool = False
    truncated: bool = False
    error: str | None = None
    env_s: float = 0.0
    routes: torch.Tensor | None = None  # the last turn's engine routes (MoE routing replay)


OnTrajectory = Callable[[int, int, Trajectory], None]


def _next_turn(t: _Live) -> GenerateRequest:
    """The request for trajectory ``t``'s next turn: the prompt and its ids so far, one response
    seeded by the trajectory's slot and turn number."""
    return GenerateRequest(t.prompt + t.ids, 1, turn_seed(t.seed, t.slot[1], t.turns))


class TurnRunner:
    """Rolls out groups of trajectories through ``engine`` with the environment class
    ``env_cls``; ``tokenizer`` decodes turns into actions and encodes observations."""

    def __init__(
        self,
        env_cls: type,
        tokenizer: Any,
        settings: TurnSettings,
        observation_role: str | None = None,
    ):
        self.env_cls = env_cls
        self.tokenizer = tokenizer
        self.settings = settings
        self.encoder = ObservationEncoder(tokenizer, observation_role)

    def run(
        self,
        engine: RolloutEngine,
        requests: Sequence[GenerateRequest],
        rows: Sequence[dict],
        sampling: SamplingParams,
        on_trajectory: OnTrajectory | None = None,
    ) -> list[list[Trajectory]]:
        """``requests[i].n`` trajectories per request (environment built from ``rows[i]``), in
        request and response order; ``on_trajectory(i, j, t)`` runs as each one ends."""
        if len(rows) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(rows)} environment rows")
        s = self.settings
        turn_sampling = SamplingParams(
            max_new_tokens=min(sampling.max_new_tokens, s.max_total_tokens),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop=list(dict.fromkeys([*sampling.stop, *s.turn_stop])),
            stop_token_ids=list(sampling.stop_token_ids),
        )
        trajs = [
            _Live((i, j), list(req.prompt_ids), req.seed)
            for i, req in enumerate(requests)
            for j in range(req.n)
        ]
        done: dict[tuple[int, int], Trajectory] = {}

        def finish(t: _Live) -> None:
            traj = self._to_trajectory(t)
            done[t.slot] = traj
            if on_trajectory is not None:
                on_trajectory(*t.slot, traj)

        with ThreadPoolExecutor(s.env_workers, thread_name_prefix="env") as pool:
            starts = [pool.submit(self._start, t, rows[t.slot[0]]) for t in trajs]
            for t, fut in zip(trajs, starts, strict=True):
                fut.result()
                if t.over:
                    finish(t)
            live = [t for t in trajs if not t.over]
            if getattr(engine, "continuous_batching", False):
                self._run_each(engine, pool, live, turn_sampling, finish)
            else:
                self._run_waves(engine, pool, live, turn_sampling, finish)
        return [[done[i, j] for j in range(req.n)] for i, req in enumerate(requests)]

    def _run_waves(
        self,
        engine: RolloutEngine,
        pool: ThreadPoolExecutor,
        live: list[_Live],
        sampling: SamplingParams,
        finish: Callable[[_Live], None],
    ) -> None:
        """One ``generate_stream`` call per turn for every live trajectory (steps overlap it)."""
        while live:
            steps: list[tuple[_Live, Future]] = []
            reqs = [_next_turn(t) for t in live]
            for k, _, sample in engine.generate_stream(reqs, sampling):
                t = live[k]
                self._append_turn(t, sample)
                steps.append((t, pool.submit(self._step, t)))
            for t, fut in steps:
                fut.result()
                if t.over:
                    finish(t)
            live = [t for t in live if not t.over]

    def _run_each(
        self,
        engine: RolloutEngine,
        pool: ThreadPoolExecutor,
        live: list[_Live],
        sampling: SamplingParams,
        finish: Callable[[_Live], None],
    ) -> None:
        """Every trajectory on its own: turn done -> ``step`` in ``pool`` -> next turn submitted.

        On a failed turn (the engine gave up) the turns still in flight are cancelled and the
        error propagates, as a failed round does."""
        pending: dict[Future, tuple[bool, _Live]] = {}  # future -> (is a turn, trajectory)

        def send(t: _Live) -> None:
            pending[engine.submit(_next_turn(t), sampling)] = (True, t)

        for t in live:
            send(t)
        try:
            while pending:
                ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in ready:
                    is_turn, t = pending.pop(fut)
                    if is_turn:
                        [sample] = fut.result()
                        self._append_turn(t, sample)
                        pending[pool.submit(self._step, t)] = (False, t)
                        continue
                    fut.result()
                    if t.over:
                        finish(t)
                    else:
                        send(t)
        finally:
            for fut in pending:
                fut.cancel()

    # ---- one trajectory ---------------------------------------------------------------------

    def _guarded(self, t: _Live, fn: Callable, *args: Any) -> tuple[bool, Any]:
        """``(True, fn(*args))``, or ``(False, None)`` with the trajectory ended on an error."""
        clock = time.perf_counter()
        try:
            return True, call_with_timeout(fn, *args, timeout_s=self.settings.env_timeout_s)
        except EnvTimeout:
            t.error, t.over = "timeout", True
        except Exception:
            t.error, t.over = "error", True
        finally:
            t.env_s += time.perf_counter() - clock
        return False, None

    def _start(self, t: _Live, row: dict) -> None:
        """Build the environment and append ``reset``'s text (not trained on)."""
        ok, t.env = self._guarded(t, self.env_cls, dict(row))
        if not ok:
            return
        ok, text = self._guarded(t, t.env.reset)
        if not ok:
            return
        if text is not None and not isinstance(text, str):
            t.error, t.over = "error", True
            return
        if text:
            self._append_observation(t, list(self.tokenizer.encode(text, add_special_tokens=False)))

    def _append_turn(self, t: _Live, sample: Sample) -> None:
        """The engine's turn, ids as returned (cut to the token budget)."""
        room = self.settings.max_total_tokens - len(t.ids)
        ids, logprobs = list(sample.response_ids[:room]), list(sample.logprobs[:room])
        t.ids += ids
        t.mask += [1] * len(ids)
        t.logprobs += logprobs
        t.texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        t.versions.append(sample.weight_version)
        t.finish = sample.finish_reason if len(ids) == len(sample.response_ids) else "length"
        t.turns += 1
        if sample.routes is not None:
            # the request's prompt was the whole trajectory so far, so its routes cover every
            # earlier token too (prefilled again with the same weights); cut with the turn
            t.routes = sample.routes[:, : len(t.prompt) + len(t.ids)]

    def _step(self, t: _Live) -> None:
        """Reward the turn; append the observation unless the trajectory ends here."""
        ok, value = self._guarded(t, t.env.step, t.texts[-1])
        if not ok:
            return
        try:
            obs, reward, is_done = check_step_result(value)
        except (TypeError, ValueError):
            t.error, t.over = "error", True
            return
        t.reward += reward
        if is_done:
            t.over = True
            return
        s = self.settings
        if t.turns >= s.max_turns or len(t.ids) >= s.max_total_tokens:
            t.over = t.truncated = True
            return
        if obs:
            self._append_observation(t, self.encoder.encode(obs, t.ids[-1] if t.ids else None))
        if len(t.ids) >= s.max_total_tokens:  # no room left for a model token
            t.over = t.truncated = True

    def _append_observation(self, t: _Live, ids: list[int]) -> None:
        ids = ids[: self.settings.max_total_tokens - len(t.ids)]
        t.ids += ids
        t.mask += [0] * len(ids)
        t.logprobs += [0.0] * len(ids)

    def _to_trajectory(self, t: _Live) -> Trajectory:
        return Trajectory(
            prompt_ids=t.prompt,
            response_ids=t.ids,
            text="".join(t.texts),
            logprobs=t.logprobs,
            finish_reason=t.finish,  # type: ignore[arg-type]
            weight_version=min(t.versions) if t.versions else -1,
            loss_mask=t.mask,
            turns=t.turns,
            env_reward=t.reward,
            truncated=t.truncated,
            env_error=t.error,
            env_seconds=t.env_s,
            routes=t.routes,
        )


def trajectory_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """``rollout/turns/*``, the share of trajectories with more than one turn (with a tool
    environment: that made a tool call and read its result), model and environment tokens,
    truncations, environment failures, and ``time/env`` (environment wall time summed over
    trajectories; the calls overlap generation and each other)."""
    if not trajs:
        return {}
    n = len(trajs)
    return {
        "rollout/turns/mean": sum(t.turns for t in trajs) / n,
        "rollout/turns/max": max(t.turns for t in trajs),
        "rollout/multi_turn_rate": sum(t.turns > 1 for t in trajs) / n,
        "rollout/model_tokens/mean": sum(t.model_tokens for t in trajs) / n,
        "rollout/env_tokens/mean": sum(t.env_tokens for t in trajs) / n,
        "rollout/truncated": sum(t.truncated for t in trajs),
        "env/errors": sum(t.env_error == "error" for t in trajs),
        "env/timeouts": sum(t.env_error == "timeout" for t in trajs),
        "env/reward_mean": sum(t.env_reward for t in trajs) / n,
        "time/env": sum(t.env_seconds for t in trajs),
    }
