"""The trainer's side of an SGLang weight-update process group (rank 0; server ranks follow).

``POST /init_weights_update_group`` {master_address, master_port, rank_offset, world_size,
group_name, backend}: server TP rank r joins as ``rank_offset + r`` over ``tcp://`` (0.5.23
``model_executor/model_runner_components/weight_updater.py`` ``init_weights_update_group`` ->
``utils/common.py`` ``init_custom_process_group``, which calls torch's
``_new_process_group_helper``). torch refuses a group name a process has already created, so a
name is used once per server process: names here carry a per-trainer-process token, and groups
are destroyed (``/destroy_weights_update_group``) when the engine or sender closes.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_gvpo.parallel.store import listening_store
from megatron_gvpo.rollout.sglang.client import Endpoint, HTTPClient, SGLangError

log = logging.getLogger(__name__)

_PROCESS_TOKEN = f"{os.getpid()}x{uuid.uuid4().hex[:8]}"
_counter = itertools.count(1)


def new_group_name(prefix: str) -> str:
    """A name no other trainer process (restarted or concurrent) will use: prefix, token, count."""
    return f"{prefix}_{_PROCESS_TOKEN}_{next(_counter)}"


class UpdateGroup:
    """Rank 0 of the group the servers join; built from a TCPStore and one backend object.

    The store prefixes are those torch's group helper uses on SGLang's side: ``<name>`` (SGLang's
    ``PrefixStore(group_name, store)``), then ``<name>/`` (torch's helper), then ``cpu/`` (gloo)
    or ``cuda/`` (nccl) for the backend object.
    """

    def __init__(self, name: str, servers: Sequence[Endpoint], address: str, port: int,
                 backend: str, timeout_s: float):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"sglang.dist_backend must be gloo or nccl, got {backend!r}")
        self.name, self.backend, self.address = name, backend, address
        self.servers = list(servers)
        tps = [s.tp_size or 1 for s in self.servers]
        self.offsets = [1 + sum(tps[:k]) for k in range(len(tps))]
        self.world_size = 1 + sum(tps)
        self._timeout = timedelta(seconds=timeout_s)
        # listens on ``address`` only (a bare TCPStore binds every interface)
        self.store = listening_store(address, port, self.world_size, self._timeout)
        self.port = self.store.port
        self.pg: Any = None
        self.device = torch.device("cpu")

    def create(self, client: HTTPClient) -> None:
        """Ask every server to join (concurrently: joining is a rendezvous), then join."""
        futures = [
            client.pool.submit(client.call, s, "POST", "/init_weights_update_group", {
                "master_address": self.address, "master_port": self.port,
                "rank_offset": off, "world_size": self.world_size,
                "group_name": self.name, "backend": self.backend,
            }, timeout=client.cfg.sync_timeout_s, retry=False)
            for s, off in zip(self.servers, self.offsets, strict=True)
        ]
        try:
            self._join()
        except Exception as e:
            for f in futures:  # a server that refused explains the time-out best
                if f.done() and f.exception() is not None:
                    raise f.exception() from e
            raise
        for f in futures:
            f.result()

    def _join(self) -> None:
        prefix = dist.PrefixStore(f"{self.name}/", dist.PrefixStore(self.name, self.store))
        if self.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(
                dist.PrefixStore("cpu/", prefix), 0, self.world_size, self._timeout
            )
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self._timeout
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.pg = dist.ProcessGroupNCCL(
                dist.PrefixStore("cuda/", prefix), 0, self.world_size, opts
            )
        self.pg._set_sequence_number_for_group()  # as torch's helper does; no peer traffic

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Send one tensor from rank 0 to every server rank."""
        t = tensor.detach().to(self.device).contiguous()
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()

    def destroy(self, client: HTTPClient) -> None:
        """Tell every server to drop the group (best effort), then drop ours."""
        for s in self.servers:
            try:
                client.call(s, "POST", "/destroy_weights_update_group",
                            {"group_name": self.name}, retry=False)
            except SGLangError as e:
                log.warning("destroying update group %s on %s failed: %s", self.name, s.url, e)
        self.pg = None
        self.store = None
