"""Stream the actor's weights to a rollout engine: HF names, full (TP-gathered) tensors, buckets.

Where weights leave Megatron. Two entry points:

- :func:`iter_stage_buckets`: this PP stage's buckets on every rank of the stage (for engines
  that each stage feeds itself, e.g. SGLang's NCCL broadcast from each stage's source rank);
- :func:`iter_buckets_on_rank0`: every stage's buckets funnelled to global rank 0 over the PP
  group, stage by stage (for the driver that owns the local engine or a colocated SGLang).

Memory: beyond its own shards a rank holds one bucket and the tensor that opens the next (a
sending rank also the bucket's flattened copy), never a second copy of the model, as long as the
consumer drops each bucket before asking for the next. Buckets are at most ``bucket_bytes`` unless a single tensor is larger.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_gvpo.bridge.fp8 import DEFAULT_BLOCK, quantize_named
from megatron_gvpo.bridge.weights import iter_hf_tensors
from megatron_gvpo.models.forward import unwrap
from megatron_gvpo.models.hf_config import HFArch

NamedTensors = list[tuple[str, torch.Tensor]]
DEFAULT_BUCKET_BYTES = 512 << 20
_ALIGN = 64  # byte alignment of each tensor inside a flattened bucket


@dataclass
class ExportConfig:
    """How weights are cast and packed for a sync."""

    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    dtype: torch.dtype | None = None  # cast floating tensors to this dtype; None: keep
    fp8: bool = False  # blockwise e4m3 for linear projection weights (see bridge/fp8.py)
    fp8_block: tuple[int, int] = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        if self.bucket_bytes < 1:
            raise ValueError(f"export bucket_bytes must be >= 1, got {self.bucket_bytes}")


def bucket_nbytes(bucket: NamedTensors) -> int:
    """Bytes of tensor data in a bucket."""
    return sum(t.numel() * t.element_size() for _, t in bucket)


def _convert(name: str, tensor: torch.Tensor, cfg: ExportConfig) -> NamedTensors:
    """Cast and optionally FP8-quantise one HF tensor; a quantised weight brings its scale."""
    if cfg.dtype is not None and tensor.is_floating_point() and tensor.dtype != cfg.dtype:
        tensor = tensor.to(cfg.dtype)
    if cfg.fp8:
        return quantize_named(name, tensor, cfg.fp8_block)
    return [(name, tensor)]


def pack_buckets(items: Iterable[NamedTensors], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Group tensors into buckets of at most ``bucket_bytes`` (a larger tensor goes alone).

    Each item of ``items`` (a weight and, for FP8, its scale) stays within one bucket.
    """
    bucket: NamedTensors = []
    size = 0
    for group in items:
        n = bucket_nbytes(group)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(group)
        size += n
    if bucket:
        yield bucket


def iter_stage_buckets(
    model: torch.nn.Module, arch: HFArch, cfg: ExportConfig | None = None
) -> Iterator[NamedTensors]:
    """This PP stage's HF tensors in buckets; collective over TP (every TP rank must iterate).

    Every TP rank of the stage gets the same full tensors. The tied ``lm_head`` is not exported
    (HF stores it once, as ``model.embed_tokens.weight``).
    """
    cfg = cfg or ExportConfig()
    items = (_convert(n, t, cfg) for n, t in iter_hf_tensors(unwrap(model), arch))
    yield from pack_buckets(items, cfg.bucket_bytes)


def _flatten(bucket: NamedTensors) -> tuple[list[tuple], torch.Tensor]:
    """One uint8 buffer holding every tensor (aligned), and (name, shape, dtype, offset) rows."""
    meta, offset = [], 0
    for name, t in bucket:
        meta.append((name, tuple(t.shape), t.dtype, offset))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    device = bucket[0][1].device if bucket else torch.device("cpu")
    buf = torch.empty(offset, dtype=torch.uint8, device=device)
    for (_, t), (_, _, _, off) in zip(bucket, meta, strict=True):
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        buf[off : off + flat.numel()].copy_(flat)
    return meta, buf


def _unflatten(meta: list[tuple], buf: torch.Tensor) -> NamedTensors:
    """Views into ``buf`` for each (name, shape, dtype, offset) row."""
    out = []
    for name, shape, dtype, off in meta:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        out.append((name, buf[off : off + nbytes].view(dtype).reshape(shape)))
    return out


def _send_bucket(bucket: NamedTensors | None, dst: int, group: dist.ProcessGroup) -> None:
    """Send metadata (names, shapes, dtypes, offsets) then the flat bytes; None ends a stage."""
    if bucket is None:
        dist.send_object_list([None], dst=dst, group=group)
        return
    meta, buf = _flatten(bucket)
    dist.send_object_list([(meta, buf.numel())], dst=dst, group=group)
    dist.send(buf, dst=dst, group=group)


def _recv_buckets(
    src: int, group: dist.ProcessGroup, device: torch.device
) -> Iterator[NamedTensors]:
    """Receive buckets from global rank ``src`` until it signals the end of its stage."""
    while True:
        box = [None]
        dist.recv_object_list(box, src=src, group=group)
        if box[0] is None:
            return
        meta, nbytes = box[0]
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dist.recv(buf, src=src, group=group)
        yield _unflatten(meta, buf)


def in_rank0_data_replica() -> bool:
    """True on the ranks of the model replica that holds global rank 0 (DP rank 0, CP rank 0)."""
    return (
        parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )


def expert_peer_of_replica() -> bool:
    """True on a rank outside rank 0's data replica that holds some of that replica's routed
    experts (expert parallelism takes its ranks from DP): it must take part in the EP gathers
    of every export, then drop what it gathered."""
    return (
        not in_rank0_data_replica()
        and parallel_state.get_expert_model_parallel_world_size() > 1
        and parallel_state.get_expert_data_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )


def iter_buckets_on_rank0(
    model: torch.nn.Module, arch: HFArch, cfg: ExportConfig | None = None
) -> Iterator[NamedTensors]:
    """Every PP stage's buckets, yielded on global rank 0 only, stage 0 first.

    Collective: every rank must iterate it to the end (other ranks yield nothing). Ranks outside
    rank 0's data-parallel replica return at once (except the replica's expert-parallel peers,
    which gather experts with it and drop them); in the replica, each stage's TP ranks gather
    together and the stage's rank in rank 0's PP group sends each bucket (metadata, then one
    flattened buffer) to rank 0, which holds one received bucket at a time.
    """
    if expert_peer_of_replica():
        for _ in iter_stage_buckets(model, arch, cfg):
            pass
        return
    if not in_rank0_data_replica():
        return
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    in_rank0_pp_group = parallel_state.get_tensor_model_parallel_rank() == 0
    rank0 = dist.get_rank() == 0 if dist.is_initialized() else True
    if rank0:
        yield from iter_stage_buckets(model, arch, cfg)
        device = next(unwrap(model).parameters()).device
        for s in range(1, pp_size):
            yield from _recv_buckets(dist.get_global_rank(pp_group, s), pp_group, device)
        return
    if stage == 0 or not in_rank0_pp_group:
        for _ in iter_stage_buckets(model, arch, cfg):  # TP peers: take part in the gathers
            pass
        return
    dst = dist.get_global_rank(pp_group, 0)
    for bucket in iter_stage_buckets(model, arch, cfg):
        _send_bucket(bucket, dst, pp_group)
    _send_bucket(None, dst, pp_group)
