"""Colocated weight sync: flattened buckets handed to the servers as CUDA-IPC handles.

``POST /update_weights_from_tensor`` with ``load_format="flattened_bucket"`` and one payload per
server TP rank: each rank deserializes only ``serialized_named_tensors[tp_rank]`` (0.5.23
``managers/tp_worker.py`` ``deserialize_own_rank``), and SGLang's own engine serializes once per
rank so producer-side CUDA-IPC reference counts drop cleanly (``entrypoints/engine.py``
``_serialize_tensors_per_rank``). From 0.5.22 the call is refused outside a weight-update session.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401 - registers torch's tensor reductions with ForkingPickler

from megatron_gvpo.rollout.base import NamedTensors
from megatron_gvpo.rollout.sglang.client import Endpoint, HTTPClient, SGLangError


@dataclass(frozen=True)
class FlatTensorMeta:
    """Where one tensor lives in a flat bucket: ``flat[start:end].view(shape)``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    end: int


def flatten_bucket(tensors: NamedTensors) -> list[tuple[torch.Tensor, list[FlatTensorMeta]]]:
    """One flat 1-D tensor per dtype (in first-seen order) plus each tensor's slice of it."""
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors:
        groups.setdefault(t.dtype, []).append((name, t))
    out = []
    for dtype, items in groups.items():
        metas, offset = [], 0
        for name, t in items:
            metas.append(FlatTensorMeta(name, tuple(t.shape), dtype, offset, offset + t.numel()))
            offset += t.numel()
        flat = torch.cat([t.detach().reshape(-1) for _, t in items])
        out.append((flat, metas))
    return out


def unflatten_bucket(flat: torch.Tensor, metas: Sequence[FlatTensorMeta]) -> NamedTensors:
    """Inverse of :func:`flatten_bucket` for one dtype group (views into ``flat``)."""
    return [(m.name, flat[m.start : m.end].view(m.shape)) for m in metas]


Serializer = Callable[[torch.Tensor, list[FlatTensorMeta], int], list[str]]
"""``(flat, metas, tp_size) -> serialized_named_tensors``: ``tp_size`` separately serialized
payloads, one per server TP rank; called once per server and bucket."""


def _patch_torch_reductions() -> None:
    """SGLang's CUDA-IPC patch (handles name devices by UUID, so trainer and server may see
    different ``CUDA_VISIBLE_DEVICES``): ``sglang.srt.utils.patch_torch`` in 0.5.4 ... 0.5.23."""
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:
        try:  # releases before the utils/ package
            from sglang.srt.patch_torch import monkey_patch_torch_reductions
        except ImportError as e:
            raise RuntimeError(
                "weight_sync='tensor': SGLang's CUDA-IPC patch (sglang.srt.utils.patch_torch) is "
                "missing; without it IPC handles carry device indices, which point at the wrong "
                "GPU when trainer and server see different CUDA_VISIBLE_DEVICES"
            ) from e
    monkey_patch_torch_reductions()


def flattened_bucket_payloads(
    flat: torch.Tensor, metas: list[FlatTensorMeta], tp_size: int, metadata_cls: type
) -> list[str]:
    """``tp_size`` separately serialized payloads of one flat bucket, in the form SGLang's server
    decodes (0.5.23): ``{"flattened_tensor": flat, "metadata": [metadata_cls(...)]}`` pickled by
    multiprocessing's ``ForkingPickler`` (torch's reductions: a CUDA tensor travels as an IPC
    handle) and base64-encoded, as ``MultiprocessingSerializer.serialize(obj, output_str=True)``
    does (``utils/common.py:3060-3082``). The server decodes each with its allow-listed
    ``SafeUnpickler`` (``utils/common.py:3144``) and rebuilds every tensor as
    ``flattened_tensor[start_idx:end_idx].view(dtype).reshape(shape)``
    (``weight_sync/tensor_bucket.py:118-135``); ``metadata_cls`` is SGLang's
    ``weight_sync.tensor_bucket.FlattenedTensorMetadata``, the only metadata class it admits."""
    out = []
    for _ in range(tp_size):  # one serialization per rank: producer-side IPC refcounts
        meta = [
            metadata_cls(name=m.name, shape=torch.Size(m.shape), dtype=m.dtype,
                         start_idx=m.start, end_idx=m.end, numel=m.end - m.start)
            for m in metas
        ]
        buf = io.BytesIO()
        ForkingPickler(buf).dump({"flattened_tensor": flat, "metadata": meta})
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def sglang_flattened_bucket_serializer(
    flat: torch.Tensor, metas: list[FlatTensorMeta], tp_size: int
) -> list[str]:
    """``serialized_named_tensors`` for ``load_format="flattened_bucket"``
    (:func:`flattened_bucket_payloads` with SGLang's metadata class and, for CUDA tensors, its
    CUDA-IPC patch)."""
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except Exception as e:  # not installed, or no sgl_kernel / CUDA
        raise RuntimeError(
            "weight_sync='tensor' needs SGLang's serializer classes (the 'gpu' extra, on a CUDA "
            f"machine): importing sglang failed: {e!r}. Use weight_sync='distributed' or 'disk' "
            "without it."
        ) from e
    if flat.is_cuda:
        _patch_torch_reductions()
    return flattened_bucket_payloads(flat, metas, tp_size, FlattenedTensorMetadata)


def sync_tensor(client: HTTPClient, servers: Sequence[Endpoint],
                buckets: Iterable[NamedTensors], version: int,
                serializer: Serializer) -> int:
    """POST each dtype group of each bucket to every server; returns the tensor count."""
    count = 0
    for bucket in buckets:
        for flat, metas in flatten_bucket(bucket):
            count += len(metas)
            payloads = {}
            for s in servers:  # one serialization per server and TP rank: IPC refcounts
                p = serializer(flat, metas, s.tp_size or 1)
                if len(p) != (s.tp_size or 1):
                    raise SGLangError(f"serializer gave {len(p)} payloads for {s.url} with "
                                      f"tp_size {s.tp_size}")
                payloads[s.index] = p
            client.each(servers, lambda s, p=payloads: client.call(
                s, "POST", "/update_weights_from_tensor",
                {"serialized_named_tensors": p[s.index], "load_format": "flattened_bucket",
                 "flush_cache": False, "weight_version": str(version)},
                timeout=client.cfg.sync_timeout_s, retry=False,
            ))
    return count
