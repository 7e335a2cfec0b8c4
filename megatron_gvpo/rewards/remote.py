"""Remote reward model client: batched JSON POSTs with a time-out, bounded retries and backoff.

Request body (POST ``url``; ``query``/``prompts``/``labels`` are the names OpenRLHF's remote RM
servers read, the rest are ours)::

    {"query": [prompt + response, ...], "prompts": [...], "responses": [...],
     "labels": [str | null, ...], "domains": [str | null, ...], "metadata": [{...}, ...]}

``metadata`` is sent only with ``send_metadata=True``. ``api_key`` is sent as
``Authorization: Bearer <api_key>`` (or give ``headers``; not both). Response: ``{"rewards": [float, ...]}``,
one per query, in order (the key is ``score_key``); a null or non-finite entry fails that sample.
Connection errors, time-outs, 429 and 5xx are retried up to ``max_retries`` times with
exponential backoff; other 4xx and malformed bodies are not. A request that still fails scores
its samples 0 (counted as errors).

``request_timeout_s`` is a wall-clock deadline for each attempt, from connect to the last byte
of the body, status line and headers included: per-read socket time-outs cannot give that (a
server that sends one byte a second never trips them, in the status line, an endless header or
the body), so each attempt runs in a daemon thread that is abandoned at the deadline (its
connection is never reused; it ends when the server gives up, and never holds up interpreter
exit). At most ``max_concurrency`` requests are in flight at once, across the chunks of one call
and across concurrent calls: the trainer scores a round's groups concurrently (the reward
declares ``concurrent_calls``), so a slow server delays a round by about one deadline per
``max_concurrency`` groups instead of one per group.

A round's deadline (``reward.round_timeout_s``) reaches the client as a ``RoundDeadline``: once
it passes, an attempt in flight is abandoned, no retry or backoff starts, no request waits for a
slot, and the samples not yet scored fail (``round_deadline`` in the counters). A slow server
then holds a round up by that deadline at most, however many groups, retries and chunks it has.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import requests
import urllib3

from megatron_gvpo.rewards.base import EventCounts, RewardInput
from megatron_gvpo.rewards.guard import RateLimitedLogger, RoundDeadline, call_guarded
from megatron_gvpo.rewards.registry import register_reward

logger = logging.getLogger(__name__)


class _Malformed(ValueError):
    """The server answered 2xx with a body that does not follow the schema."""


class _PastDeadline(requests.Timeout):
    """The round's deadline passed before this attempt could finish (never retried)."""


class RemoteReward:
    """Batched, concurrent client of a remote reward model; one instance per configured reward."""

    accepts_deadline = True
    """``__call__`` takes ``deadline=`` (a round's ``RoundDeadline``) from the reward manager."""

    def __init__(
        self,
        url: str | None = None,
        batch_size: int = 64,
        max_concurrency: int = 4,
        request_timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        score_key: str = "rewards",
        send_metadata: bool = False,
        headers: dict[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        if not url or not isinstance(url, str):
            raise ValueError("'kwargs.url' is required (the reward server's http(s) endpoint)")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"'kwargs.url' must start with http:// or https://, got {url!r}")
        for field, value, low in (
            ("batch_size", batch_size, 1),
            ("max_concurrency", max_concurrency, 1),
            ("max_retries", max_retries, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"'kwargs.{field}' must be an int >= {low}, got {value!r}")
        if not request_timeout_s > 0:
            raise ValueError(f"'kwargs.request_timeout_s' must be > 0, got {request_timeout_s}")
        self.url, self.batch_size, self.max_concurrency = url, batch_size, max_concurrency
        self.request_timeout_s, self.max_retries = float(request_timeout_s), max_retries
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.score_key, self.send_metadata = score_key, send_metadata
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:  # OpenAI-style bearer token, unless headers already authorise
            if any(k.lower() == "authorization" for k in self.headers):
                raise ValueError("give 'kwargs.api_key' or an Authorization header, not both")
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._events = EventCounts()
        self._lock = threading.Lock()
        self._idle: list[requests.Session] = []  # sessions free for the next attempt
        self._sessions: list[requests.Session] = []  # every session made, closed by close()
        self._slots = threading.BoundedSemaphore(max_concurrency)  # requests in flight
        self._warn = RateLimitedLogger(logger, 60.0)

    @property
    def concurrent_calls(self) -> int:
        """How many calls may run at once (the reward manager scores groups concurrently up to
        this); thread-safe, and requests stay bounded by ``max_concurrency`` in any case."""
        return self.max_concurrency

    def __call__(
        self, inputs: Sequence[RewardInput], deadline: RoundDeadline | None = None
    ) -> list[float | None]:
        """One score per input (None: failed); ``deadline``: the round's, see the module doc."""
        deadline = deadline or RoundDeadline(None)
        chunks = [inputs[i : i + self.batch_size] for i in range(0, len(inputs), self.batch_size)]
        if len(chunks) <= 1 or self.max_concurrency == 1:
            results = [self._score_chunk(c, deadline) for c in chunks]
        else:  # daemon threads (guard.call_guarded): never joined at interpreter exit
            outcomes = call_guarded(
                lambda c: self._score_chunk(c, deadline), chunks, self._chunk_bound_s(),
                self.max_concurrency,
            )
            results = [
                r if err is None else [None] * len(c)
                for (r, err), c in zip(outcomes, chunks, strict=True)
            ]
        return [x for r in results for x in r]

    def _chunk_bound_s(self) -> float:
        """Longest a chunk can take: every attempt at its deadline plus the longest backoffs."""
        backoff = sum(
            min(self.max_backoff_s, self.backoff_s * 2**a) for a in range(self.max_retries)
        )
        return (self.max_retries + 1) * self.request_timeout_s + backoff + 1.0

    def body(self, chunk: Sequence[RewardInput]) -> dict[str, Any]:
        """The JSON request body for ``chunk`` (schema in the module docstring)."""
        body: dict[str, Any] = {
            "query": [x.prompt + x.response for x in chunk],
            "prompts": [x.prompt for x in chunk],
            "responses": [x.response for x in chunk],
            "labels": [x.label for x in chunk],
            "domains": [x.domain for x in chunk],
        }
        if self.send_metadata:
            body["metadata"] = [x.metadata for x in chunk]
        return body

    def _score_chunk(
        self, chunk: Sequence[RewardInput], deadline: RoundDeadline
    ) -> list[float | None]:
        try:
            data = json.dumps(self.body(chunk))
        except (TypeError, ValueError) as e:
            self._count("failed_requests")
            self._warn.warning(f"remote reward {self.url}: request not JSON-serialisable: {e}")
            return [None] * len(chunk)
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                delay *= 0.5 + 0.5 * random.random()
                if delay >= deadline.remaining():  # the round ends first: no retry
                    self._count("round_deadline")
                    break
                self._count("retries")
                time.sleep(delay)
            try:
                return self._post(data, len(chunk), deadline)
            except _PastDeadline as e:
                self._count("round_deadline")
                error = e
                break
            except _Malformed as e:
                self._count("malformed")
                error: Exception = e
                break
            except requests.Timeout as e:
                self._count("http_timeouts")
                error = e
            except requests.HTTPError as e:
                self._count("http_errors")
                error = e
                status = e.response.status_code if e.response is not None else 0
                if status != 429 and status < 500:
                    break
            except requests.RequestException as e:  # connection refused, reset, ...
                self._count("connection_errors")
                error = e
        self._count("failed_requests")
        self._warn.warning(f"remote reward {self.url}: {len(chunk)} samples unscored: {error!r}")
        return [None] * len(chunk)

    def _post(self, data: str, n: int, deadline: RoundDeadline) -> list[float | None]:
        """One attempt, bounded by ``request_timeout_s`` of wall time from connect to the last
        byte and by the round's ``deadline``: it runs in a daemon thread that is abandoned
        (``requests.Timeout``) at whichever comes first."""
        if not deadline.acquire(self._slots):
            raise _PastDeadline("the round's deadline passed while waiting for a request slot")
        try:
            self._count("requests")
            outcome: list = []
            done = threading.Event()
            abandoned = threading.Event()
            session = self._session()

            def attempt() -> None:
                try:
                    outcome.append((self._exchange(session, data), None))
                except BaseException as e:  # reported to the waiting thread
                    outcome.append((None, e))
                finally:
                    done.set()
                    if abandoned.is_set():
                        session.close()  # mid-response: its connection is not reusable
                    else:
                        with self._lock:
                            self._idle.append(session)

            threading.Thread(target=attempt, daemon=True, name="remote-reward").start()
            if not deadline.wait(done, self.request_timeout_s):
                abandoned.set()
                if not done.is_set():
                    if deadline.expired():
                        raise _PastDeadline("the round's deadline passed mid-request")
                    raise requests.Timeout(
                        f"no complete response within {self.request_timeout_s:g} s "
                        "(connect to last byte)"
                    )
            body, error = outcome[0]
            if error is not None:
                raise error
        finally:
            self._slots.release()
        try:
            payload = json.loads(body)
        except ValueError as e:
            raise _Malformed(f"response is not JSON: {body[:200]!r}") from e
        scores = payload.get(self.score_key) if isinstance(payload, dict) else None
        if not isinstance(scores, list) or len(scores) != n:
            raise _Malformed(f"expected {{{self.score_key!r}: [{n} floats]}}, got {payload!r:.200}")
        return [_finite(s) for s in scores]

    def _exchange(self, session: requests.Session, data: str) -> bytes:
        """POST ``data`` and read the whole body (blocking; :meth:`_post` bounds it)."""
        deadline = time.monotonic() + self.request_timeout_s
        resp = session.post(
            self.url, data=data, headers=self.headers, timeout=self.request_timeout_s, stream=True
        )
        with resp:
            resp.raise_for_status()
            return _read_until(resp, deadline, self.request_timeout_s)

    def _session(self) -> requests.Session:
        """An idle session (keep-alive connections are reused), or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
            session = requests.Session()
            self._sessions.append(session)
            return session

    def _count(self, key: str) -> None:
        self._events.add(key)

    def pop_counters(self) -> dict[str, int]:
        """requests, retries, http_timeouts, http_errors, malformed, ... since the last pop."""
        return self._events.pop()

    def close(self) -> None:
        """Close the HTTP sessions (a request still running in a daemon thread is abandoned)."""
        with self._lock:
            sessions, self._sessions, self._idle = self._sessions, [], []
        for s in sessions:
            s.close()


def _read_until(resp: requests.Response, deadline: float, timeout_s: float) -> bytes:
    """The response body, or ``requests.Timeout`` once ``deadline`` passes. ``read1`` returns
    whatever one socket read brings (a trickling server cannot make it wait for a full buffer),
    and each socket read also stops at the per-read timeout, so a silent server ends it too."""
    body = bytearray()
    try:
        while piece := resp.raw.read1(65536, decode_content=True):
            body += piece
            if time.monotonic() > deadline:
                raise requests.Timeout(f"no complete response within {timeout_s:g} s")
    except urllib3.exceptions.ReadTimeoutError as e:
        raise requests.Timeout(f"read timed out: {e}") from e
    except urllib3.exceptions.HTTPError as e:  # reset, protocol error mid-body
        raise requests.ConnectionError(f"reading the response: {e}") from e
    return bytes(body)


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


register_reward("remote", batched=True, factory=True)(RemoteReward)
