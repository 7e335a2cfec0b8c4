"""Pipeline-parallel distributed sync: each PP stage's source rank feeds the servers itself.

Why stages take turns: an SGLang server runs control and weight calls one at a time, in
arrival order (0.5.23 ``managers/communicator.py`` ``FanOutCommunicator.queueing_call``: a FIFO
``asyncio.Lock``; the scheduler is one thread that blocks inside a broadcast; while paused,
``managers/tokenizer_control_mixin.py`` holds ``is_pause_cond`` across the update). Two stage
senders that POST to two servers concurrently can reach them in different orders: server A
blocks in stage 0's rendezvous or broadcast waiting for server B, which blocks in stage 1's
waiting for A -- a hang. :class:`StageTurns` gives every server one order: stage k starts only
after stage k-1 has finished with every server (a key per stage in a shared torch store).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from megatron_gvpo.rollout.base import NamedTensors
from megatron_gvpo.rollout.sglang.client import Endpoint, HTTPClient, SGLangError
from megatron_gvpo.rollout.sglang.config import SGLangConfig
from megatron_gvpo.rollout.sglang.distributed import broadcast_buckets, post_updates
from megatron_gvpo.rollout.sglang.group import UpdateGroup

log = logging.getLogger(__name__)

TURN_PREFIX = "megatron_gvpo/sglang_stage_turns"


@dataclass(frozen=True)
class StageSyncSpec:
    """What a pipeline stage's source rank needs to feed the servers itself (picklable).

    Built by ``SGLangEngine.stage_sync_target`` on rank 0 and broadcast to the other ranks.
    ``group_name`` changes when a server was restarted, so stage groups are then rebuilt.
    """

    urls: tuple[str, ...]
    tp_sizes: tuple[int, ...]
    master_address: str
    master_port: int  # 0: a free port per stage; else stage k uses master_port + 1 + k
    backend: str
    group_name: str
    connect_timeout_s: float
    sync_timeout_s: float

    @property
    def world_size(self) -> int:
        return 1 + sum(self.tp_sizes)

    def connect(self, stage: int, driver_host: str) -> StageWeightSender:
        """The sender of ``stage`` on this rank. The servers reach its store at the driver's
        address on the driver's node, else this host's address (or ``GVPO_SYNC_ADDRESS``)."""
        address = os.environ.get("GVPO_SYNC_ADDRESS") or (
            self.master_address
            if socket.gethostname() == driver_host
            else socket.gethostbyname(socket.gethostname())
        )
        return StageWeightSender(self, stage, address)


class StageTurns:
    """Stage k waits for stage k-1's "done" key, then marks its own (``ok`` or ``failed``).

    ``store`` is any torch distributed store every stage source rank reaches (default: the
    trainer's default process-group store). Keys are unique per sync, so nothing is reset.
    """

    def __init__(self, stage: int, store: Any = None, timeout_s: float = 1800.0):
        if store is None:
            if not dist.is_initialized():
                raise RuntimeError("StageTurns needs a store: torch.distributed is not initialized")
            store = dist.distributed_c10d._get_default_store()
        self.stage, self.store = stage, dist.PrefixStore(TURN_PREFIX, store)
        self.timeout = timedelta(seconds=timeout_s * max(1, stage))

    def wait(self, sync_key: str) -> None:
        """Block until the previous stage is done; raise if it failed."""
        if self.stage == 0:
            return
        prev = f"{sync_key}/{self.stage - 1}"
        self.store.wait([prev], self.timeout)
        if self.store.get(prev) != b"ok":
            raise SGLangError(f"pipeline stage {self.stage - 1} failed its weight sync; "
                              f"stage {self.stage} does not start")

    def done(self, sync_key: str, ok: bool) -> None:
        self.store.set(f"{sync_key}/{self.stage}", "ok" if ok else "failed")


class StageWeightSender:
    """Feeds one PP stage's buckets to every server over the stage's own update group.

    Usable on any trainer rank (no engine needed): the group is ``<group_name>_pp<stage>``
    (``_r<n>`` appended when rebuilt after a failure), with
    this rank as its rank 0 and the servers' ranks after it, built on the first :meth:`send`.
    ``ordered`` (default) makes stages take turns through :class:`StageTurns` on ``store``
    (default: the trainer's default store); ``ordered=False`` is only safe for a single stage.
    The engine on rank 0 pauses generation and opens sessions before, and closes them after.
    """

    def __init__(self, spec: StageSyncSpec, stage: int, master_address: str | None = None, *,
                 ordered: bool = True, store: Any = None):
        self.spec, self.stage = spec, stage
        self.master_address = master_address or spec.master_address
        self.group_name = f"{spec.group_name}_pp{stage}"
        self.turns = StageTurns(stage, store, spec.sync_timeout_s) if ordered else None
        cfg = SGLangConfig(urls=list(spec.urls), connect_timeout_s=spec.connect_timeout_s,
                           sync_timeout_s=spec.sync_timeout_s, max_retries=0,
                           max_concurrency=max(1, len(spec.urls)))
        self._client = HTTPClient(cfg, workers=max(1, len(spec.urls)))
        self._servers = [Endpoint(k, u, tp_size=tp)
                         for k, (u, tp) in enumerate(zip(spec.urls, spec.tp_sizes, strict=True))]
        self._group: UpdateGroup | None = None
        self._sends = self._builds = 0

    def _ensure_group(self) -> UpdateGroup:
        if self._group is None:
            spec = self.spec
            port = spec.master_port + 1 + self.stage if spec.master_port else 0
            # a rebuilt group needs a new name: the servers remember the broken one's
            name = self.group_name + (f"_r{self._builds}" if self._builds else "")
            self._builds += 1
            group = UpdateGroup(name, self._servers, self.master_address, port,
                                spec.backend, spec.sync_timeout_s)
            group.create(self._client)
            self._group = group
        return self._group

    def send(self, buckets: Iterable[NamedTensors], version: int) -> int:
        """Broadcast every bucket (one POST per server per bucket) in this stage's turn;
        returns the tensor count. A failure is marked for the later stages, then raised."""
        key = f"{self.spec.group_name}/v{version}/n{self._sends}"
        self._sends += 1
        ok = False
        try:
            if self.turns is not None:
                self.turns.wait(key)
            group = self._ensure_group()
            try:
                count = broadcast_buckets(group, buckets, version,
                                          post_updates(self._client, self._servers))
            except Exception:
                self._group = None  # a broken group is rebuilt on the next send
                raise
            ok = True
            return count
        finally:
            if self.turns is not None:
                self.turns.done(key, ok)

    def close(self) -> None:
        """Destroy this stage's group on the servers (best effort) and stop the HTTP pool."""
        if self._group is not None:
            self._group.destroy(self._client)
            self._group = None
        self._client.pool.shutdown(wait=False, cancel_futures=True)
