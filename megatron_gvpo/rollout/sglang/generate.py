"""The ``/generate`` path: request bodies, parsing answers into :class:`Sample`, streaming jobs.

Body fields are those of 0.5.23's contract (``sglang/api/v1/api_types.py``
``GenerateRequest``: unknown top-level keys ignored; ``SamplingParams``: unknown keys refused
with 400). Each response is its own request (``n = 1``) with
``sampling_seed = response_seed(seed, j)``; SGLang honours ``sampling_seed`` only when the server
runs ``--enable-deterministic-inference`` (``srt/sampling/sampling_batch_info.py`` builds the
seed tensor only then), so seeded rollouts are reproducible only with that flag.

Routed experts (mixture-of-experts routing replay): with ``return_routed_experts: true`` in the
body (``srt/managers/io_struct.py:264``) a server started with ``--enable-return-routed-experts``
(``srt/arg_groups/fields/exec_.py:158``) answers ``meta_info.routed_experts``: base64 of the
int32 bytes of a [tokens, num_hidden_layers, top-k] array (``srt/state_capturer/base.py:38-42``
buffers; ``srt/managers/detokenizer_manager.py:432-446`` encodes; ``srt/state_capturer/
routed_experts.py:166-174`` decodes) covering tokens ``[routed_experts_start_len, seqlen - 1)``
of prompt + output (``srt/managers/scheduler_components/batch_result_processor.py:136-160``,
start 0 here: the whole prompt, then every output token but the last). Every decoder layer has a
column (``routed_experts.py:73``: ``num_hidden_layers``); dense layers' columns are never written
(zeros). A server started without the flag has no capturer (``routed_experts.py:50``) and simply
leaves the key out, which :func:`parse_generate_output` reports as an error.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_gvpo.rollout.base import GenerateRequest, Sample, SamplingParams, response_seed
from megatron_gvpo.rollout.sglang.client import SGLangError

FINISH_TYPES = ("stop", "length", "abort")


@dataclass(frozen=True)
class RouteLayout:
    """How to read a server's routed experts: the model's decoder layers, which of them are
    mixture-of-experts layers (0-based, in order) and the experts per token."""

    num_layers: int
    moe_layers: tuple[int, ...]
    top_k: int


def decode_routed_experts(value: Any, layout: RouteLayout, tokens: int) -> torch.Tensor:
    """``meta_info.routed_experts`` as [MoE layers, rows, top-k] int32 (rows: the tokens the
    server fed, at most ``tokens`` - 1 of the prompt + response's ``tokens`` are kept)."""
    if not isinstance(value, str):
        raise SGLangError(
            "/generate answer lacks meta_info.routed_experts (model.moe.routing_replay=rollout): "
            "start the SGLang server with --enable-return-routed-experts"
        )
    try:
        flat = np.frombuffer(base64.b64decode(value.encode("utf-8"), validate=True), np.int32)
    except (ValueError, TypeError) as e:
        raise SGLangError(f"/generate: meta_info.routed_experts is not base64 int32 ({e})") from e
    per_token = layout.num_layers * layout.top_k
    if flat.size % per_token or flat.size // per_token > tokens:
        raise SGLangError(
            f"/generate: meta_info.routed_experts holds {flat.size} values, not a "
            f"[tokens <= {tokens}, {layout.num_layers} layers, {layout.top_k}] array"
        )
    rows = torch.from_numpy(flat.copy()).view(-1, layout.num_layers, layout.top_k)
    rows = rows[: max(tokens - 1, 0)]
    return rows[:, list(layout.moe_layers)].permute(1, 0, 2).contiguous()


@dataclass
class Job:
    """One response to draw: its (request, response) slot, prompt and ``/generate`` body."""

    slot: tuple[int, int]
    prompt_ids: list[int]
    payload: dict


def generate_payload(req: GenerateRequest, j: int, sp: SamplingParams, *, no_stop_trim: bool,
                     skip_special_tokens: bool, routed_experts: bool = False) -> dict:
    """The ``/generate`` body of response ``j`` of ``req`` (logprobs of output tokens only;
    ``routed_experts``: every token's experts too)."""
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
    body = {
        "input_ids": list(req.prompt_ids),
        "sampling_params": params,
        "return_logprob": True,
        "logprob_start_len": -1,
    }
    if routed_experts:
        body["return_routed_experts"] = True  # routed_experts_start_len 0: the whole sequence
    return body


def make_jobs(requests: Sequence[GenerateRequest], sampling: SamplingParams,
              **payload_kw: bool) -> list[Job]:
    """Every response of every request, request order then response order."""
    return [
        Job((i, j), list(req.prompt_ids), generate_payload(req, j, sampling, **payload_kw))
        for i, req in enumerate(requests)
        for j in range(req.n)
    ]


def parse_generate_output(out: Any, prompt_ids: list[int], fallback_version: int,
                          routes: RouteLayout | None = None) -> Sample:
    """One ``/generate`` answer (``text``, ``output_ids``, ``meta_info``) as a :class:`Sample`
    (with ``routes``: its routed experts, which the answer must hold)."""
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
        routes=None if routes is None else decode_routed_experts(
            meta.get("routed_experts"), routes, len(prompt_ids) + len(ids)
        ),
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
