"""The metrics contract (trainer/metrics.py): tagged values reduce over micro-batches, pipeline
stages and DP ranks by their rule, against sums written out by hand; nothing is dropped."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron_gvpo.parallel.launch import free_port
from megatron_gvpo.trainer.metrics import Metric, combine_updates, reduce_metrics


def _rank_results(rank: int) -> list[dict[str, Metric]]:
    """Two micro-batches per rank with every rule; rank 1 also reports a key rank 0 lacks."""
    out = []
    for mb in range(2):
        x = 10 * rank + mb
        r = {
            "loss": Metric(torch.tensor(float(x)), "sum"),
            "ratio_mean": Metric(float(x), "mean", weight=float(x + 1)),
            "ratio_max": Metric(float(x), "max"),
            "ratio_min": Metric(float(-x), "min"),
            "groups_counted": Metric(7.0, "same"),
        }
        if rank == 1:
            r["only_on_rank1"] = Metric(1.0, "sum")
        out.append(r)
    return out


def _expected(ranks: list[int]) -> dict[str, float]:
    xs = [10 * r + mb for r in ranks for mb in range(2)]
    out = {
        "loss": float(sum(xs)),
        "ratio_mean": sum(x * (x + 1) for x in xs) / sum(x + 1 for x in xs),
        "ratio_max": float(max(xs)),
        "ratio_min": float(-max(xs)),
        "groups_counted": 7.0,
    }
    if 1 in ranks:
        out["only_on_rank1"] = 2.0
    return out


def test_single_process_reduction_follows_each_rule():
    got = {k: float(m.value) for k, m in reduce_metrics(_rank_results(0)).items()}
    assert got == pytest.approx(_expected([0]))


def test_mixed_rules_for_one_key_are_refused():
    with pytest.raises(ValueError, match="loss"):
        reduce_metrics([{"loss": Metric(1.0, "sum")}, {"loss": Metric(1.0, "max")}])


def test_combine_updates_takes_extremes_for_max_min_and_means_otherwise():
    a = {"loss": Metric(1.0), "ratio_max": Metric(3.0, "max"), "ratio_min": Metric(-1.0, "min")}
    b = {"loss": Metric(3.0), "ratio_max": Metric(2.0, "max"), "ratio_min": Metric(-4.0, "min")}
    assert combine_updates([a, b]) == {"loss": 2.0, "ratio_max": 3.0, "ratio_min": -4.0}


def _worker(rank: int, world: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, initialize

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    initialize(ParallelConfig(tp=1, pp=1))
    got = reduce_metrics(_rank_results(rank))
    q.put((rank, {k: float(m.value) for k, m in got.items()}))
    destroy()


@pytest.mark.slow
def test_two_dp_ranks_agree_with_the_reduction_written_out():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    want = _expected([0, 1])
    for rank in (0, 1):
        assert results[rank] == pytest.approx(want), rank
