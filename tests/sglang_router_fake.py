"""A PROTOCOL FAKE of sglang-router's HTTP router, for tests only. It is not sglang-router.

Written from sglang-router 0.3.2's source (``pip download --no-deps --no-binary :all:
sglang-router==0.3.2``, an sdist of Rust sources; paths below are inside it). What it reproduces:

- Worker health (``src/core/worker.rs:703-750`` ``check_health_async``): every
  ``health_check_interval_secs`` each worker's ``health_check_endpoint`` (``/health``) is fetched
  with ``health_check_timeout_secs``; a 2xx is a success. ``health_failure_threshold``
  consecutive failures mark a healthy worker unhealthy, ``health_success_threshold`` consecutive
  successes mark an unhealthy one healthy again (each counter restarts at 0 on the other
  outcome and after a flip). Defaults as ``src/sglang_router/router_args.py:84-88``: 3, 2, 5 s,
  60 s, ``/health``. A paused SGLang worker fails ``/health`` (it runs a generation).
- ``POST /generate`` goes to a healthy worker; with none, 503 ``no_available_workers`` "No
  available workers (all circuits open or unhealthy)" (``src/routers/http/router.rs:279-286``).
  Workers are taken in turn (the real default policy is cache-aware; the fake does not model
  policies or circuit breakers).
- ``GET /health_generate``, ``/get_server_info``, ``/get_model_info`` are passed to the first
  healthy worker; with none, 503 ``no_workers`` "No workers are available"
  (``router.rs:81-128``, ``717-731``). ``GET /health`` is the router's own liveness: 200
  (``src/server.rs:142-144``).
- ``GET /workers`` (``server.rs:635``, ``430-432``): ``{"workers": [WorkerInfo, ...], "total": n,
  "stats": {"prefill_count", "decode_count", "regular_count"}}`` (``src/core/worker_service.rs:
  159-172, 262-282``); a WorkerInfo (``src/protocols/worker_spec.rs:119-178``, filled by
  ``src/core/worker.rs:1222-1265``) has ``id, url, model_id, priority, cost, worker_type,
  is_healthy, load, connection_mode, disable_health_check``. ``url`` is the worker URL as given
  (``http://`` added when missing, ``src/core/steps/worker/local/create_worker.rs:285-294``).
- Errors are ``{"error": {"type": <reason phrase>, "code": <code>, "message": ...}}`` with an
  ``X-SMG-Error-Code`` header (``src/routers/error.rs:55-87``). sglang-router has no
  ``/abort_request``: unknown routes answer 404.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests


class _Worker:
    def __init__(self, url: str):
        self.url = url if url.startswith(("http://", "https://")) else f"http://{url}"
        self.id = str(uuid.uuid4())
        self.healthy = True  # registered once its first health check passed
        self.failures = self.successes = 0
        self.load = 0

    def info(self) -> dict:
        return {"id": self.id, "url": self.url, "model_id": "unknown", "priority": 50,
                "cost": 1.0, "worker_type": "regular", "is_healthy": self.healthy,
                "load": self.load, "connection_mode": "HTTP", "disable_health_check": False}


class FakeRouter:
    """``with FakeRouter([worker.url], health_check_interval_secs=0.1) as router: router.url``."""

    def __init__(self, worker_urls: list[str], host: str = "127.0.0.1", port: int = 0,
                 health_failure_threshold: int = 3, health_success_threshold: int = 2,
                 health_check_timeout_secs: float = 5.0, health_check_interval_secs: float = 60.0,
                 health_check_endpoint: str = "/health"):
        self.workers = [_Worker(u) for u in worker_urls]
        self.failure_threshold, self.success_threshold = (health_failure_threshold,
                                                          health_success_threshold)
        self.check_timeout_s, self.interval_s = health_check_timeout_secs, health_check_interval_secs
        self.endpoint = health_check_endpoint
        self.lock = threading.Lock()
        self.log: list[str] = []
        self.marked_unhealthy: dict[str, int] = {}  # worker url -> times marked unhealthy
        self._turn = itertools.count()
        self._stop = threading.Event()
        handler = type("Handler", (_Handler,), {"router": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"

    # -- health checks (worker.rs:703-750) ------------------------------------------------------

    def check(self, w: _Worker) -> None:
        try:
            ok = requests.get(w.url + self.endpoint, timeout=self.check_timeout_s).ok
        except requests.RequestException:
            ok = False
        with self.lock:
            if ok:
                w.failures = 0
                w.successes += 1
                if not w.healthy and w.successes >= self.success_threshold:
                    w.healthy, w.successes = True, 0
            else:
                w.successes = 0
                w.failures += 1
                if w.healthy and w.failures >= self.failure_threshold:
                    w.healthy, w.failures = False, 0
                    self.marked_unhealthy[w.url] = self.marked_unhealthy.get(w.url, 0) + 1

    def _health_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            threads = [threading.Thread(target=self.check, args=(w,), daemon=True)
                       for w in self.workers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    def healthy(self) -> list[_Worker]:
        with self.lock:
            return [w for w in self.workers if w.healthy]

    def __enter__(self) -> FakeRouter:
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        threading.Thread(target=self._health_loop, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    router: FakeRouter

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        r = self.router
        path = self.path.split("?")[0]
        with r.lock:
            r.log.append(path)
        if path == "/health":
            return self._send(200, b"", "text/plain")
        if path == "/workers":
            with r.lock:
                infos = [w.info() for w in r.workers]
            return self._json(200, {"workers": infos, "total": len(infos), "stats": {
                "prefill_count": 0, "decode_count": 0, "regular_count": len(infos)}})
        if path in ("/health_generate", "/get_server_info", "/get_model_info"):
            healthy = r.healthy()
            if not healthy:
                return self._error(503, "no_workers", "No workers are available")
            return self._proxy("GET", healthy[0], path, None)
        return self._error(404, "not_found", f"no route {path}")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        r = self.router
        path = self.path.split("?")[0]
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        with r.lock:
            r.log.append(path)
        if path != "/generate":
            return self._error(404, "not_found", f"no route {path}")
        healthy = r.healthy()
        if not healthy:
            return self._error(503, "no_available_workers",
                               "No available workers (all circuits open or unhealthy)")
        return self._proxy("POST", healthy[next(r._turn) % len(healthy)], path, body)

    def _proxy(self, method: str, w: _Worker, path: str, body: bytes | None) -> None:
        with self.router.lock:
            w.load += 1
        try:
            resp = requests.request(method, w.url + path, data=body, timeout=600,
                                    headers={"Content-Type": "application/json"})
        except requests.RequestException as e:
            return self._error(502, "call_upstream_request_failed", str(e))
        finally:
            with self.router.lock:
                w.load -= 1
        self._send(resp.status_code, resp.content,
                   resp.headers.get("Content-Type", "application/json"))

    def _error(self, status: int, code: str, message: str) -> None:
        from http import HTTPStatus

        payload = {"error": {"type": HTTPStatus(status).phrase, "code": code, "message": message}}
        self._json(status, payload, {"X-SMG-Error-Code": code})

    def _json(self, status: int, payload: Any, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
