"""Weight sync from the Megatron actor into the rollout engine: one strategy per mode, chosen once.

``DriverSync``: every rank streams its share of the HF-named tensors (TP gather, PP stage by
stage) to the driver rank, which feeds ``engine.update_weights`` (the local engine, and SGLang's
tensor and disk modes). ``PerStageSync``: each pipeline stage's source rank broadcasts its own
stage to the engine's servers (SGLang's distributed mode with PP > 1), bracketed by the engine's
``begin_update``/``finish_update`` on the driver rank. The loop calls ``sync(version)`` only.
"""

from __future__ import annotations

import abc
import socket
import time
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_gvpo.bridge.export import (
    ExportConfig,
    bucket_nbytes,
    expert_peer_of_replica,
    in_rank0_data_replica,
    iter_buckets_on_rank0,
    iter_stage_buckets,
)
from megatron_gvpo.models.hf_config import HFArch
from megatron_gvpo.parallel.initialize import device
from megatron_gvpo.parallel.launch import broadcast_object, is_rank0
from megatron_gvpo.rollout.base import NamedTensors, RolloutEngine, StageSender


class _Counted:
    """Buckets passed through, their bytes counted."""

    def __init__(self, buckets: Iterable[NamedTensors]):
        self.buckets, self.nbytes = buckets, 0

    def __iter__(self) -> Iterator[NamedTensors]:
        for bucket in self.buckets:
            self.nbytes += bucket_nbytes(bucket)
            yield bucket


def _sync_metrics(start: float, nbytes: int) -> dict[str, float]:
    seconds = time.perf_counter() - start
    return {
        "sync/seconds": seconds,
        "sync/gb_per_s": nbytes / 1e9 / max(seconds, 1e-9),
        "sync/bytes": float(nbytes),
    }


class WeightSync(abc.ABC):
    """Pushes the actor's current weights into the engine, tagged with a version."""

    def __init__(self, model: torch.nn.Module, arch: HFArch, export: ExportConfig, engine):
        self.model, self.arch, self.export = model, arch, export
        self.engine: RolloutEngine | None = engine  # the driver rank's; None elsewhere

    def after_rollout(self) -> None:
        """A colocated engine gives its accelerator memory to training until the next sync."""
        if self.engine is not None and self.engine.colocated:
            self.engine.release_memory()

    def _resume_memory(self, version: int) -> None:
        if self.engine is not None and self.engine.colocated and version > 0:
            self.engine.resume_memory()

    @abc.abstractmethod
    def sync(self, version: int) -> dict[str, float]:
        """Collective over every rank; returns ``sync/*`` metrics."""

    def close(self) -> None:  # noqa: B027  (most strategies hold nothing)
        """Release what the strategy holds (connections, process groups)."""


class DriverSync(WeightSync):
    """Everything funnels to the driver rank's ``engine.update_weights``."""

    def sync(self, version: int) -> dict[str, float]:
        start = time.perf_counter()
        self._resume_memory(version)
        buckets = _Counted(iter_buckets_on_rank0(self.model, self.arch, self.export))
        if self.engine is not None:
            self.engine.update_weights(buckets, version=version)
        else:
            for _ in buckets:  # take part in the gathers and sends
                pass
        return _sync_metrics(start, buckets.nbytes)


class PerStageSync(WeightSync):
    """Each PP stage's source rank (TP 0 of DP replica 0) sends its own stage to the servers."""

    def __init__(self, model, arch, export, engine):
        super().__init__(model, arch, export, engine)
        self._sender: StageSender | None = None
        self._target = None

    def sync(self, version: int) -> dict[str, float]:
        start = time.perf_counter()
        target, driver_host = broadcast_object(
            (self.engine.stage_sync_target(), socket.gethostname()) if is_rank0() else None
        )
        if self.engine is not None:
            self.engine.begin_update(version)
        dist.barrier()
        nbytes, error = 0, None
        if expert_peer_of_replica():  # holds some of the replica's experts: gather, send nothing
            for _ in iter_stage_buckets(self.model, self.arch, self.export):
                pass
        if in_rank0_data_replica():
            buckets = _Counted(iter_stage_buckets(self.model, self.arch, self.export))
            if parallel_state.get_tensor_model_parallel_rank() == 0:
                try:
                    self._sender_for(target, driver_host).send(buckets, version)
                except Exception as e:  # reported after every rank has finished the stage
                    error = e
            for _ in buckets.buckets:  # TP peers, or a failed sender: finish the TP gathers
                pass
            nbytes = buckets.nbytes
        stats = torch.tensor([float(error is not None), float(nbytes)], device=device())
        dist.all_reduce(stats)
        failed, nbytes = stats.tolist()
        if self.engine is not None:
            if failed:
                self.engine.abort_update()
            else:
                self.engine.finish_update(version)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("weight sync failed on another pipeline stage's source rank")
        return _sync_metrics(start, int(nbytes))

    def _sender_for(self, target, driver_host: str) -> StageSender:
        """One sender per target; a new target (servers restarted) gets a new sender."""
        if self._sender is None or self._target != target:
            self.close()
            stage = parallel_state.get_pipeline_model_parallel_rank()
            self._sender, self._target = target.connect(stage, driver_host), target
        return self._sender

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None


def build_weight_sync(
    model: torch.nn.Module, arch: HFArch, export: ExportConfig, engine: RolloutEngine | None
) -> WeightSync:
    """The strategy the engine asks for: per-stage when it offers a stage target and PP > 1."""
    per_stage = parallel_state.get_pipeline_model_parallel_world_size() > 1 and broadcast_object(
        engine.stage_sync_target() is not None if is_rank0() else None
    )
    cls = PerStageSync if per_stage else DriverSync
    return cls(model, arch, export, engine)
