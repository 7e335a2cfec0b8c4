"""Rewards: math-verify answers, format regexes, the remote client against a local HTTP server
that injects faults (500s, time-outs, malformed bodies), user functions that raise or hang, and
config errors.
"""

from __future__ import annotations

import importlib
import json
import logging
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_gvpo.rewards import (
    THINK_ANSWER,
    FormatReward,
    MathReward,
    RemoteReward,
    RewardConfig,
    RewardInput,
    RewardManager,
    RewardTimeout,
    call_guarded,
    last_boxed,
    last_number,
    load_callable,
    register_reward,
    registered_rewards,
    unregister_reward,
)


def inp(response: str, label: str | None = None, **kw) -> RewardInput:
    return RewardInput(prompt="Q: ", response=response, label=label, **kw)


# ---------------------------------------------------------------- math


@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),  # boxed fraction vs decimal label
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),  # boxed decimal vs fraction label
        (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
        (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
        (r"\boxed{\frac{1}{2}}", "2", 0.0),  # a number inside the box is not the answer
        (r"first \boxed{7} then \boxed{42}", "42", 1.0),  # the last box counts
        (r"first \boxed{42} then \boxed{7}", "42", 0.0),
        (r"\boxed{x^2+1}", "1+x^2", 1.0),
        (r"\boxed{\sqrt{2}}", r"\sqrt{2}", 1.0),
        ("3 apples and 4 pears make 7.", "7", 1.0),  # last-number fallback
        ("The answer is 7, not 3", "7", 0.0),  # fallback takes the last number
        ("in total 1,000 sheep", "1000", 1.0),
        ("so x = -3", "-3", 1.0),
        ("half: 1/2", "0.5", 1.0),
        ("no digits here at all", "7", 0.0),
        ("", "7", 0.0),
    ],
)
def test_math_answers(response, label, expected):
    assert MathReward()(inp(response, label)) == expected


def test_math_extraction_helpers():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed("none") is None
    assert last_number("pages 3-5, total 1,250.") == "1250"
    assert last_number("v2 x") is None
    assert last_number("pi is 3.14") == "3.14"


def test_math_counters_and_fallback_switch():
    m = MathReward(last_number_fallback=False)
    assert m(inp("the answer is 7", "7")) == 0.0
    assert m.pop_counters() == {"no_answer": 1}
    assert m.pop_counters() == {}
    m = MathReward()
    assert m(inp("it is 7", "7")) == 1.0
    assert m.pop_counters() == {"last_number": 1}


def test_math_real_timeout_in_main_thread_is_counted():
    # 9^(9^9) has ~370M digits: math-verify's SIGALRM stops it after timeout_seconds
    assert threading.current_thread() is threading.main_thread()
    mgr = RewardManager([RewardConfig("math", kwargs={"timeout_seconds": 1})])
    t0 = time.monotonic()
    res = mgr([inp(r"\boxed{9^{9^{9}}}", "3"), inp(r"\boxed{3}", "3")])
    assert time.monotonic() - t0 < 6
    assert res.per_reward["math"] == [0.0, 1.0]
    assert (res.stats["math"].timeouts, res.stats["math"].errors) == (1, 0)


def test_math_off_main_thread_works_without_signals():
    out = {}

    def run():
        try:
            out["score"] = MathReward()(inp(r"\boxed{\frac{1}{2}}", "0.5"))
        except BaseException as e:  # math-verify raises ValueError if it tries signals here
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert out == {"score": 1.0}
    # timeout_s runs math in guard threads: same answers
    mgr = RewardManager([RewardConfig("math", timeout_s=20)])
    res = mgr([inp(r"\boxed{0.5}", r"\frac12"), inp("so 8", "9")])
    assert res.scores == [1.0, 0.0] and res.stats["math"].failures == 0


def test_math_missing_label_is_an_error():
    res = RewardManager([RewardConfig("math")])([inp("7", None), inp("7", "7")])
    assert res.scores == [0.0, 1.0]
    assert res.stats["math"].errors == 1


# ---------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>reasoning</think>answer", 1.0),
        ("  <think>\nmulti\nline\n</think>\n\nThe answer is 4.", 1.0),
        ("<think>reasoning</think>", 0.0),  # no answer
        ("<think>reasoning</think>   \n", 0.0),
        ("answer first <think>r</think> x", 0.0),
        ("<think>a</think> b <think>c</think> d", 0.0),  # two think blocks
        ("<think><think>a</think></think> b", 0.0),
        ("<think>unclosed answer", 0.0),
        ("plain answer", 0.0),
    ],
)
def test_format_think_answer(response, expected):
    assert FormatReward()(inp(response)) == expected


def test_format_boxed_count_and_custom_regex():
    one_box = FormatReward(pattern=None, boxed_count=1)
    assert one_box(inp(r"so \boxed{3}")) == 1.0
    assert one_box(inp(r"\boxed{3} or \boxed{4}")) == 0.0
    assert one_box(inp("3")) == 0.0
    both = FormatReward(pattern=THINK_ANSWER, boxed_count=1)
    assert both(inp(r"<think>x</think> \boxed{1}")) == 1.0
    assert both(inp("<think>x</think> 1")) == 0.0
    search = FormatReward(pattern=r"answer:\s*\d+", match="search", ignore_case=True)
    assert search(inp("blah ANSWER: 12 blah")) == 1.0
    assert search(inp("blah answer: twelve")) == 0.0


# ---------------------------------------------------------------- remote


class _RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[dict] = []
        self.plan: list[str] = []  # one action per request, then "ok"
        self.auth: list[str | None] = []  # each request's Authorization header
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        pass  # the client hung up on a slow reply: expected in the time-out test

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/get_reward"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, payload: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        srv: _RewardServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.bodies.append(body)
            srv.auth.append(self.headers.get("Authorization"))
            action = srv.plan.pop(0) if srv.plan else "ok"
        scores: list = [float(len(r)) for r in body["responses"]]  # order-revealing score
        if action == "500":
            return self._send(500, b'{"error": "boom"}')
        if action == "400":
            return self._send(400, b'{"error": "bad request"}')
        if action == "sleep":
            time.sleep(1.0)
        if action == "notjson":
            return self._send(200, b"<html>oops</html>")
        if action == "short":
            scores = scores[:-1]
        if action == "null":
            scores[0] = None
        key = "scores" if action == "nokey" else "rewards"
        self._send(200, json.dumps({key: scores}).encode())


@pytest.fixture
def server():
    srv = _RewardServer()
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _remote(server, **kw) -> RewardManager:
    kwargs = {"url": server.url, "backoff_s": 0.01, "request_timeout_s": 5.0, **kw}
    return RewardManager([RewardConfig("remote", kwargs=kwargs)])


def _responses(n: int) -> list[RewardInput]:
    return [RewardInput(f"p{i}", "x" * (i + 1), label=str(i), domain="d") for i in range(n)]


def test_remote_batches_and_schema(server):
    xs = _responses(10)
    with _remote(server, batch_size=4, max_concurrency=2) as mgr:
        res = mgr(xs)
    assert res.scores == [float(i + 1) for i in range(10)]  # order kept across batches
    assert sorted(len(b["query"]) for b in server.bodies) == [2, 4, 4]
    body = next(b for b in server.bodies if b["prompts"][0] == "p0")
    assert body["query"][:2] == ["p0x", "p1xx"]
    assert body["labels"][:2] == ["0", "1"] and body["domains"][0] == "d"
    assert "metadata" not in body
    assert res.stats["remote"].failures == 0
    assert res.stats["remote"].extra == {"requests": 3}


def test_remote_api_key_is_sent_as_a_bearer_token(server):
    with _remote(server, api_key="sk-test-1") as mgr:
        assert mgr(_responses(2)).scores == [1.0, 2.0]
    assert server.auth == ["Bearer sk-test-1"]
    with pytest.raises(ValueError, match="api_key"):
        _remote(server, api_key="x", headers={"authorization": "Bearer y"})


def test_remote_500_then_success_is_retried(server):
    server.plan = ["500"]
    with _remote(server, max_retries=2) as mgr:
        res = mgr(_responses(3))
    assert res.scores == [1.0, 2.0, 3.0]
    st = res.stats["remote"]
    assert st.failures == 0
    assert st.extra["retries"] == 1 and st.extra["http_errors"] == 1 and st.extra["requests"] == 2


def test_remote_timeout_scores_zero_and_counts(server, caplog):
    server.plan = ["sleep", "sleep"]
    t0 = time.monotonic()
    with (
        caplog.at_level(logging.WARNING),
        _remote(server, request_timeout_s=0.2, max_retries=1) as mgr,
    ):
        res = mgr(_responses(3))
    assert time.monotonic() - t0 < 0.9  # gave up after 2 x 0.2 s, did not wait for the 1 s replies
    assert res.scores == [0.0, 0.0, 0.0]
    st = res.stats["remote"]
    assert st.errors == 3
    assert st.extra["http_timeouts"] == 2 and st.extra["retries"] == 1
    assert st.extra["failed_requests"] == 1
    assert any("remote" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("action", ["notjson", "short", "nokey"])
def test_remote_malformed_response_is_not_retried(server, action):
    server.plan = [action]
    with _remote(server, max_retries=3) as mgr:
        res = mgr(_responses(3))
    assert res.scores == [0.0, 0.0, 0.0]
    st = res.stats["remote"]
    assert st.errors == 3 and st.extra["malformed"] == 1
    assert "retries" not in st.extra and len(server.bodies) == 1


def test_remote_4xx_not_retried_and_null_entry_fails_one_sample(server):
    server.plan = ["400"]
    with _remote(server, max_retries=3) as mgr:
        res = mgr(_responses(2))
        assert res.scores == [0.0, 0.0] and len(server.bodies) == 1
        assert res.stats["remote"].extra["http_errors"] == 1
        server.plan = ["null"]
        res = mgr(_responses(3))
    assert res.scores == [0.0, 2.0, 3.0]
    assert res.stats["remote"].errors == 1


def test_remote_connection_refused_is_counted():
    srv = _RewardServer()
    url = srv.url
    srv.server_close()  # nothing listens there now
    mgr = RewardManager(
        [RewardConfig("remote", kwargs={"url": url, "max_retries": 1, "backoff_s": 0.01})]
    )
    res = mgr(_responses(2))
    assert res.scores == [0.0, 0.0]
    st = res.stats["remote"]
    assert st.errors == 2 and st.extra["connection_errors"] == 2 and st.extra["retries"] == 1


# ---------------------------------------------------------------- user functions

USER_MODULE = textwrap.dedent(
    """
    import threading

    RELEASE = threading.Event()
    NOT_CALLABLE = 3

    def flaky(inp, bonus=0.0):
        if inp.metadata["i"] % 3 == 0:
            raise RuntimeError("flaky reward failed")
        return (1.0 if inp.response == inp.label else 0.0) + bonus

    def hangs(inp):
        if inp.metadata.get("hang"):
            RELEASE.wait(30)
        return 1.0

    def lengths(inputs):
        return [float(len(x.response)) for x in inputs]

    def wrong_length(inputs):
        return [1.0]

    def bad_values(inp):
        return {"nan": float("nan"), "str": "1.0", "none": None}.get(inp.response, 2)
    """
)


@pytest.fixture
def user_mod(tmp_path, monkeypatch):
    (tmp_path / "gvpo_test_user_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = load_callable("gvpo_test_user_rewards:flaky").__module__
    release = importlib.import_module(mod).RELEASE
    release.clear()
    yield mod
    release.set()  # let threads a timed-out test left hanging finish


def test_user_function_raising_on_a_third(user_mod, caplog):
    xs = [inp("right" if i % 2 else "wrong", "right", metadata={"i": i}) for i in range(12)]
    mgr = RewardManager([RewardConfig(f"{user_mod}:flaky", kwargs={"bonus": 0.5}, tag="flaky")])
    with caplog.at_level(logging.WARNING):
        res = mgr(xs)
        res2 = mgr(xs)  # same failures again, right away: rate-limited, no new line
    expected = [0.0 if i % 3 == 0 else (1.5 if i % 2 else 0.5) for i in range(12)]
    assert res.scores == expected and res2.scores == expected
    assert res.stats["flaky"].errors == 4 and res.stats["flaky"].timeouts == 0
    assert mgr.totals["flaky"].errors == 8
    warnings = [r for r in caplog.records if "flaky" in r.getMessage()]
    assert len(warnings) == 1 and "4/12" in warnings[0].getMessage()
    assert "RuntimeError" in warnings[0].getMessage()


def test_warning_reports_suppressed_count(user_mod, caplog):
    xs = [inp("a", "a", metadata={"i": 0})]
    mgr = RewardManager([RewardConfig(f"{user_mod}:flaky")], warn_interval_s=0.05)
    with caplog.at_level(logging.WARNING):
        mgr(xs)
        mgr(xs)
        time.sleep(0.06)
        mgr(xs)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and "1 similar warnings suppressed" in msgs[1]


def test_user_function_hanging_past_timeout(user_mod):
    xs = [inp("r", metadata={"hang": i in (1, 4)}) for i in range(6)]
    mgr = RewardManager([RewardConfig(f"{user_mod}:hangs", timeout_s=0.3, num_workers=2)])
    t0 = time.monotonic()
    res = mgr(xs)
    assert time.monotonic() - t0 < 2.0
    assert res.scores == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert res.stats[f"{user_mod}:hangs"].timeouts == 2
    assert res.stats[f"{user_mod}:hangs"].errors == 0


def test_user_function_batched_and_bad_returns(user_mod):
    mgr = RewardManager(
        [
            RewardConfig(f"{user_mod}:lengths", batched=True, tag="len"),
            RewardConfig(f"{user_mod}:wrong_length", batched=True, tag="wrong"),
            RewardConfig(f"{user_mod}:bad_values", tag="bad"),
        ]
    )
    res = mgr([inp("nan"), inp("str"), inp("none"), inp("ok")])
    assert res.per_reward["len"] == [3.0, 3.0, 4.0, 2.0]
    assert res.per_reward["wrong"] == [0.0] * 4 and res.stats["wrong"].errors == 4
    assert res.per_reward["bad"] == [0.0, 0.0, 0.0, 2.0] and res.stats["bad"].errors == 3


def test_user_function_from_file_path(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def exact(inp):\n    return float(inp.response == inp.label)\n")
    mgr = RewardManager([RewardConfig(f"{path}:exact")])
    assert mgr([inp("a", "a"), inp("a", "b")]).scores == [1.0, 0.0]


# ---------------------------------------------------------------- registry, weights, guard


def test_register_weighted_sum_and_domains():
    @register_reward("test_toy_len")
    def toy_len(x: RewardInput, scale: float = 1.0) -> float:
        return scale * len(x.response)

    try:
        assert "test_toy_len" in registered_rewards()
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_toy_len")(lambda x: 0.0)
        mgr = RewardManager(
            [
                {"name": "test_toy_len", "weight": 0.5, "kwargs": {"scale": 2.0}},
                RewardConfig("format", weight=2.0, domains=["fmt"]),
            ]
        )
        xs = [inp("<think>a</think>b", domain="fmt"), inp("<think>a</think>b", domain="other")]
        res = mgr(xs)
        assert res.per_reward["test_toy_len"] == [34.0, 34.0]
        assert res.per_reward["format"] == [1.0, 0.0]  # second sample is outside its domains
        assert res.scores == [0.5 * 34 + 2.0, 0.5 * 34]
        assert res.stats["format"].samples == 1
        m = res.metrics()
        assert m["reward/format/mean"] == 1.0 and m["reward/total/mean"] == 18.0
        assert m["reward/test_toy_len/errors"] == 0.0
    finally:
        unregister_reward("test_toy_len")
    assert "test_toy_len" not in registered_rewards()


def test_call_guarded_order_and_hung_slots_are_replaced():
    release = threading.Event()

    def f(x):
        if x < 0:
            release.wait(10)
        return x * 10

    t0 = time.monotonic()
    out = call_guarded(f, [-1, -2, 1, 2, 3, 4], timeout_s=0.2, num_workers=2)
    release.set()
    assert time.monotonic() - t0 < 1.5
    assert [v for v, _ in out[2:]] == [10, 20, 30, 40]
    assert all(isinstance(e, RewardTimeout) for _, e in out[:2])
    assert call_guarded(lambda x: 1 / x, [1, 0], None)[1][0] is None


def test_call_guarded_reuses_its_workers_across_calls():
    """A step pays for no thread start-up: the workers of one call serve the next ones."""
    from megatron_gvpo.rewards.guard import _POOL

    def square(x):
        return x * x

    call_guarded(square, list(range(8)), timeout_s=5.0, num_workers=4)
    time.sleep(0.05)  # the warm-up call's workers park
    before = _POOL.threads_started
    for _ in range(20):
        assert [v for v, _ in call_guarded(square, list(range(8)), 5.0, 4)] == [
            x * x for x in range(8)
        ]
    assert _POOL.threads_started == before


@pytest.mark.parametrize(
    ("configs", "match"),
    [
        ([RewardConfig("no_such_reward")], r"'name'.*no_such_reward"),
        ([RewardConfig("no_such_module_xyz:fn")], r"no_such_module_xyz.*not found"),
        ([RewardConfig("json:no_such_fn")], r"'json:no_such_fn'.*no attribute"),
        ([RewardConfig("json:decoder.NaN")], r"not callable"),
        ([RewardConfig(":fn")], r"module:function"),
        ([RewardConfig("json:")], r"module:function"),
        ([RewardConfig("/nonexistent/r.py:fn")], r"does not exist"),
        ([RewardConfig("math", kwargs={"tolerance": 1})], r"'math'.*tolerance"),
        ([RewardConfig("math", kwargs={"timeout_seconds": 0.5})], r"kwargs.timeout_seconds"),
        ([RewardConfig("remote")], r"'remote'.*kwargs.url"),
        ([RewardConfig("remote", kwargs={"url": "localhost:1"})], r"kwargs.url"),
        ([RewardConfig("remote", kwargs={"url": "http://x", "batch_size": 0})], "batch_size"),
        ([RewardConfig("format", kwargs={"pattern": "(unclosed"})], r"kwargs.pattern"),
        ([RewardConfig("format", kwargs={"pattern": None})], r"kwargs.pattern"),
        ([RewardConfig("format", batched=True)], r"'batched'"),
        ([RewardConfig("math"), RewardConfig("math")], r"duplicate.*'tag'"),
        ([{"name": "math", "wieght": 2}], r"unknown fields \['wieght'\]"),
        ([{"weight": 2}], r"missing field 'name'"),
        ([], "at least one"),
    ],
)
def test_config_errors(configs, match):
    with pytest.raises(ValueError, match=match):
        RewardManager(configs)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": ""}, "'name'"),
        ({"name": "math", "weight": float("nan")}, "'weight'"),
        ({"name": "math", "timeout_s": 0}, "'timeout_s'"),
        ({"name": "math", "num_workers": 0}, "'num_workers'"),
    ],
)
def test_reward_config_field_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        RewardConfig(**kw)


def test_remote_reward_direct_body_has_metadata_when_asked():
    r = RemoteReward(url="http://127.0.0.1:1", send_metadata=True)
    body = r.body([RewardInput("p", "r", metadata={"k": 1})])
    assert body == {
        "query": ["pr"],
        "prompts": ["p"],
        "responses": ["r"],
        "labels": [None],
        "domains": [None],
        "metadata": [{"k": 1}],
    }
    r.close()
