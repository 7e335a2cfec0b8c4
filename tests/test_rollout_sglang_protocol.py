"""SGLangEngine against a PROTOCOL FAKE of SGLang's HTTP server (tests/sglang_fake_server.py).

SGLang itself cannot run here (no GPU; its package needs sgl_kernel), so nothing in this file talks
to SGLang: the fake follows SGLang's documented request/response shapes, validates every field and
injects faults. What these tests prove is the client's side of the protocol, not SGLang's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from megatron_gvpo.rollout.base import GenerateRequest, SamplingParams, response_seed
from megatron_gvpo.rollout.sglang import (
    SGLangConfig,
    SGLangEngine,
    SGLangError,
    flatten_bucket,
    sglang_flattened_bucket_serializer,
    unflatten_bucket,
)

sys.path.insert(0, str(Path(__file__).parent))
from sglang_fake_server import (  # noqa: E402
    FakeSGLangServer,
    fake_routed_experts,
    fake_tokens,
    sglang_standin,
)
from sglang_router_fake import FakeRouter  # noqa: E402

FAKE = str(Path(__file__).with_name("sglang_fake_server.py"))
FAST = dict(
    health_poll_s=0.05, health_timeout_s=2.0, connect_timeout_s=1.0, request_timeout_s=5.0,
    startup_timeout_s=30.0, sync_timeout_s=60.0, backoff_s=0.01, backoff_max_s=0.05,
    shutdown_grace_s=5.0, max_concurrency=8,
)
SAMPLING = SamplingParams(max_new_tokens=12, temperature=1.0)
CONTROL = {"/generate", "/health_generate", "/health", "/get_server_info", "/server_info",
           "/abort_request"}
NEW, MID, OLD = "0.5.23", "0.5.15", "0.5.4"
GENERATIONS = [NEW, MID, OLD]


def client_serializer(flat, metas, tp_size):
    """The client's own colocated serializer (what a GPU run uses), with SGLang's metadata class
    stood in for (SGLang cannot be installed here); CPU tensors travel through torch's
    shared-memory reductions instead of CUDA-IPC handles."""
    with sglang_standin():
        return sglang_flattened_bucket_serializer(flat, metas, tp_size)


def attach(*fakes, **kw) -> SGLangEngine:
    return SGLangEngine(SGLangConfig(urls=[f.url for f in fakes], **{**FAST, **kw}))


def sync_paths(fake_or_log) -> list[str]:
    entries = fake_or_log.state.log if hasattr(fake_or_log, "state") else fake_or_log
    return [e["path"] for e in entries if e["path"] not in CONTROL]


def expected(prompt, seed, j, params=SAMPLING, **extra):
    sp = {"max_new_tokens": params.max_new_tokens, "stop_token_ids": params.stop_token_ids,
          "stop": params.stop, "sampling_seed": response_seed(seed, j), **extra}
    return fake_tokens(prompt, sp)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def get(url: str, path: str):
    return requests.get(url + path, timeout=10).json()


# -- pure pieces -----------------------------------------------------------------------------------


def test_flatten_bucket_round_trip_one_flat_tensor_per_dtype():
    g = torch.Generator().manual_seed(0)
    bucket = [
        ("a", torch.randn(3, 4, generator=g)),
        ("b", torch.randn(5, generator=g).bfloat16()),
        ("c", torch.tensor(2.5)),
        ("d", torch.randn(2, 1, 3, generator=g).bfloat16()),
        ("e", torch.empty(0, 7)),
    ]
    groups = flatten_bucket(bucket)
    assert [flat.dtype for flat, _ in groups] == [torch.float32, torch.bfloat16]
    assert all(flat.dim() == 1 for flat, _ in groups)
    f32_metas = groups[0][1]
    assert [(m.name, m.start, m.end) for m in f32_metas] == [
        ("a", 0, 12), ("c", 12, 13), ("e", 13, 13)]
    back = dict(pair for flat, metas in groups for pair in unflatten_bucket(flat, metas))
    assert set(back) == {n for n, _ in bucket}
    for name, t in bucket:
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang installed")
def test_real_serializer_without_sglang_explains_what_is_missing():
    flat, metas = flatten_bucket([("w", torch.ones(2))])[0]
    with pytest.raises(RuntimeError, match="weight_sync='tensor' needs SGLang's serializer"):
        sglang_flattened_bucket_serializer(flat, metas, 1)


def test_protocol_fake_rejects_unknown_missing_and_mistyped_fields():
    with FakeSGLangServer() as fake:
        ok = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}
        assert requests.post(fake.url + "/generate", json=ok, timeout=5).status_code == 200
        # unknown top-level keys are ignored (api_types.GenerateRequest), sampling keys are not
        assert requests.post(fake.url + "/generate", json={**ok, "surprise": 1},
                             timeout=5).status_code == 200
        bad = [
            {"sampling_params": {}},
            {**ok, "input_ids": [1, "2"]},
            {**ok, "sampling_params": {"max_new_tokens": 2, "temprature": 1.0}},
            {**ok, "sampling_params": {"no_stop_trim": 1}},
            {**ok, "return_logprob": "yes"},
        ]
        for body in bad:
            r = requests.post(fake.url + "/generate", json=body, timeout=5)
            assert r.status_code == 400, body
        r = requests.post(fake.url + "/update_weights_from_disk", json={}, timeout=5)
        assert r.status_code == 400 and "missing field 'model_path'" in r.text


# -- generation ------------------------------------------------------------------------------------


def test_generate_n_responses_in_order_with_per_response_seeds():
    reqs = [GenerateRequest([5, 6, 7], n=3, seed=11), GenerateRequest([8], n=1, seed=12),
            GenerateRequest([9, 9], n=4, seed=13)]
    with FakeSGLangServer() as fake, attach(fake) as eng:
        out = eng.generate(reqs, SAMPLING)
        bodies = [e["body"] for e in fake.state.log if e["path"] == "/generate"]
    assert [len(g) for g in out] == [3, 1, 4]
    for req, group in zip(reqs, out, strict=True):
        for j, s in enumerate(group):
            ids, lps, finish, text = expected(req.prompt_ids, req.seed, j)
            assert s.prompt_ids == req.prompt_ids
            assert s.response_ids == ids and s.text == text and s.finish_reason == finish["type"]
            assert s.logprobs == pytest.approx(lps)
    assert len(bodies) == 8
    seeds = sorted(b["sampling_params"]["sampling_seed"] for b in bodies)
    want = sorted(response_seed(r.seed, j) for r in reqs for j in range(r.n))
    assert seeds == want and len(set(seeds)) == 8
    assert all(b["sampling_params"]["n"] == 1 and b["return_logprob"] is True
               and b["logprob_start_len"] == -1 for b in bodies)
    assert len({b["rid"] for b in bodies}) == 8


MOE_CONFIG = {"model_type": "qwen3_moe", "num_hidden_layers": 3, "num_experts": 4,
              "num_experts_per_tok": 2, "mlp_only_layers": [0], "decoder_sparse_step": 1}


def _routed_reference(value: str, tokens: int) -> torch.Tensor:
    """``meta_info.routed_experts`` decoded as SGLang's own helper does
    (``srt/state_capturer/routed_experts.py:166-174``: base64, then int32), then cut per MoE
    layer with explicit loops: [MoE layers 1 and 2, tokens - 1, top-k]."""
    import base64

    import numpy as np

    flat = np.frombuffer(base64.b64decode(value), dtype=np.int32).tolist()
    rows = tokens - 1
    assert len(flat) == rows * 3 * 2  # [tokens - 1, num_hidden_layers, top-k]
    out = torch.zeros(2, rows, 2, dtype=torch.int32)
    for t in range(rows):
        for j, layer in enumerate((1, 2)):
            for e in range(2):
                out[j, t, e] = flat[(t * 3 + layer) * 2 + e]
    return out


def test_routed_experts_are_requested_and_decoded_as_the_server_encodes_them(tmp_path):
    """routing_replay=rollout over SGLang: every /generate asks for routed experts; the answer's
    base64 [tokens, layers, k] int32 array becomes Sample.routes [MoE layers, tokens, k] (dense
    layer 0 dropped, prompt + every response token but the last). The fake is a PROTOCOL FAKE
    (tests/sglang_fake_server.py): this checks the client's decoding, not SGLang."""
    from megatron_gvpo.rollout.sglang import RouteLayout

    model = tmp_path / "moe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MOE_CONFIG))
    layout = RouteLayout(3, (1, 2), 2)
    reqs = [GenerateRequest([5, 6, 7], n=2, seed=11), GenerateRequest([8], n=1, seed=12)]
    with FakeSGLangServer(model_path=str(model), routed_experts=True) as fake:
        with SGLangEngine(SGLangConfig(urls=[fake.url], **FAST), routes=layout) as eng:
            out = eng.generate(reqs, SAMPLING)
        bodies = [e["body"] for e in fake.state.log if e["path"] == "/generate"]
        answers = {}
        for b in bodies:  # what the server answered each body (the fake is deterministic)
            ids, *_ = fake_tokens(b["input_ids"], b["sampling_params"])
            answers[tuple(b["input_ids"] + ids)] = fake_routed_experts(
                str(model), b["input_ids"] + ids
            )
    assert all(b["return_routed_experts"] is True for b in bodies)
    for group in out:
        for s in group:
            ids = s.prompt_ids + s.response_ids
            assert s.routes.shape == (2, len(ids) - 1, 2)
            assert torch.equal(s.routes, _routed_reference(answers[tuple(ids)], len(ids)))
            assert (s.routes >= 0).all() and (s.routes < 4).all()
            assert (s.routes[:, :, 0] != s.routes[:, :, 1]).all()  # k distinct experts


def test_routed_experts_missing_when_the_server_lacks_the_flag(tmp_path):
    """A server started without --enable-return-routed-experts answers the request without
    ``meta_info.routed_experts`` (no capturer); the engine refuses such an answer by name."""
    from megatron_gvpo.rollout.sglang import RouteLayout

    model = tmp_path / "moe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MOE_CONFIG))
    with FakeSGLangServer(model_path=str(model)) as fake:
        with SGLangEngine(SGLangConfig(urls=[fake.url], max_retries=0, **FAST),
                          routes=RouteLayout(3, (1, 2), 2)) as eng:
            with pytest.raises(SGLangError, match="--enable-return-routed-experts"):
                eng.generate([GenerateRequest([5, 6], n=1, seed=1)], SAMPLING)


def test_servers_started_for_routes_get_the_flag(tmp_path):
    """Servers the engine starts for routing_replay=rollout are launched with
    --enable-return-routed-experts (the fake, run as a process, accepts only real flags)."""
    from megatron_gvpo.rollout.sglang import RouteLayout

    model = tmp_path / "moe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MOE_CONFIG))
    cfg = SGLangConfig(model_path=str(model), launch_command=[sys.executable, FAKE],
                       log_dir=str(tmp_path / "logs"), **FAST)
    with SGLangEngine(cfg, routes=RouteLayout(3, (1, 2), 2)) as eng:
        (s,) = eng.generate([GenerateRequest([4, 5, 6], n=1, seed=2)], SAMPLING)[0]
    assert s.routes.shape == (2, len(s.prompt_ids) + len(s.response_ids) - 1, 2)


def test_unseeded_request_sends_no_sampling_seed():
    with FakeSGLangServer() as fake, attach(fake) as eng:
        out = eng.generate([GenerateRequest([1, 2], n=2)], SAMPLING)
        bodies = [e["body"] for e in fake.state.log if e["path"] == "/generate"]
    assert len(out[0]) == 2
    assert all("sampling_seed" not in b["sampling_params"] for b in bodies)


def test_finish_reasons_stop_token_stop_string_and_length():
    sp = SamplingParams(max_new_tokens=20, stop_token_ids=[7])
    reqs = [GenerateRequest([i, i + 1], n=1, seed=i) for i in range(24)]
    with FakeSGLangServer() as fake, attach(fake) as eng:
        out = [g[0] for g in eng.generate(reqs, sp)]
        strs = [g[0] for g in eng.generate(reqs[:8], SamplingParams(max_new_tokens=30,
                                                                    stop=["e"]))]
    kinds = {s.finish_reason for s in out}
    assert kinds == {"stop", "length"}
    for s in out:
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == 7 and 7 not in s.response_ids[:-1]
        else:
            assert len(s.response_ids) == 20 and 7 not in s.response_ids
    stopped = [s for s in strs if s.finish_reason == "stop"]
    assert stopped and all(s.text.endswith("e") and s.text.count("e") == 1 for s in stopped)


def test_requests_spread_over_servers():
    with FakeSGLangServer() as a, FakeSGLangServer() as b, attach(a, b) as eng:
        out = eng.generate([GenerateRequest([1, 2, 3], n=8, seed=1)], SAMPLING)
        counts = [a.state.generates, b.state.generates]
    assert len(out[0]) == 8 and sum(counts) == 8 and min(counts) >= 2


# -- faults ----------------------------------------------------------------------------------------


def test_500_then_success_is_retried_and_counted():
    with FakeSGLangServer(fail_generate=2) as fake, attach(fake) as eng:
        out = eng.generate([GenerateRequest([4, 4], n=1, seed=3)], SAMPLING)
        stats = eng.stats
    assert out[0][0].response_ids == expected([4, 4], 3, 0)[0]
    assert stats["server_errors"] == 2 and stats["retries"] == 2
    assert stats["generate_requests"] == 3


def test_retries_are_bounded():
    with FakeSGLangServer(fail_generate=100) as fake, attach(fake, max_retries=2) as eng:
        with pytest.raises(SGLangError, match="failed 3 times"):
            eng.generate([GenerateRequest([4], n=1, seed=3)], SAMPLING)
        assert fake.state.generates == 3


def test_timeout_is_retried_and_the_request_aborted():
    with FakeSGLangServer(slow_generate=1, slow_s=1.5) as fake, \
            attach(fake, request_timeout_s=0.3) as eng:
        out = eng.generate([GenerateRequest([2, 3], n=1, seed=5)], SAMPLING)
        stats = eng.stats
        log = list(fake.state.log)
    assert out[0][0].response_ids == expected([2, 3], 5, 0)[0]
    assert stats["timeouts"] == 1 and stats["retries"] == 1
    gen_rids = [e["body"]["rid"] for e in log if e["path"] == "/generate"]
    aborted = [e["body"]["rid"] for e in log if e["path"] == "/abort_request"]
    assert aborted == gen_rids[:1]


def test_connection_dropped_mid_generation_is_retried_exactly_once():
    reqs = [GenerateRequest([i], n=2, seed=i) for i in range(3)]
    with FakeSGLangServer(drop_generate=2) as fake, attach(fake) as eng:
        out = eng.generate(reqs, SAMPLING)
        stats = eng.stats
    assert stats["connection_errors"] == 2 and stats["retries"] == 2
    for req, group in zip(reqs, out, strict=True):
        assert [s.response_ids for s in group] == [expected(req.prompt_ids, req.seed, j)[0]
                                                   for j in range(2)]


def test_exited_server_is_restarted_and_every_sample_arrives_once(model_dir, tmp_path):
    marker = tmp_path / "crashed"
    cfg = SGLangConfig(
        model_path=str(model_dir), launch_command=[
            sys.executable, FAKE, "--fake-generate-delay", "0.2",
            "--fake-exit-after-generates", "3", "--fake-crash-marker", str(marker)],
        log_dir=str(tmp_path / "logs"), **FAST,
    )
    reqs = [GenerateRequest([i, 1], n=2, seed=100 + i) for i in range(6)]
    eng = SGLangEngine(cfg)
    try:
        first_pid = eng._servers[0].proc.pid
        out = eng.generate(reqs, SAMPLING)
        stats = eng.stats
        proc = eng._servers[0].proc
        assert proc.pid != first_pid and proc.poll() is None
    finally:
        eng.shutdown()
        eng.shutdown()  # twice is fine
    assert marker.exists() and stats["restarts"] == 1 and stats["connection_errors"] >= 1
    got = [s.response_ids for g in out for s in g]
    want = [expected(r.prompt_ids, r.seed, j)[0] for r in reqs for j in range(2)]
    assert got == want
    assert proc.poll() is not None  # shut down


# -- start-up errors -------------------------------------------------------------------------------


def test_unreachable_url_fails_fast_naming_it():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(SGLangError, match=f"127.0.0.1:{port}"):
        SGLangEngine(SGLangConfig(urls=[f"http://127.0.0.1:{port}"], **FAST))
    assert time.monotonic() - t0 < 5


def test_missing_model_path_fails_before_starting_anything(tmp_path):
    missing = tmp_path / "no_such_model"
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        SGLangEngine(SGLangConfig(model_path=str(missing), launch_command=["false"], **FAST))
    assert time.monotonic() - t0 < 2


def test_server_that_exits_at_start_up_reports_its_log(model_dir, tmp_path):
    cfg = SGLangConfig(model_path=str(model_dir), launch_command=[sys.executable, FAKE],
                       extra_args=["--no-such-flag"], log_dir=str(tmp_path), **FAST)
    with pytest.raises(SGLangError, match="(?s)exit.* code 2.*unrecognized arguments: --no-such"):
        SGLangEngine(cfg)


# -- weight sync -----------------------------------------------------------------------------------


def _buckets():
    g = torch.Generator().manual_seed(1)
    return [
        [("model.layers.0.w", torch.randn(4, 3, generator=g)),
         ("model.norm.weight", torch.randn(3, generator=g).bfloat16())],
        [("lm_head.weight", torch.randn(2, 3, generator=g))],
    ]


def _assert_received(received: dict, buckets) -> None:
    sent = {n: t for b in buckets for n, t in b}
    assert set(received) == set(sent)
    for n, t in sent.items():
        got = received[n]
        if isinstance(got, dict):  # from /fake/weights
            assert got["dtype"] == str(t.dtype).removeprefix("torch.")
            assert got["shape"] == list(t.shape)
            assert got["values"] == t.float().flatten().tolist()
        else:
            assert got.dtype == t.dtype and torch.equal(got, t)


def _sync_calls(generation: str, updates: list[str]) -> list[str]:
    """What one sync sends a fake of ``generation``: sessions where they exist, the live
    version from /model_info where it exists, else (0.5.4) /get_weight_version after a 404."""
    session = generation == NEW and updates[0] != "/update_weights_from_disk"
    version = ["/model_info"] if generation != OLD else ["/model_info", "/get_weight_version"]
    return (["/pause_generation"] + ["/begin_weight_update"] * session + updates
            + ["/end_weight_update"] * session + ["/flush_cache", "/continue_generation"]
            + version)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_colocated_tensor_sync_request_sequence(generation):
    with FakeSGLangServer(tp_size=2, generation=generation) as fake, \
            SGLangEngine(SGLangConfig(urls=[fake.url], **FAST),
                         serializer=client_serializer) as eng:
        buckets = _buckets()
        eng.update_weights(iter(buckets), version=3)
        assert eng.weight_version == 3
        log = list(fake.state.log)
        received, updates = dict(fake.state.weights), list(fake.state.tensor_updates)
        sample = eng.generate([GenerateRequest([1], n=1, seed=1)], SAMPLING)[0][0]
        assert not fake.state.session and fake.state.post_loads == (generation == NEW)
    assert sync_paths(log) == _sync_calls(generation, ["/update_weights_from_tensor"] * 3)
    posts = [e["body"] for e in log if e["path"] == "/update_weights_from_tensor"]
    assert all(len(b["serialized_named_tensors"]) == 2 and b["load_format"] == "flattened_bucket"
               and b["weight_version"] == "3" and b["flush_cache"] is False for b in posts)
    # both TP ranks decoded their own payload through SGLang's SafeUnpickler, to the same names
    assert updates == [[["model.layers.0.w"]] * 2, [["model.norm.weight"]] * 2,
                       [["lm_head.weight"]] * 2]
    assert all(len(set(b["serialized_named_tensors"])) == 2 for b in posts)  # one per TP rank
    _assert_received(received, buckets)
    assert sample.weight_version == 3


@pytest.mark.parametrize("generation", GENERATIONS)
def test_disk_sync_writes_hf_folder_and_needs_no_session(tmp_path, model_dir, generation):
    with FakeSGLangServer(generation=generation) as a, FakeSGLangServer(generation=generation) as b, \
            attach(a, b, weight_sync="disk", sync_dir=str(tmp_path / "sync"),
                   model_path=str(model_dir)) as eng:
        buckets = _buckets()
        eng.update_weights(buckets, version=7)
        logs = [list(a.state.log), list(b.state.log)]
        received = dict(b.state.weights)
    folder = tmp_path / "sync" / "weights"
    assert (folder / "model.safetensors.index.json").is_file()
    assert (folder / "config.json").is_file()  # side files copied from model_path
    assert not (tmp_path / "sync" / "weights.tmp").exists()
    for log in logs:
        assert sync_paths(log) == _sync_calls(generation, ["/update_weights_from_disk"])
        body = next(e["body"] for e in log if e["path"] == "/update_weights_from_disk")
        assert body == {"model_path": str(folder), "weight_version": "7", "flush_cache": False}
    _assert_received(received, buckets)


def test_new_server_refuses_weight_updates_outside_a_session():
    with FakeSGLangServer() as fake:
        body = {"serialized_named_tensors": ["eA=="], "load_format": "flattened_bucket"}
        r = requests.post(fake.url + "/update_weights_from_tensor", json=body, timeout=5)
        assert r.status_code == 400 and "begin_weight_update" in r.text
        r = requests.post(fake.url + "/update_weights_from_distributed",
                          json={"names": ["w"], "dtypes": ["float32"], "shapes": [[1]]}, timeout=5)
        assert r.status_code == 400 and "begin_weight_update" in r.text
        assert requests.post(fake.url + "/end_weight_update", json={}, timeout=5).status_code == 400
        assert requests.post(fake.url + "/begin_weight_update", json={}, timeout=5).ok
        assert requests.post(fake.url + "/begin_weight_update", json={},
                             timeout=5).status_code == 400  # already open
        assert requests.post(fake.url + "/end_weight_update", json={}, timeout=5).ok


class _RunsCode:
    """Pickles to a call of ``os.system``: what SGLang's SafeUnpickler exists to refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _open_session(fake) -> None:
    assert requests.post(fake.url + "/begin_weight_update", json={}, timeout=5).ok


@contextlib.contextmanager
def _torch_storage_reduce():
    """A storage pickles as torch alone writes it (``torch.storage._load_from_bytes``).
    megatron-core 0.17+ replaces that function at import (``megatron/core/__init__.py``:
    ``torch.storage._load_from_bytes = safe_load_from_bytes``), so in this process a plain
    pickle would name ``megatron.core.safe_globals.safe_load_from_bytes`` instead."""

    def _load_from_bytes(b: bytes) -> object:  # stands at torch's name while pickling only
        raise AssertionError("never called")

    _load_from_bytes.__module__ = "torch.storage"
    _load_from_bytes.__qualname__ = "_load_from_bytes"
    saved = torch.storage._load_from_bytes
    torch.storage._load_from_bytes = _load_from_bytes
    try:
        yield
    finally:
        torch.storage._load_from_bytes = saved


def test_tensor_payloads_decode_through_sglangs_base64_and_allow_list():
    import base64
    import pickle

    flat, metas = flatten_bucket([("w", torch.arange(6.0).view(2, 3))])[0]
    with FakeSGLangServer() as fake:
        _open_session(fake)
        url = fake.url + "/update_weights_from_tensor"
        # not base64: refused by the HTTP layer's validation, before the scheduler sees it
        r = requests.post(url, json={"serialized_named_tensors": ["not base64!"],
                                     "load_format": "flattened_bucket"}, timeout=5)
        assert r.status_code == 400 and r.json()["object"] == "error"
        assert "Expected base64-encoded bytes" in r.json()["message"]
        # the client's payload: ForkingPickler + base64, FlattenedTensorMetadata records
        [payload] = client_serializer(flat, metas, 1)
        raw = base64.b64decode(payload)
        assert raw[:1] == b"\x80"  # a pickle, as MultiprocessingSerializer writes it
        r = requests.post(url, json={"serialized_named_tensors": [payload],
                                     "load_format": "flattened_bucket"}, timeout=5)
        assert r.ok, r.text
        assert fake.state.weights["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        # the client's payload never names megatron-core's replacement of torch's
        # _load_from_bytes, which SGLang's allow-list refuses (CPU storages travel by fd)
        assert b"safe_load_from_bytes" not in raw
        # a plain pickle's storages go through torch.load(weights_only=True) (_load_from_bytes)
        with sglang_standin(), _torch_storage_reduce():
            from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

            meta = [FlattenedTensorMetadata("v", torch.Size([3]), torch.float32, 0, 3, 3)]
            plain = pickle.dumps({"flattened_tensor": torch.ones(3), "metadata": meta})
        assert b"torch.storage" in plain and b"_load_from_bytes" in plain
        r = requests.post(url, json={"serialized_named_tensors": [
            base64.b64encode(plain).decode()], "load_format": "flattened_bucket"}, timeout=5)
        assert r.ok, r.text
        assert fake.state.weights["v"].tolist() == [1.0, 1.0, 1.0]
        assert not fake.state.crashed


def test_a_payload_sglang_refuses_kills_the_fake_as_it_kills_sglangs_scheduler(tmp_path):
    import base64
    import pickle

    marker = tmp_path / "ran"
    hostile = base64.b64encode(pickle.dumps(_RunsCode(marker))).decode()
    with FakeSGLangServer() as fake:
        _open_session(fake)
        with pytest.raises(requests.ConnectionError):  # no answer: the scheduler died
            requests.post(fake.url + "/update_weights_from_tensor",
                          json={"serialized_named_tensors": [hostile],
                                "load_format": "flattened_bucket"}, timeout=5)
        assert fake.state.crashed == (
            "Scheduler hit an exception: RuntimeError: Blocked unsafe global (posix.system) "
            "during pickle deserialization")
        deadline = time.monotonic() + 5
        while True:  # and the server is gone
            try:
                requests.get(fake.url + "/health", timeout=1)
            except requests.ConnectionError:
                break
            assert time.monotonic() < deadline, "the crashed fake still answers"
            time.sleep(0.05)
    assert not marker.exists()


def test_a_sync_whose_payload_sglang_would_refuse_fails_by_name():
    """A serializer mistake (a numpy array: ``numpy`` globals are not on SGLang's allow-list)
    kills the server; the sync fails with an error naming the request, it does not hang."""
    import base64
    import io
    from multiprocessing.reduction import ForkingPickler

    def numpy_payload(flat, metas, tp_size):
        buf = io.BytesIO()
        ForkingPickler(buf).dump({"flattened_tensor": flat.numpy(), "metadata": []})
        return [base64.b64encode(buf.getvalue()).decode()] * tp_size

    with FakeSGLangServer() as fake, \
            SGLangEngine(SGLangConfig(urls=[fake.url], **FAST), serializer=numpy_payload) as eng:
        with pytest.raises(SGLangError, match="update_weights_from_tensor"):
            eng.update_weights(_buckets(), version=1)
        assert "Blocked unsafe global (numpy" in fake.state.crashed
        assert eng.weight_version == -1


@pytest.mark.parametrize("generation", GENERATIONS)
def test_routes_a_generation_lacks_answer_404_and_the_client_detects_the_rest(generation):
    from megatron_gvpo.rollout.sglang.client import Endpoint, HTTPClient

    with FakeSGLangServer(generation=generation) as fake:
        status = {p: requests.get(fake.url + p, timeout=5).status_code
                  for p in ("/model_info", "/get_weight_version", "/server_info",
                            "/get_server_info")}
        begin = requests.post(fake.url + "/begin_weight_update", json={}, timeout=5).status_code
        requests.post(fake.url + "/end_weight_update", json={}, timeout=5)
        client = HTTPClient(SGLangConfig(urls=[fake.url], **FAST), workers=2)
        s = Endpoint(0, fake.url)
        client.learn(s, default_tp=1)
        probe = Endpoint(1, fake.url)  # version unknown: the session route's 404 decides
        opened = client.begin_session(probe)
        if opened:
            client.end_session(probe)
        version = client.weight_version(s)
    want = {NEW: {"/model_info": 200, "/get_weight_version": 404, "/server_info": 200,
                  "/get_server_info": 200},
            MID: {"/model_info": 200, "/get_weight_version": 404, "/server_info": 200,
                  "/get_server_info": 200},
            OLD: {"/model_info": 404, "/get_weight_version": 200, "/server_info": 404,
                  "/get_server_info": 200}}[generation]
    assert status == want and (begin == 200) == (generation == NEW)
    assert s.version == generation and s.sessions == (generation == NEW)
    assert opened == (generation == NEW) and probe.sessions == (generation == NEW)
    assert version == "default"
    assert s.version_route == ("/get_weight_version" if generation == OLD else "/model_info")


@pytest.mark.parametrize("generation", GENERATIONS)
def test_stale_weight_version_raises(generation):
    with FakeSGLangServer(stale_version=True, generation=generation) as fake, \
            SGLangEngine(SGLangConfig(urls=[fake.url], **FAST),
                         serializer=client_serializer) as eng:
        with pytest.raises(SGLangError, match="reports weight version 'stale'.*version 4"):
            eng.update_weights(_buckets(), version=4)
        assert eng.weight_version == -1
        assert fake.state.paused is False  # generation continued despite the failure
        assert fake.state.session is False


def test_failed_update_closes_the_session_and_continues():
    def broken(flat, metas, tp):
        raise RuntimeError("serializer broke")

    with FakeSGLangServer() as fake, \
            SGLangEngine(SGLangConfig(urls=[fake.url], **FAST), serializer=broken) as eng:
        with pytest.raises(RuntimeError, match="serializer broke"):
            eng.update_weights(_buckets(), version=1)
        assert not fake.state.paused and not fake.state.session and eng.weight_version == -1
        assert sync_paths(fake) == ["/pause_generation", "/begin_weight_update",
                                    "/end_weight_update", "/continue_generation"]


def test_begin_finish_update_control_flow_and_stale_version():
    with FakeSGLangServer() as fake, attach(fake, weight_sync="distributed") as eng:
        eng.begin_update(2)
        assert fake.state.paused and fake.state.session
        eng.abort_update()
        assert not fake.state.paused and not fake.state.session and eng.weight_version == -1
        eng.begin_update(2)
        fake.state.faults["stale_version"] = True
        with pytest.raises(SGLangError, match="reports weight version"):
            eng.finish_update(2)
        assert not fake.state.paused and eng.weight_version == -1
        assert sync_paths(fake) == [
            "/pause_generation", "/begin_weight_update", "/end_weight_update",
            "/continue_generation", "/pause_generation", "/begin_weight_update",
            "/end_weight_update", "/flush_cache", "/continue_generation", "/model_info"]


def test_a_begin_refused_partway_leaves_no_server_paused_or_in_a_session():
    with FakeSGLangServer() as a, FakeSGLangServer(refuse_begin=1) as b, \
            attach(a, b, weight_sync="distributed") as eng:
        with pytest.raises(SGLangError, match="weight update refused"):
            eng.update_weights(_buckets(), version=1)
        for fake in (a, b):
            assert not fake.state.paused and not fake.state.session
        assert sync_paths(a) == ["/pause_generation", "/begin_weight_update",
                                 "/end_weight_update", "/continue_generation"]
        assert eng.health() and eng.weight_version == -1


def test_attaching_to_servers_left_paused_in_a_session_resumes_and_reclaims_them():
    with FakeSGLangServer() as fake:
        fake.state.paused = fake.state.session = True  # a trainer died inside its sync
        with SGLangEngine(SGLangConfig(urls=[fake.url], **{**FAST, "startup_timeout_s": 5.0}),
                          serializer=client_serializer) as eng:
            assert eng.health()
            eng.update_weights(_buckets(), version=2)
            assert eng.weight_version == 2 and not fake.state.session
        assert sync_paths(fake)[:5] == ["/continue_generation", "/pause_generation",
                                        "/begin_weight_update", "/end_weight_update",
                                        "/begin_weight_update"]


# -- pause, flush, health, memory ----------------------------------------------------------------


def test_paused_server_fails_health_checks_with_503():
    with FakeSGLangServer() as fake, attach(fake) as eng:
        assert eng.health()
        eng.pause_generation()
        assert requests.get(fake.url + "/health_generate", timeout=5).status_code == 503
        assert not eng.health()
        eng.continue_generation()
        assert eng.health()


def test_flush_is_refused_while_requests_run():
    import threading

    with FakeSGLangServer(decode_s_per_token=0.02) as fake, attach(fake) as eng:
        done = []
        t = threading.Thread(target=lambda: done.append(eng.generate(
            [GenerateRequest([1], n=2, seed=1)], SamplingParams(max_new_tokens=40))))
        t.start()
        while fake.state.inflight == 0:
            time.sleep(0.01)
        with pytest.raises(SGLangError, match="400"):
            eng.flush_cache()
        t.join()
        eng.flush_cache()  # idle now
    assert len(done[0][0]) == 2


def test_pause_truncates_in_flight_responses_which_are_drawn_again_never_returned():
    import threading

    sp = SamplingParams(max_new_tokens=30)
    reqs = [GenerateRequest([i], n=2, seed=i) for i in range(3)]
    with FakeSGLangServer(decode_s_per_token=0.01) as fake, attach(fake) as eng:
        out = []
        t = threading.Thread(target=lambda: out.append(eng.generate(reqs, sp)))
        t.start()
        while fake.state.inflight < 6:
            time.sleep(0.005)
        eng.pause_generation()  # aborts all six mid-decode
        time.sleep(0.2)
        eng.continue_generation()
        t.join()
        stats = eng.stats
        finishes = [e for e in fake.state.log if e["path"] == "/generate"]
    assert stats["aborted_samples"] == 6 and len(finishes) == 12
    for req, group in zip(reqs, out[0], strict=True):
        for j, s in enumerate(group):
            assert s.finish_reason != "abort"
            assert s.response_ids == expected(req.prompt_ids, req.seed, j, sp)[0]


@pytest.mark.parametrize("saver", [True, False])
def test_release_frees_memory_only_with_the_memory_saver(saver):
    with FakeSGLangServer(memory_saver=saver) as fake, attach(fake) as eng:
        eng.release_memory()
        assert fake.state.offload_tags == {"weights", "kv_cache"}
        assert fake.state.freed == ({"weights", "kv_cache"} if saver else set())
        eng.resume_memory(["kv_cache"])
        assert fake.state.offload_tags == {"weights"}
        with pytest.raises(SGLangError, match="400"):
            eng.resume_memory(["kv_cache"])  # not released: the server's KeyError
        bodies = [(e["path"], e["body"]) for e in fake.state.log if "memory" in e["path"]]
    assert bodies[:2] == [("/release_memory_occupation", {"tags": ["weights", "kv_cache"]}),
                          ("/resume_memory_occupation", {"tags": ["kv_cache"]})]


# -- launched servers: flags and environment ------------------------------------------------------


def test_launched_servers_get_the_memory_saver_in_tensor_mode_and_a_clean_env(
        model_dir, tmp_path, monkeypatch):
    from megatron_gvpo.rollout.sglang.client import Endpoint
    from megatron_gvpo.rollout.sglang.server import clean_env, launch_command

    s = Endpoint(0, "http://x", port=1)
    for mode, saver in (("tensor", True), ("distributed", False)):
        cfg = SGLangConfig(model_path=str(model_dir), weight_sync=mode)
        assert ("--enable-memory-saver" in launch_command(cfg, str(model_dir), s)) == saver
    env = clean_env({"TORCHELASTIC_USE_AGENT_STORE": "True", "RANK": "3", "MASTER_PORT": "1",
                     "CUDA_VISIBLE_DEVICES": "0,1", "PATH": "/bin"})
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1", "PATH": "/bin"}
    # the fake refuses to start with torchrun's variables, as SGLang's start-up breaks on them
    for k, v in {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "x",
                 "RANK": "1", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(k, v)
    cfg = SGLangConfig(model_path=str(model_dir), launch_command=[sys.executable, FAKE],
                       log_dir=str(tmp_path), **FAST)
    with SGLangEngine(cfg) as eng:
        info = get(eng.urls[0], "/server_info")
    assert info["enable_memory_saver"] is True


# -- router ---------------------------------------------------------------------------------------


def test_router_mode_generates_via_router_and_syncs_workers(tmp_path):
    with FakeSGLangServer() as worker, FakeRouter([worker.url]) as router, SGLangEngine(
            SGLangConfig(router_url=router.url, urls=[worker.url], weight_sync="disk",
                         sync_dir=str(tmp_path), **FAST)) as eng:
        eng.generate([GenerateRequest([3], n=2, seed=0)], SAMPLING)
        eng.update_weights(_buckets(), version=1)
        assert eng.health()
        router_paths, worker_paths = list(router.log), worker.state.paths()
    assert router_paths.count("/generate") == 2 == worker_paths.count("/generate")  # via router
    assert "/update_weights_from_disk" not in router_paths
    assert "/update_weights_from_disk" in worker_paths
    assert "/workers" in router_paths  # the engine asked it which workers it routes to


def test_router_worker_key_matches_urls_as_the_router_lists_them():
    from megatron_gvpo.rollout.sglang.engine import router_worker_key

    assert router_worker_key("10.0.0.5:30000") == "http://10.0.0.5:30000"
    assert router_worker_key("http://10.0.0.5:30000/") == "http://10.0.0.5:30000"
    assert router_worker_key("http://10.0.0.5:30000@3") == "http://10.0.0.5:30000"
    assert router_worker_key("http://u:p@h:1") == "http://u:p@h:1"  # not a DP rank


def test_after_a_sync_the_engine_waits_until_the_router_counts_every_worker_healthy(tmp_path):
    """Two workers stay paused through a sync longer than three of the router's health checks,
    so sglang-router's health rules mark both unhealthy. Afterwards worker b keeps failing its
    checks a while longer: a's recovery already makes the router's /health_generate answer 200,
    but the next rollout would see half the workers. The engine waits on GET /workers until the
    router counts both healthy; a worker that never recovers ends the wait by name."""
    (tmp_path / "config.json").write_text("{}")
    with FakeSGLangServer(health_wait_s=0.02) as a, FakeSGLangServer(health_wait_s=0.02) as b, \
            FakeRouter([a.url, b.url], health_check_interval_secs=0.05,
                       health_check_timeout_secs=1.0) as router, \
            SGLangEngine(SGLangConfig(router_url=router.url, urls=[a.url, b.url],
                                      weight_sync="disk", sync_dir=str(tmp_path / "sync"),
                                      model_path=str(tmp_path), **FAST)) as eng:
        a.state.faults["update_delay_s"] = b.state.faults["update_delay_s"] = 0.6
        b.state.faults["failing_health_checks"] = 15  # after the sync too
        eng.update_weights(_buckets(), version=1)
        assert all(w.healthy for w in router.workers)  # both routed to again
        assert router.marked_unhealthy == {a.url: 1, b.url: 1}  # the sync did trip its checks
        assert b.state.faults["failing_health_checks"] == 0
        samples = eng.generate([GenerateRequest([1], n=4, seed=1)], SAMPLING)[0]
        assert {s.weight_version for s in samples} == {1}
        assert a.state.paths().count("/generate") == 2 == b.state.paths().count("/generate")
        b.state.faults["failing_health_checks"] = 10**6  # b never recovers
        eng.cfg.router_recovery_timeout_s = 1.0
        with pytest.raises(SGLangError, match=rf"\['{b.url}'\].*router_recovery_timeout_s=1"):
            eng.update_weights(_buckets(), version=2)


def test_timeouts_behind_a_router_abort_on_the_workers():
    # sglang-router has no /abort_request: the abort goes to the workers (unknown rids: no-op)
    with FakeSGLangServer(slow_generate=1, slow_s=1.5) as a, FakeSGLangServer() as b, \
            FakeRouter([a.url, b.url]) as router, SGLangEngine(SGLangConfig(
                router_url=router.url, urls=[a.url, b.url], request_timeout_s=0.3,
                **{k: v for k, v in FAST.items() if k != "request_timeout_s"})) as eng:
        eng.generate([GenerateRequest([2], n=1, seed=5)], SAMPLING)
        rid = next(e["body"]["rid"] for e in a.state.log if e["path"] == "/generate")
        assert "/abort_request" not in router.log
        for w in (a, b):
            assert [e["body"] for e in w.state.log if e["path"] == "/abort_request"] == [
                {"rid": rid}]


# -- streaming -----------------------------------------------------------------------------------


def test_stream_yields_in_completion_order_and_generate_round_calls_back():
    from megatron_gvpo.rollout.round import generate_round

    # log-normal lengths, decode time per token: short responses finish first
    sp = SamplingParams(max_new_tokens=60)
    reqs = [GenerateRequest([i], n=2, seed=i) for i in range(6)]
    with FakeSGLangServer(decode_s_per_token=0.01, length_tail=(2.5, 1.0)) as fake, \
            attach(fake) as eng:
        stream = list(eng.generate_stream(reqs, sp))
        seen = []
        groups = generate_round(eng, reqs, sp, on_sample=lambda i, j, s: seen.append((i, j)),
                                progress=False)
    lengths = [len(s.response_ids) for _, _, s in stream]
    median = sorted(lengths)[len(lengths) // 2]
    assert sorted((i, j) for i, j, _ in stream) == [(i, j) for i in range(6) for j in range(2)]
    assert lengths[0] <= median <= lengths[-1]  # completion order, not request order
    assert sorted(seen) == sorted((i, j) for i, j, _ in stream)
    by_slot = {(i, j): s.response_ids for i, j, s in stream}  # seeded: the same responses
    assert [[s.response_ids for s in g] for g in groups] == [
        [by_slot[(i, j)] for j in range(2)] for i in range(6)]


def test_default_stream_of_an_engine_without_one_follows_generate():
    from megatron_gvpo.rollout.base import RolloutEngine, Sample

    class Plain(RolloutEngine):
        def generate(self, requests, sampling):
            return [[Sample(r.prompt_ids, [j], "", [0.0], "stop") for j in range(r.n)]
                    for r in requests]

        def update_weights(self, buckets, version):
            pass

        weight_version = -1

        def health(self):
            return True

        def shutdown(self):
            pass

    out = list(Plain().generate_stream([GenerateRequest([1], n=2), GenerateRequest([2], n=1)],
                                       SAMPLING))
    assert [(i, j, s.response_ids) for i, j, s in out] == [(0, 0, [0]), (0, 1, [1]), (1, 0, [0])]


# -- distributed sync -----------------------------------------------------------------------------


def test_distributed_sync_broadcasts_real_tensors_over_gloo(model_dir, tmp_path):
    cfg = SGLangConfig(model_path=str(model_dir), num_servers=2, weight_sync="distributed",
                       dist_backend="gloo", launch_command=[sys.executable, FAKE],
                       log_dir=str(tmp_path), **FAST)
    with SGLangEngine(cfg) as eng:
        first, second = _buckets(), [[("model.norm.weight", torch.ones(3).bfloat16())]]
        eng.update_weights(first, version=1)
        eng.update_weights(second, version=2)
        logs = [get(u, "/fake/log")["log"] for u in eng.urls]
        weights = [get(u, "/fake/weights") for u in eng.urls]
    inits = [next(e["body"] for e in log if e["path"] == "/init_weights_update_group")
             for log in logs]
    assert sorted(i["rank_offset"] for i in inits) == [1, 2]
    assert {i["world_size"] for i in inits} == {3} and {i["backend"] for i in inits} == {"gloo"}
    name = inits[0]["group_name"]
    assert name.startswith(cfg.group_name + "_") and {i["group_name"] for i in inits} == {name}
    for log, w in zip(logs, weights, strict=True):
        paths = sync_paths(log)
        assert paths == (
            _sync_calls(NEW, ["/init_weights_update_group"]
                        + ["/update_weights_from_distributed"] * 2)
            + _sync_calls(NEW, ["/update_weights_from_distributed"]))
        ups = [e["body"] for e in log if e["path"] == "/update_weights_from_distributed"]
        assert ups[0]["names"] == ["model.layers.0.w", "model.norm.weight"]
        assert ups[0]["dtypes"] == ["float32", "bfloat16"] and ups[0]["shapes"] == [[4, 3], [3]]
        assert ups[2]["weight_version"] == "2"
        _assert_received(w, [first[0][:1], first[1], second[0]])


def _start_fakes(n: int, tmp_path: Path, model_dir: Path, *flags: str) -> list:
    """Fake servers as processes (as SGLang servers are: torch names groups per process)."""
    import socket
    import subprocess

    procs, urls = [], []
    for k in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(tmp_path / f"fake_{k}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(
            [sys.executable, FAKE, "--model-path", str(model_dir), "--port", str(port),
             *flags], stdout=log, stderr=subprocess.STDOUT))
        urls.append(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    for u in urls:
        while True:
            try:
                if requests.get(u + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "fake servers did not start"
            time.sleep(0.05)
    return procs, urls


def test_attached_servers_get_unique_group_names_destroyed_on_close(model_dir, tmp_path):
    procs, urls = _start_fakes(1, tmp_path, model_dir)
    try:
        cfg = SGLangConfig(urls=urls, weight_sync="distributed", dist_backend="gloo", **FAST)
        names = []
        for _ in range(2):  # a restarted trainer attaches to the same running server
            with SGLangEngine(cfg) as eng:
                eng.update_weights(_buckets(), version=1)
                log = get(urls[0], "/fake/log")["log"]
                names.append([e["body"]["group_name"] for e in log
                              if e["path"] == "/init_weights_update_group"][-1])
                dup = requests.post(urls[0] + "/init_weights_update_group", json={
                    "master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                    "world_size": 2, "group_name": names[-1], "backend": "gloo"}, timeout=5)
                assert dup.status_code == 400 and "already been created" in dup.text
        log = get(urls[0], "/fake/log")["log"]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert names[0] != names[1]
    destroyed = [e["body"]["group_name"] for e in log
                 if e["path"] == "/destroy_weights_update_group"]
    assert destroyed == names
