"""PP2 x 2 servers, distributed weight sync: stage senders on two processes feed two servers.

The servers are protocol fakes (tests/sglang_fake_server.py) run as processes; like SGLang they
run control and weight calls one at a time in arrival order. Network latency is made
deterministic with ``--fake-arrival-after``: server A queues stage 1's first call only after
stage 0's has queued (or 3 s passed), server B the other way round. Posting concurrently per stage (the old order) then deadlocks in the groups'
rendezvous until the collective time-out; stages taking turns (``StageTurns``) pass.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_gvpo.rollout.sglang import SGLangConfig, SGLangEngine, StageWeightSender

sys.path.insert(0, str(Path(__file__).parent))
from test_rollout_sglang_protocol import FAST, _assert_received, _start_fakes, get  # noqa: E402

COLLECTIVE_S = 6.0  # the fakes' rendezvous / broadcast time-out: bounds the negative control


def _stage_buckets(stage: int) -> list:
    g = torch.Generator().manual_seed(100 + stage)
    return [
        [(f"model.layers.{stage}.a", torch.randn(3, 2, generator=g)),
         (f"model.layers.{stage}.b", torch.randn(4, generator=g).bfloat16())],
        [(f"model.layers.{stage}.c", torch.randn(2, 2, generator=g))],
    ]


def _stage_main(spec, stage: int, version: int, ordered: bool, store_port: int, out) -> None:
    """One trainer stage's source rank: its own sender and buckets, turns through the store."""
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False)
    sender = StageWeightSender(spec, stage, ordered=ordered, store=store)
    store.add("ready", 1)  # start together: the arrival rules, not the imports, set the order
    while store.add("ready", 0) < 2:
        time.sleep(0.01)
    try:
        out.put((stage, sender.send(iter(_stage_buckets(stage)), version)))
    except Exception as e:  # reported to the test
        out.put((stage, repr(e)))
    finally:
        sender.close()


def _run_stages(urls: list[str], ordered: bool) -> tuple[dict, float, list]:
    ctx = mp.get_context("spawn")
    # the negative control's senders give up shortly after the fakes' collective time-out;
    # with turns, stage 1 waits for stage 0 (spawned processes import torch first: slow here)
    sync_s = 60.0 if ordered else COLLECTIVE_S + 4
    cfg = SGLangConfig(urls=urls, weight_sync="distributed", dist_backend="gloo",
                       **{**FAST, "sync_timeout_s": sync_s, "control_timeout_s": 30})
    eng = SGLangEngine(cfg)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = ctx.Queue()
    try:
        spec = eng.stage_sync_target()
        eng.begin_update(5)
        t0 = time.monotonic()
        procs = [ctx.Process(target=_stage_main, args=(spec, k, 5, ordered, store.port, out))
                 for k in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=90)  # never hang the suite
        elapsed = time.monotonic() - t0
        for p in procs:
            if p.is_alive():
                p.kill()
        results = dict(out.get(timeout=5) for _ in range(2))
        if ordered:
            assert results == {0: 3, 1: 3}, results
            eng.finish_update(5)
        logs = [get(u, "/fake/log")["log"] for u in urls]
    finally:
        eng.shutdown()
    return results, elapsed, logs


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def _servers(tmp_path, model_dir):
    """Server A takes stage 0's calls first, server B stage 1's (each waits at most 3 s for the
    other stage, so stages taking turns get through)."""
    flags = ["--fake-collective-timeout", str(COLLECTIVE_S)]
    a, ua = _start_fakes(1, tmp_path, model_dir, *flags, "--fake-arrival-after", "_pp1:_pp0:3")
    b, ub = _start_fakes(1, tmp_path, model_dir, *flags, "--fake-arrival-after", "_pp0:_pp1:3")
    return a + b, ua + ub


def _stop(procs) -> None:
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.one_leg
def test_concurrent_stage_posting_deadlocks_two_servers(tmp_path, model_dir):
    """Negative control: the old order (every stage at once) hangs until the time-out."""
    procs, urls = _servers(tmp_path, model_dir)
    try:
        results, elapsed, logs = _run_stages(urls, ordered=False)
    finally:
        _stop(procs)
    # The sync fails: at least one stage, after waiting out the collective time-out. (Once one
    # server's first rendezvous times out it moves on to the other stage's, which may still meet
    # the other server's pending one: which stage then gets through depends on timing.)
    assert any(isinstance(r, str) for r in results.values()), results
    assert elapsed >= COLLECTIVE_S
    firsts = [next(e["body"]["group_name"] for e in log
                   if e["path"] == "/init_weights_update_group") for log in logs]
    assert firsts[0].endswith("_pp0") and firsts[1].endswith("_pp1")  # opposite orders


def test_stages_taking_turns_sync_both_servers(tmp_path, model_dir):
    procs, urls = _servers(tmp_path, model_dir)
    try:
        results, elapsed, logs = _run_stages(urls, ordered=True)
        weights = [get(u, "/fake/weights") for u in urls]
    finally:
        _stop(procs)
    assert results == {0: 3, 1: 3}
    sent = _stage_buckets(0) + _stage_buckets(1)
    for log, w in zip(logs, weights, strict=True):
        calls = [e for e in log if e["path"] in (
            "/init_weights_update_group", "/update_weights_from_distributed")]
        stages = [e["body"]["group_name"][-3:] for e in calls]
        assert stages == ["pp0"] * 3 + ["pp1"] * 3  # one order on every server
        paths = [e["path"] for e in log if e["path"] not in ("/health", "/health_generate",
                                                             "/server_info",
                                                             "/fake/log")]
        assert paths[:2] == ["/pause_generation", "/begin_weight_update"]
        assert paths[-4:] == ["/end_weight_update", "/flush_cache", "/continue_generation",
                              "/model_info"]
        _assert_received(w, sent)
