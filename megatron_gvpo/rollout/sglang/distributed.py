"""Disaggregated weight sync: names over HTTP, tensors broadcast over an update group.

Per bucket every server gets ``POST /update_weights_from_distributed`` {names, dtypes, shapes,
group_name, ...} and then receives the tensors in that order from rank 0 (0.5.23
``model_executor/model_runner_components/weight_updater.py`` ``receive_weights_from_distributed``).
From 0.5.22 the POST is refused (400) outside a weight-update session; a refused server never
joins the broadcast, so the trainer would wait in the collective: the engine opens the session
first, and a failed broadcast reports the refusal rather than the time-out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future

from megatron_gvpo.rollout.base import NamedTensors
from megatron_gvpo.rollout.sglang.client import Endpoint, HTTPClient
from megatron_gvpo.rollout.sglang.group import UpdateGroup


def distributed_payload(bucket: NamedTensors, group_name: str, version: int) -> dict:
    """The ``/update_weights_from_distributed`` body for one bucket."""
    return {
        "names": [n for n, _ in bucket],
        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
        "group_name": group_name,
        "flush_cache": False,
        "weight_version": str(version),
    }


def broadcast_buckets(group: UpdateGroup, buckets: Iterable[NamedTensors], version: int,
                      submit: Callable[[dict], list[Future]]) -> int:
    """Per non-empty bucket: ``submit`` the update POSTs, broadcast its tensors, wait for the
    answers (so every server sees the buckets in one order); returns the tensor count."""
    count = 0
    for bucket in buckets:
        if not bucket:
            continue
        count += len(bucket)
        futures = submit(distributed_payload(bucket, group.name, version))
        try:
            for _, t in bucket:
                group.broadcast(t)
        except Exception as e:
            for f in futures:  # a server that refused the request explains the hang best
                if f.done() and f.exception() is not None:
                    raise f.exception() from e
            raise
        for f in futures:
            f.result()
    return count


def post_updates(client: HTTPClient, servers: Sequence[Endpoint]) -> Callable[[dict], list]:
    """``submit`` for :func:`broadcast_buckets`: one update POST per server, concurrently."""
    return lambda payload: [
        client.pool.submit(client.call, s, "POST", "/update_weights_from_distributed", payload,
                           timeout=client.cfg.sync_timeout_s, retry=False)
        for s in servers
    ]


def sync_distributed(client: HTTPClient, servers: Sequence[Endpoint], group: UpdateGroup,
                     buckets: Iterable[NamedTensors], version: int) -> int:
    """Rank 0 feeds every bucket to every server over ``group``; returns the tensor count."""
    return broadcast_buckets(group, buckets, version, post_updates(client, servers))
