"""HTTP to SGLang servers: one endpoint's state, requests with retries, and what a server offers.

Routes move between SGLang releases; this module is the one place that knows the differences
(read in the released wheels, paths inside ``sglang/srt/``):

- live weight version: ``GET /model_info`` -> ``weight_version`` (0.5.10 ... 0.5.23,
  ``entrypoints/http_server.py`` ``model_info``); 0.5.4 has no ``/model_info`` but a working
  ``GET /get_weight_version``, which 0.5.10-0.5.20 answer with 404 and 0.5.22+ do not route.
- server info: ``GET /server_info`` (0.5.10+); ``/get_server_info`` is the deprecated alias and
  the only spelling in 0.5.4. Both carry ``version`` and the startup ``tp_size``.
- weight-update sessions (``/begin_weight_update``, ``/end_weight_update``) exist from 0.5.22
  (absent in 0.5.20); from then on tensor and distributed updates are refused outside a session
  (0.5.23 ``managers/scheduler_components/weight_updater.py`` ``update_weights_from_*``).
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from megatron_gvpo.rollout.sglang.config import SGLangConfig

log = logging.getLogger(__name__)

SESSIONS_SINCE = (0, 5, 22)  # first release read with /begin_weight_update (0.5.20 has none)
STATS = ("generate_requests", "retries", "timeouts", "connection_errors", "server_errors",
         "aborted_samples", "restarts", "weight_syncs")


class SGLangError(RuntimeError):
    """A server could not be reached, answered against the protocol, or kept failing."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Transient(Exception):
    """A failure worth retrying: connection error, time-out or 5xx (``kind`` names the counter)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Endpoint:
    """One HTTP endpoint (a server we started, an attached one, or a router) and what it offers."""

    index: int
    url: str
    tp_size: int | None = None
    port: int | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    inflight: int = 0
    epoch: int = 0  # bumped on every restart
    restarts: int = 0
    restarting: bool = False
    failed: bool = False  # gave up on it
    stale: bool = False  # restarted and lost the synced weights
    down_until: float = 0.0  # attached server that failed a health probe
    version: str | None = None  # SGLang release, from /server_info
    sessions: bool | None = None  # has /begin_weight_update; None: not known yet
    version_route: str | None = None  # /model_info or /get_weight_version
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def owned(self) -> bool:
        return self.proc is not None

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def forget_capabilities(self) -> None:
        """After a restart the process may be another release: ask again."""
        self.version = self.sessions = self.version_route = None
        if not self.owned:
            self.tp_size = None


def parse_version(text: Any) -> tuple[int, ...] | None:
    """``"0.5.23"`` / ``"0.5.23.post1"`` -> (0, 5, 23); None when it does not start with numbers."""
    parts = []
    for p in str(text or "").split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts) if len(parts) >= 3 else None


class HTTPClient:
    """Requests to endpoints: per-thread sessions, retries with back-off, counters, fan-out."""

    def __init__(self, cfg: SGLangConfig, workers: int):
        self.cfg = cfg
        self._local = threading.local()
        self._lock = threading.Lock()
        self.stats = dict.fromkeys(STATS, 0)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="sglang")

    def bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def backoff(self, attempt: int) -> float:
        return min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2**attempt)

    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def send(self, s: Endpoint, method: str, path: str, payload: Any, timeout: float) -> Any:
        """One request; raises Transient for what a retry may fix, SGLangError for the rest."""
        url = f"{s.url}{path}"
        try:
            r = self.session().request(method, url, json=payload,
                                       timeout=(self.cfg.connect_timeout_s, timeout))
        except requests.exceptions.Timeout as e:
            raise Transient("timeouts", f"{method} {url} timed out after {timeout}s") from e
        except (requests.exceptions.ConnectionError,
                requests.exceptions.ChunkedEncodingError) as e:
            raise Transient("connection_errors", f"{method} {url}: {e}") from e
        if r.status_code >= 500:
            raise Transient("server_errors", f"{method} {url} -> {r.status_code}: {r.text[:500]}")
        if r.status_code >= 400:
            raise SGLangError(f"{method} {url} -> {r.status_code}: {r.text[:2000]}", r.status_code)
        try:
            return r.json()
        except ValueError:
            return r.text

    def call(self, s: Endpoint, method: str, path: str, payload: Any = None, *,
             timeout: float | None = None, retry: bool = True) -> Any:
        """A control request, retried with exponential back-off when ``retry`` (idempotent ones)."""
        timeout = timeout or self.cfg.control_timeout_s
        attempts = self.cfg.max_retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return self.send(s, method, path, payload, timeout)
            except Transient as e:
                self.bump(e.kind)
                if attempt + 1 == attempts:
                    raise SGLangError(f"{e} (after {attempts} attempt(s))") from e
                self.bump("retries")
                time.sleep(self.backoff(attempt))
        raise AssertionError("unreachable")

    def each(self, servers: Sequence[Endpoint], fn: Callable[[Endpoint], Any]) -> list[Any]:
        """Run ``fn`` on every server concurrently; once all have ended, re-raise the first
        failure (in server order), so no call is still running when the caller cleans up."""
        futures = [self.pool.submit(fn, s) for s in servers]
        wait(futures)
        return [f.result() for f in futures]

    def probe(self, s: Endpoint) -> bool:
        """One ``/health_generate``: True on 200 (a paused server answers 503 after ~20 s)."""
        try:
            r = self.session().get(f"{s.url}/health_generate",
                                   timeout=(self.cfg.connect_timeout_s, self.cfg.health_timeout_s))
            return r.status_code == 200
        except requests.exceptions.RequestException:
            return False

    # -- what a server offers ------------------------------------------------------------------

    def server_info(self, s: Endpoint) -> dict:
        """``/server_info``, or the older ``/get_server_info`` where the first is not routed."""
        try:
            info = self.call(s, "GET", "/server_info")
        except SGLangError as e:
            if e.status != 404:
                raise
            info = self.call(s, "GET", "/get_server_info")
        if not isinstance(info, dict):
            raise SGLangError(f"{s.url}/server_info answered {str(info)[:200]!r}, not an object")
        return info

    def learn(self, s: Endpoint, default_tp: int) -> None:
        """Fill ``version``, ``tp_size`` and (when the version tells) ``sessions`` once."""
        if s.version is not None and s.tp_size is not None:
            return
        info = self.server_info(s)
        s.version = str(info.get("version", "unknown"))
        s.tp_size = int(info.get("tp_size", s.tp_size or default_tp))
        v = parse_version(s.version)
        if v is not None and s.sessions is None:
            s.sessions = v >= SESSIONS_SINCE

    def weight_version(self, s: Endpoint) -> Any:
        """The live weight version: ``/model_info`` (0.5.10+), else ``/get_weight_version``."""
        routes = [s.version_route] if s.version_route else ["/model_info", "/get_weight_version"]
        last: SGLangError | None = None
        for route in routes:
            try:
                got = self.call(s, "GET", route)
            except SGLangError as e:
                if e.status != 404:
                    raise
                last = e
                continue
            s.version_route = route
            return got.get("weight_version") if isinstance(got, dict) else got
        raise SGLangError(f"{s.url} has neither /model_info nor /get_weight_version: {last}")

    def begin_session(self, s: Endpoint) -> bool:
        """Open a weight-update session where the server has them; False where it does not.

        A session left open (by a trainer whose sync was interrupted) answers 400 "already
        open": it is ended and the begin retried once."""
        if s.sessions is False:
            return False
        try:
            try:
                self.call(s, "POST", "/begin_weight_update", {}, retry=False)
            except SGLangError as e:
                if e.status != 400 or "already open" not in str(e):
                    raise
                log.warning("%s: a weight-update session was left open; ending it", s.url)
                self.end_session(s)
                self.call(s, "POST", "/begin_weight_update", {}, retry=False)
        except SGLangError as e:
            if e.status != 404:
                raise
            log.info("%s (SGLang %s) has no weight-update sessions", s.url, s.version)
            s.sessions = False
            return False
        s.sessions = True
        return True

    def end_session(self, s: Endpoint) -> None:
        """Close the session (the server then runs post-load processing of quantized layers)."""
        self.call(s, "POST", "/end_weight_update", {}, timeout=self.cfg.sync_timeout_s,
                  retry=False)
