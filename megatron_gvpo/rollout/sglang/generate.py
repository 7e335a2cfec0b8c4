"""The ``/generate`` path: request bodies, parsing answers into :class:`Sample`, streaming jobs.

Body fields are those of 0.5.23's contract (``sglang/api/v1/api_types.py``
``GenerateRequest``: unknown top-level keys ignored; ``SamplingParams``: unknown keys refused
with 400). Each response is its own request (``n = 1``) with
``sampling_seed = response_seed(seed, j)``; SGLang honours ``sampling_seed`` only when the server
runs ``--enable-deterministic-inference`` (``srt/sampling/sampling_batch_info.py`` builds the
seed tensor only then), so seeded rollouts are reproducible only with that flag.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from megatron_gvpo.rollout.base import GenerateRequest, Sample, SamplingParams, response_seed
from megatron_gvpo.rollout.sglang.client import SGLangError

FINISH_TYPES = ("stop", "length", "abort")


@dataclass
class Job:
    """One response to draw: its (request, response) slot, prompt and ``/generate`` body."""

    slot: tuple[int, int]
    prompt_ids: list[int]
    payload: dict


def generate_payload(req: GenerateRequest, j: int, sp: SamplingParams, *, no_stop_trim: bool,
                     skip_special_tokens: bool) -> dict:
    """The ``/generate`` body of response ``j`` of ``req`` (logprobs of output tokens only)."""
    params = {
        "max_new_tokens": sp.max_new_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "top_k": sp.top_k,
        "stop": list(sp.stop),
        "stop_token_ids": list(sp.stop_token_ids),
        "n": 1,
        "no_stop_trim": no_stop_trim,
        "skip_special_tokens": skip_special_tokens,
    }
    seed = response_seed(req.seed, j)
    if seed is not None:
        params["sampling_seed"] = seed
    return {
        "input_ids": list(req.prompt_ids),
        "sampling_params": params,
        "return_logprob": True,
        "logprob_start_len": -1,
    }


def make_jobs(requests: Sequence[GenerateRequest], sampling: SamplingParams,
              **payload_kw: bool) -> list[Job]:
    """Every response of every request, request order then response order."""
    return [
        Job((i, j), list(req.prompt_ids), generate_payload(req, j, sampling, **payload_kw))
        for i, req in enumerate(requests)
        for j in range(req.n)
    ]


def parse_generate_output(out: Any, prompt_ids: list[int], fallback_version: int) -> Sample:
    """One ``/generate`` answer (``text``, ``output_ids``, ``meta_info``) as a :class:`Sample`."""
    if isinstance(out, list) and len(out) == 1:
        out = out[0]
    if not isinstance(out, dict) or not isinstance(out.get("meta_info"), dict):
        raise SGLangError(f"/generate answer has no meta_info: {str(out)[:300]}")
    meta = out["meta_info"]
    pairs = meta.get("output_token_logprobs")
    if not isinstance(pairs, list):
        raise SGLangError("/generate answer lacks meta_info.output_token_logprobs")
    ids = out.get("output_ids", [p[1] for p in pairs])
    if len(ids) != len(pairs) or any(int(p[1]) != int(t) for p, t in zip(pairs, ids, strict=True)):
        raise SGLangError(
            f"/generate: output_ids ({len(ids)}) and output_token_logprobs ({len(pairs)}) disagree"
        )
    if any(p[0] is None for p in pairs):
        raise SGLangError("/generate: a response token has no logprob")
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else None
    if kind not in FINISH_TYPES:
        raise SGLangError(f"/generate: unexpected finish_reason {finish!r}")
    return Sample(
        prompt_ids=list(prompt_ids),
        response_ids=[int(t) for t in ids],
        text=out.get("text") or "",
        logprobs=[float(p[0]) for p in pairs],
        finish_reason=kind,
        weight_version=_as_version(meta.get("weight_version"), fallback_version),
    )


def _as_version(value: Any, fallback: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):  # SGLang's initial version is the string "default"
        return fallback


def stream_jobs(pool: ThreadPoolExecutor, jobs: Sequence[Job],
                run: Callable[[Job, threading.Event], Sample]) -> Iterator[tuple[Job, Sample]]:
    """Submit every job at once (the pool bounds how many run) and yield them as they finish.

    On the first failure, or when the consumer stops early, the rest are cancelled.
    """
    cancel = threading.Event()
    pending: dict[Future, Job] = {pool.submit(run, job, cancel): job for job in jobs}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                yield job, fut.result()
    finally:
        if pending:
            cancel.set()
            for f in pending:
                f.cancel()


def gather_jobs(pool: ThreadPoolExecutor, jobs: Sequence[Job],
                run: Callable[[Job, threading.Event], Sample]) -> Future[list[Sample]]:
    """Submit ``jobs`` at once and return one future for their samples, in job order.

    The first job that fails fails the future and cancels the rest (as :func:`stream_jobs`
    does); cancelling the future cancels the jobs. A job whose request is already on a server
    runs to its end, its sample unused; a job the pool drops (shut down) fails the future.
    """
    cancel = threading.Event()
    out: Future[list[Sample]] = Future()
    samples: list[Sample | None] = [None] * len(jobs)
    left = [len(jobs)]
    lock = threading.RLock()  # re-entered when failing ``out`` cancels a job from its callback
    futures: list[Future] = []

    def stop(_: Future | None = None) -> None:
        cancel.set()
        for f in list(futures):
            f.cancel()

    def settle(k: int, f: Future) -> None:
        with lock:
            if out.done():
                return
            error = (SGLangError("generation cancelled (the engine was shut down)")
                     if f.cancelled() else f.exception())
            try:
                if error is not None:
                    out.set_exception(error)
                else:
                    samples[k] = f.result()
                    left[0] -= 1
                    if left[0] == 0:
                        out.set_result(samples)  # type: ignore[arg-type]
            except InvalidStateError:  # the caller cancelled ``out`` meanwhile
                return
        if error is not None:
            stop()

    out.add_done_callback(lambda f: stop() if f.cancelled() else None)
    for k, job in enumerate(jobs):
        f = pool.submit(run, job, cancel)
        futures.append(f)
        f.add_done_callback(lambda f, k=k: settle(k, f))
    if out.done():
        stop()  # a job failed (or ``out`` was cancelled) while later ones were being submitted
    return out
