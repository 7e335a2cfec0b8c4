"""The engine's servers: which receive weights, which generate, picking one, and recovering one.

Weight updates go to ``servers`` (started here or attached); generation goes to ``gen`` (the same
servers, or an sglang-router in front of them). A server we started that dies is restarted (up to
``max_restarts``); an attached one that fails a health probe is skipped for a back-off period.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import requests

from megatron_gvpo.rollout.sglang import server as srv
from megatron_gvpo.rollout.sglang.client import Endpoint, HTTPClient, SGLangError, Transient
from megatron_gvpo.rollout.sglang.config import SGLangConfig

log = logging.getLogger(__name__)


class ServerPool:
    """Endpoints of one engine; ``owner`` is the object whose collection stops started servers."""

    def __init__(self, cfg: SGLangConfig, client: HTTPClient, owner: object):
        self.cfg, self.client = cfg, client
        self.servers: list[Endpoint] = []
        self.gen: list[Endpoint] = []
        self.model_path = str(cfg.model_path)
        self._lock = threading.Lock()
        self._rr = 0
        self._finalizer = weakref.finalize(owner, srv.terminate, self.servers,
                                           cfg.shutdown_grace_s)

    def start(self) -> None:
        """Start ``num_servers`` servers, or attach to ``urls`` (and the router); wait healthy."""
        cfg = self.cfg
        if cfg.launches:
            srv.check_model_path(cfg.model_path)
            log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="sglang_logs_"))
            log_dir.mkdir(parents=True, exist_ok=True)
            if cfg.fp8:
                self.model_path = srv.fp8_model_path(cfg, log_dir)
            for k in range(cfg.num_servers):
                port = cfg.base_port + k if cfg.base_port else srv.free_port(cfg.host)
                s = Endpoint(k, f"http://{cfg.host}:{port}", tp_size=cfg.tp_size, port=port,
                             log_path=log_dir / f"server_{k}.log")
                self.servers.append(s)
                srv.start(cfg, self.model_path, s)
            srv.wait_healthy(self.client, self.servers)
            self.gen = list(self.servers)
        else:
            self.servers.extend(Endpoint(k, u.rstrip("/")) for k, u in enumerate(cfg.urls))
            self.gen = list(self.servers)
            if cfg.router_url:
                self.gen = [Endpoint(len(self.servers), cfg.router_url.rstrip("/"))]
            unhealthy = [
                s for s in {id(s): s for s in self.gen + self.servers}.values()
                if self._check_reachable(s) == 503
            ]
            self.client.each([s for s in self.servers if s in unhealthy], self._resume)
            srv.wait_healthy(self.client, self.gen + self.servers)
        log.info("SGLang ready: generate via %s", [s.url for s in self.gen])

    def _check_reachable(self, s: Endpoint) -> int | None:
        """Fail at once, naming the URL, when nothing listens there; else the health status
        (None: no answer in time, wait_healthy decides)."""
        try:
            r = self.client.session().get(
                f"{s.url}/health_generate",
                timeout=(self.cfg.connect_timeout_s, self.cfg.health_timeout_s))
        except requests.exceptions.ConnectionError as e:
            raise SGLangError(f"cannot reach SGLang server at {s.url}: {e}") from e
        except requests.exceptions.Timeout:
            return None  # listening but slow: wait_healthy decides
        return r.status_code

    def _resume(self, s: Endpoint) -> None:
        """An attached server that answers 503 may have been left paused by a trainer whose
        sync was interrupted (a paused server fails every health check): resume it
        (``/continue_generation`` is a no-op on a running one). Its open session, if any, is
        ended by the first ``begin_update``."""
        log.warning("%s answers 503 at attach (paused?): continuing its generation", s.url)
        try:
            self.client.call(s, "POST", "/continue_generation", {}, retry=False)
        except SGLangError as e:  # not fatal here: wait_healthy decides
            log.warning("%s: /continue_generation at attach failed: %s", s.url, e)

    def live(self) -> list[Endpoint]:
        """Servers that receive weights and have not been given up."""
        return [s for s in self.servers if not s.failed]

    def healthy(self) -> bool:
        gen = [s for s in self.gen if not s.failed and not s.stale]
        return bool(gen) and all(not s.exited() and self.client.probe(s) for s in gen)

    def stop(self) -> None:
        """Stop every server we started (whole process groups); safe to call twice."""
        self._finalizer()

    # -- generation -----------------------------------------------------------------------------

    def pick(self, version: int) -> tuple[Endpoint, int]:
        """The least-loaded usable generation endpoint (ties round-robin), counted in flight
        until :meth:`done`; waits out a restart. Returns it and its epoch."""
        with self._lock:
            alive = [s for s in self.gen if not s.failed]
            if not alive:
                raise SGLangError("no SGLang server left: all failed or exhausted their restarts")
            fresh = [s for s in alive if not s.stale]
            if not fresh:
                raise SGLangError(
                    f"every SGLang server was restarted and lost weight version {version}; "
                    "call update_weights again (weight_sync='disk' reloads them automatically)"
                )
            now = time.monotonic()
            ready = [s for s in fresh if not s.restarting and s.down_until <= now] or fresh
            n = len(self.gen)
            s = min(ready, key=lambda s: (s.inflight, (s.index - self._rr) % n))
            self._rr = (s.index + 1) % n
            s.inflight += 1
            epoch = s.epoch
        if s.restarting:
            with s.lock:  # wait for the restart to finish
                epoch = s.epoch
        return s, epoch

    def done(self, s: Endpoint) -> None:
        with self._lock:
            s.inflight -= 1

    def abort(self, s: Endpoint, rid: str) -> None:
        """Drop a request we stopped waiting for (best effort). sglang-router has no
        ``/abort_request``, so behind a router the workers are asked (unknown rids are no-ops)."""
        for t in ([s] if s in self.servers else self.servers):
            try:
                self.client.send(t, "POST", "/abort_request", {"rid": rid},
                                 self.cfg.health_timeout_s)
            except (Transient, SGLangError) as e:
                log.warning("abort of %s on %s failed: %s", rid, t.url, e)

    def recover(self, s: Endpoint, epoch: int, restored: Callable[[Endpoint], None]) -> None:
        """After a failure: restart a dead server we own (then ``restored(s)``); park an
        unhealthy attached one for a back-off period."""
        if not s.owned:
            if not self.client.probe(s):
                s.down_until = time.monotonic() + self.client.backoff(1)
            return
        with s.lock:
            if s.epoch != epoch or s.failed:
                return  # another thread already dealt with it
            if not s.exited() and self.client.probe(s):
                return  # alive and healthy: the failure was transient
            s.restarting = True
            try:
                if self._restart(s):
                    restored(s)
            finally:
                s.restarting = False

    def _restart(self, s: Endpoint) -> bool:
        if s.restarts >= self.cfg.max_restarts:
            log.error("SGLang server %s died again; giving up after %d restarts", s.url, s.restarts)
            s.failed = True
            srv.terminate([s], self.cfg.shutdown_grace_s)
            return False
        log.warning("SGLang server %s is dead (exit code %s); restarting. Log tail:\n%s",
                    s.url, s.proc.poll(), srv.log_tail(s.log_path, 1500))
        srv.terminate([s], self.cfg.shutdown_grace_s)
        s.restarts += 1
        self.client.bump("restarts")
        try:
            srv.start(self.cfg, self.model_path, s)
            srv.wait_healthy(self.client, [s])
        except SGLangError as e:
            log.error("restart of %s failed: %s", s.url, e)
            s.failed = True
            return False
        s.epoch += 1
        s.forget_capabilities()
        return True
