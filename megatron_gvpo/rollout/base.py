"""The contract between the trainer and a rollout engine (SGLang servers or the local transformers model).

Engines take token ids and return token ids: tokenisation and chat templates stay in ``data/``.
Weights arrive as HF-named full tensors in buckets, the same stream for every backend.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length", "abort"]
NamedTensors = list[tuple[str, torch.Tensor]]


@dataclass
class SamplingParams:
    """Sampling settings shared by every engine (SGLang's ``sampling_params`` names)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"sampling.top_k must be -1 (off) or >= 1, got {self.top_k}")


@dataclass
class GenerateRequest:
    """One prompt and how many responses to draw for it (its group)."""

    prompt_ids: list[int]
    n: int
    seed: int | None = None  # response j samples with response_seed(seed, j)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("GenerateRequest.prompt_ids is empty")
        if self.n < 1:
            raise ValueError(f"GenerateRequest.n must be >= 1, got {self.n}")


@dataclass
class Sample:
    """One response. ``logprobs[t]`` is the engine's log p(response_ids[t] | prefix) of the
    temperature-scaled distribution (before top-p/top-k truncation), as SGLang reports it."""

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: int = -1
    routes: torch.Tensor | None = None
    """Mixture-of-experts models, when the engine was asked for them: the experts the engine
    routed each token to, an integer tensor [MoE layers, tokens, top-k] over the prompt and then
    the response, for every token the engine fed through the model (all but the last response
    token, which is never fed back; multi-turn trajectories: the last turn's request). None when
    not asked for."""


def response_seed(seed: int | None, j: int) -> int | None:
    """The sampling seed of response ``j`` of a request seeded with ``seed`` (None: unseeded)."""
    if seed is None:
        return None
    return (seed * 1_000_003 + j) % (2**31 - 1)


class StageSender(Protocol):
    """Feeds one pipeline stage's weights to an engine's servers from that stage's own rank."""

    def send(self, buckets: Iterable[NamedTensors], version: int) -> int:
        """Broadcast every bucket; returns the number of tensors sent."""

    def close(self) -> None:
        """Release the sender's connections."""


class StageSyncTarget(Protocol):
    """Where per-stage senders send (picklable: the driver rank broadcasts it to the others)."""

    def connect(self, stage: int, driver_host: str) -> StageSender:
        """A sender for pipeline stage ``stage`` on this rank (``driver_host``: the host of the
        rank that owns the engine, for choosing an address the servers can reach)."""


class RolloutEngine(abc.ABC):
    """What the trainer calls; every method is called from one process (the driver rank)."""

    colocated: bool = False
    """The engine shares the trainer's accelerators: it releases memory while the actor trains."""

    @abc.abstractmethod
    def generate(
        self, requests: Sequence[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Sample]]:
        """Return, per request and in request order, its ``n`` responses in response order."""

    def generate_stream(
        self, requests: Sequence[GenerateRequest], sampling: SamplingParams
    ) -> Iterator[tuple[int, int, Sample]]:
        """Yield ``(request index, response index, sample)`` as responses complete.

        Engines that batch continuously (SGLang) keep the whole round in flight; this default
        runs :meth:`generate` and yields its result in order.
        """
        for i, group in enumerate(self.generate(requests, sampling)):
            for j, sample in enumerate(group):
                yield i, j, sample

    continuous_batching: bool = False
    """The engine batches requests as they arrive (SGLang): a request sent with :meth:`submit`
    starts at once, alongside those already running, so callers that produce requests one at a
    time (the multi-turn loop) send each as soon as it is ready instead of gathering a round."""

    def submit(self, request: GenerateRequest, sampling: SamplingParams) -> Future[list[Sample]]:
        """Start ``request``'s ``n`` responses; the future holds them in response order.

        Cancelling the future stops responses not yet started. This default generates before
        returning (an already finished future); engines with ``continuous_batching`` return at
        once.
        """
        fut: Future[list[Sample]] = Future()
        try:
            fut.set_result(self.generate([request], sampling)[0])
        except Exception as e:
            fut.set_exception(e)
        return fut

    @abc.abstractmethod
    def update_weights(self, buckets: Iterable[NamedTensors], version: int) -> None:
        """Load HF-named full tensors, one bucket at a time, and tag the engine with ``version``.

        A name the engine's architecture does not have is an error naming that tensor.
        """

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """The version passed to the last successful ``update_weights`` (-1 before any)."""

    def pause_generation(self) -> None:
        """Stop taking new work (before a weight update); a no-op where nothing runs concurrently."""
        return None

    def continue_generation(self) -> None:
        """Resume after ``pause_generation``."""
        return None

    def release_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Give accelerator memory back to a colocated trainer; a no-op where nothing is held."""
        return None

    def resume_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Take back what ``release_memory`` gave."""
        return None

    def metrics(self) -> dict[str, float]:
        """Counters for the logs (requests, retries, restarts, syncs); default: none."""
        return {}

    # Per-stage weight sync: engines whose servers can take each pipeline stage's weights from
    # that stage's rank return a target here, and bracket the senders with begin/finish.

    def stage_sync_target(self) -> StageSyncTarget | None:
        """Where per-stage senders send, or None: weights only enter through ``update_weights``."""
        return None

    def begin_update(self, version: int) -> None:
        """Before per-stage senders send ``version`` (pause generation)."""
        raise NotImplementedError(f"{type(self).__name__} takes no per-stage weight sync")

    def finish_update(self, version: int) -> None:
        """After every stage sent ``version``: flush, check the version, continue."""
        raise NotImplementedError(f"{type(self).__name__} takes no per-stage weight sync")

    def abort_update(self) -> None:
        """After a failed per-stage sync: continue generating with the old weights."""
        raise NotImplementedError(f"{type(self).__name__} takes no per-stage weight sync")

    @abc.abstractmethod
    def health(self) -> bool:
        """True when the engine can generate now."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop every process this engine started; safe to call twice."""
