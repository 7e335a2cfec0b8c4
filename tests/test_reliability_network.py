"""Nothing hangs on a slow peer and nothing listens beyond the job.

The slow reward server is a local HTTP server on 127.0.0.1 that answers 200 with a large
Content-Length and then sends one byte every 0.5 s, forever: per-read timeouts never fire on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO

from megatron_gvpo.rewards import RewardInput
from megatron_gvpo.rewards.base import RewardConfig
from megatron_gvpo.rewards.remote import RemoteReward


class _Trickle(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        try:
            while not self.server.stopping.is_set():
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def trickle_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    server.stopping = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.stopping.set()
    server.shutdown()
    server.server_close()


@pytest.mark.one_leg
def test_a_trickling_server_is_cut_off_at_the_request_deadline(trickle_url):
    reward = RemoteReward(trickle_url, request_timeout_s=1.5, max_retries=1, backoff_s=0.01)
    start = time.monotonic()
    box: list = []
    worker = threading.Thread(
        target=lambda: box.append(reward([RewardInput("p", "r"), RewardInput("p", "s")])),
        daemon=True,  # a hang is abandoned, not waited for
    )
    worker.start()
    worker.join(15)
    elapsed = time.monotonic() - start
    assert box == [[None, None]], "the request did not end"
    assert 3.0 <= elapsed < 6.0  # two attempts of 1.5 s (+ one read), not forever
    counters = reward.pop_counters()
    assert counters["http_timeouts"] == 2 and counters["failed_requests"] == 1
    reward.close()


class _SlowHead(BaseHTTPRequestHandler):
    """``/status``: a status line that never ends; ``/header``: a header that never ends; one
    byte every 0.3 s (per-read time-outs never fire). ``/slow``: a valid answer after 0.5 s,
    counting the requests in flight at once."""

    def do_POST(self):  # noqa: N802 - http.server's name
        n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["query"])
        if self.path == "/slow":
            with self.server.lock:
                self.server.in_flight += 1
                self.server.most = max(self.server.most, self.server.in_flight)
            time.sleep(0.5)
            with self.server.lock:
                self.server.in_flight -= 1
            body = json.dumps({"rewards": [0.5] * n}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        head = b"HTTP/1.1 200 " if self.path == "/status" else b"HTTP/1.1 200 OK\r\nX-Slow: "
        try:
            self.wfile.write(head)
            while not self.server.stopping.is_set():
                self.wfile.write(b"a")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_head_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHead)
    server.daemon_threads = True
    server.stopping = threading.Event()
    server.lock, server.in_flight, server.most = threading.Lock(), 0, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.stopping.set()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path", ["/status", "/header"])
def test_a_trickled_status_line_or_header_is_cut_off_at_the_request_deadline(slow_head_url, path):
    url, _ = slow_head_url
    reward = RemoteReward(url + path, request_timeout_s=1.0, max_retries=0)
    box: list = []
    start = time.monotonic()
    worker = threading.Thread(target=lambda: box.append(reward([RewardInput("p", "r")])))
    worker.daemon = True  # a hang is abandoned, not waited for
    worker.start()
    worker.join(10)
    elapsed = time.monotonic() - start
    assert box == [[None]], "the request did not end"
    assert 1.0 <= elapsed < 2.5, elapsed
    assert reward.pop_counters()["http_timeouts"] == 1
    reward.close()


@pytest.mark.one_leg
def test_groups_are_scored_concurrently_up_to_max_concurrency(slow_head_url):
    from megatron_gvpo.data.prompts import Prompt
    from megatron_gvpo.rewards import RewardManager
    from megatron_gvpo.rollout.base import RolloutEngine, Sample, SamplingParams
    from megatron_gvpo.trainer.groups import rollout_and_score

    class Echo(RolloutEngine):
        def generate(self, requests, sampling):
            return [
                [Sample(r.prompt_ids, [7], "7", [-0.1], "stop") for _ in range(r.n)]
                for r in requests
            ]

        update_weights = weight_version = health = shutdown = lambda *a: 0

    url, server = slow_head_url
    kwargs = {"url": url + "/slow", "max_concurrency": 4, "request_timeout_s": 5.0}
    rows = [Prompt([1, 2], f"{i} + 1 =", str(i + 1), None, {}, f"row {i}") for i in range(8)]
    with RewardManager([{"name": "remote", "kwargs": kwargs}]) as manager:
        start = time.monotonic()
        result = rollout_and_score(Echo(), manager, rows, SamplingParams(), 2, list(range(8)))
        elapsed = time.monotonic() - start
    assert [g.rewards for g in result.groups] == [[0.5, 0.5]] * 8
    assert server.most == 4  # 8 groups, one request each, 4 at a time (0.5 s each)
    assert elapsed < 2.0, elapsed  # one after another: 4 s


_EXITS = """
import sys, time
from megatron_gvpo.rewards import RewardInput, RewardManager
cfg = {{"name": "remote", "kwargs": {{"url": "{url}", "request_timeout_s": 1.0, "max_retries": 0,
        "batch_size": 1, "max_concurrency": 2}}}}
with RewardManager([cfg]) as manager:
    result = manager([RewardInput("p", str(i)) for i in range(4)])
print("scored", result.failed, flush=True)
"""


@pytest.mark.one_leg
def test_a_process_with_stuck_reward_requests_scores_and_exits(trickle_url):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _EXITS.format(url=trickle_url)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "scored [True, True, True, True]" in proc.stdout
    assert time.monotonic() - start < 20


def test_user_rewards_get_a_default_timeout_and_builtins_run_inline():
    from megatron_gvpo.rewards.base import USER_REWARD_TIMEOUT_S

    assert RewardConfig("my_module:score").timeout_s == USER_REWARD_TIMEOUT_S
    assert RewardConfig("my_module:score", timeout_s=None).timeout_s is None
    assert RewardConfig("math").timeout_s is None  # math-verify's SIGALRM needs the main thread


_LISTENERS = """
import psutil
from megatron_gvpo.parallel.initialize import ParallelConfig, initialize
initialize(ParallelConfig())
ips = {c.laddr.ip for c in psutil.Process().net_connections(kind="inet") if c.status == "LISTEN"}
print("LISTEN", sorted(ips))
"""


def test_single_process_rendezvous_listens_on_loopback_only():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-c", _LISTENERS], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LISTEN ['127.0.0.1']" in proc.stdout, proc.stdout


def test_sglang_weight_update_store_listens_on_its_address_only():
    import psutil

    from megatron_gvpo.rollout.sglang.client import Endpoint
    from megatron_gvpo.rollout.sglang.group import UpdateGroup

    server = Endpoint(0, "http://127.0.0.1:1", tp_size=1)
    group = UpdateGroup("g", [server], "127.0.0.1", 0, "gloo", timeout_s=5.0)
    mine = [
        c.laddr
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == "LISTEN" and c.laddr.port == group.port
    ]
    assert [a.ip for a in mine] == ["127.0.0.1"]


# A "trainer" that starts a "server" with rollout/sglang/server.start from a worker thread (as a
# restart does), prints the server's pid, and waits to be killed. The server is a sleeping Python
# that prints its own pid into a file (launch flags are appended to its argv and ignored).
_TRAINER = r"""
import sys, threading, time
from pathlib import Path
from megatron_gvpo.rollout.sglang import server
from megatron_gvpo.rollout.sglang.client import Endpoint
from megatron_gvpo.rollout.sglang.config import SGLangConfig

pidfile, watchdog = Path(sys.argv[1]), sys.argv[2] == "1"
code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
cfg = SGLangConfig(model_path="unused", launch_command=[sys.executable, "-c", code, str(pidfile)])
if not watchdog:
    real = server.subprocess.Popen
    server.subprocess.Popen = lambda cmd, **kw: real(cmd[cmd.index("--") + 1:], **kw)
s = Endpoint(index=0, url="http://127.0.0.1:1", port=1, log_path=pidfile.with_suffix(".log"))
t = threading.Thread(target=server.start, args=(cfg, "unused", s))
t.start(); t.join()
print("started", flush=True)
time.sleep(120)
"""


def _server_alive_after_trainer_killed(tmp_path, watchdog: bool) -> bool:
    pidfile = tmp_path / f"server{int(watchdog)}.pid"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    trainer = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, str(pidfile), str(int(watchdog))],
        stdout=subprocess.PIPE, env=env, text=True,
    )
    try:
        assert trainer.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 30
        while not pidfile.is_file() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the fake server never started"
            time.sleep(0.1)
        pid = int(pidfile.read_text())
    finally:
        trainer.kill()  # SIGKILL: no atexit, no terminate()
        trainer.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    os.killpg(os.getpgid(pid), 9)  # the negative control's orphan
    return True


@pytest.mark.one_leg
def test_a_started_server_dies_with_a_sigkilled_trainer(tmp_path):
    assert not _server_alive_after_trainer_killed(tmp_path, watchdog=True)
    # Negative control: the same server started without the watchdog outlives the trainer.
    assert _server_alive_after_trainer_killed(tmp_path, watchdog=False)


class _SlowForSome(BaseHTTPRequestHandler):
    """Scores 1.0 at once, except for queries containing "slow": those wait 30 s (longer than
    any deadline below), the way an overloaded reward server treats some requests."""

    def do_POST(self):  # noqa: N802 - http.server's name
        queries = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["query"]
        if any("slow" in q for q in queries):
            self.server.stopping.wait(30)
        body = json.dumps({"rewards": [1.0] * len(queries)}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("on_error", "concurrency"), [("drop", 8), ("zero", 1)])
def test_a_round_ends_at_its_reward_deadline_and_counts_what_missed_it(on_error, concurrency):
    """8 groups, 5 of them on a server that never answers in time. Per-request deadlines alone
    (2 s x 4 attempts per slow group) would hold the round 8 s with every group in flight, 40 s
    one at a time; the round's 1.5 s deadline ends it. With every group in flight the fast ones
    keep their scores; one at a time, the first slow group holds the only slot to the deadline
    and every group fails. Failures follow reward.on_error and are counted."""
    from megatron_gvpo.data.prompts import Prompt
    from megatron_gvpo.rewards import RewardManager
    from megatron_gvpo.rollout.base import RolloutEngine, Sample, SamplingParams
    from megatron_gvpo.trainer.groups import filter_groups, rollout_and_score

    class Echo(RolloutEngine):
        def generate(self, requests, sampling):
            return [
                [Sample(r.prompt_ids, [7, 8], "78", [-0.1, -0.1], "stop") for _ in range(r.n)]
                for r in requests
            ]

        update_weights = weight_version = health = shutdown = lambda *a: 0

    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowForSome)
    server.daemon_threads = True
    server.stopping = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    kwargs = {"url": url, "max_concurrency": concurrency, "request_timeout_s": 2.0,
              "max_retries": 3, "backoff_s": 0.01}
    slow = {0, 2, 3, 5, 7}
    rows = [Prompt([1, 2], ("slow " if i in slow else "") + f"{i} + 1 =", str(i + 1), None, {},
                   f"row {i}") for i in range(8)]
    try:
        with RewardManager([{"name": "remote", "kwargs": kwargs}]) as manager:
            start = time.monotonic()
            result = rollout_and_score(Echo(), manager, rows, SamplingParams(), 2,
                                       list(range(8)), round_timeout_s=1.5)
            elapsed = time.monotonic() - start
            totals = manager.totals["remote"]
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
    assert 1.5 <= elapsed < 1.5 + 1.0, elapsed  # the deadline, plus the grace and slack
    failed = slow if concurrency == 8 else set(range(8))
    assert [g.reward_failed for g in result.groups] == [[i in failed] * 2 for i in range(8)]
    assert [g.rewards for g in result.groups] == [[0.0 if i in failed else 1.0] * 2
                                                  for i in range(8)]
    # every failure is counted by the reward; the round's counter has the groups it gave up on
    assert totals.failures == 2 * len(failed) and totals.samples == 16
    assert result.metrics["reward_fn/remote/failures"] == 2 * len(failed)
    missed = result.metrics["reward_fn/round_deadline_missed"]
    assert (missed == 0) if concurrency == 8 else (0 <= missed <= 16)
    cut = result.metrics.get("reward_fn/remote/round_deadline", 0)
    assert cut + missed // 2 >= (len(slow) if concurrency == 8 else 1)
    metrics: dict = {}
    kept = filter_groups(result.groups, 1, False, on_error == "drop", metrics)
    assert metrics["filter/reward_failed"] == 2 * len(failed)
    want = [0 if i in failed else 2 for i in range(8)] if on_error == "drop" else [2] * 8
    assert [len(g.responses) for g in kept] == want
