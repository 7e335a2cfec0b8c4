"""Run megatron-core on a machine without CUDA (gloo backend, CPU tensors).

megatron-core assumes CUDA in a few places: tensors created with ``device="cuda"`` or
``torch.cuda.current_device()``, optimizer type checks against ``'torch.cuda.FloatTensor'``,
``torch.cuda.synchronize``/streams, and the CUDA RNG tracker. This module bridges exactly those
with a process-wide ``TorchFunctionMode`` that maps CUDA devices to the CPU, plus a handful of
``torch.cuda`` functions, and adapts the two collective calls of megatron-core's all-to-all MoE
token dispatcher that gloo does not take as they come (:func:`_gloo_uneven_collectives`). It is
a portability layer for correctness tests and the CPU demo, not for speed, and it is enabled
only when CUDA is absent (see :func:`enable_cpu_compat`). The
training step's forward (model and loss) runs with the mode suspended (:func:`native_torch`):
only megatron's schedule, DDP, optimizer and checkpoint code need it.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_TYPE_STRINGS = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}

_mode: _CudaToCpuMode | None = None


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how megatron passes torch.cuda.current_device(); on CPU it means "the GPU".
    return isinstance(device, int) and not isinstance(device, bool)


def _map_device(device: object) -> object:
    return _CPU if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites every ``device=cuda`` (and ``.cuda()``/``.to("cuda")``) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Hot path first: this runs for every torch call made while the mode is active.
        if kwargs and "device" in kwargs:
            kwargs = {**kwargs, "device": _map_device(kwargs["device"])}
        if func not in _SPECIAL:
            return func(*args, **(kwargs or {}))
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _TYPE_STRINGS.get(name, name)
        if func is torch.Tensor.to and len(args) >= 2 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        return func(*args, **(kwargs or {}))


_SPECIAL = frozenset(
    {
        torch.Tensor.cuda,
        torch.Tensor.type,
        torch.Tensor.to,
        torch.Tensor.pin_memory,
        torch.Tensor.record_stream,
    }
)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: every operation is already synchronous on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def record_event(self, *args, **kwargs):
        return _NullEvent()


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def wait(self, *args, **kwargs):
        return None

    def query(self):
        return True


def _patch_cuda_namespace() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: None

    from megatron.core.tensor_parallel import random as mcore_random

    # The RNG tracker swaps "CUDA" generator states; on the CPU there is one generator.
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _single_rank_all_reduce() -> None:
    """``dist.all_reduce`` over a group of one rank returns at once (the identity, exactly).

    gloo still hands each such call to its worker thread; on a loaded 2-core box that cost
    milliseconds per call, several per step (megatron's grad norm, the step guard). Calls inside a
    coalescing block are left to torch, which records them for the block's end.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    original = dist.all_reduce
    if getattr(original, "_single_rank_fast_path", False):
        return

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        pg = group if group is not None else c10d._get_default_group()
        if dist.get_world_size(pg) == 1 and pg not in c10d._world.pg_coalesce_state:
            return _NullWork() if async_op else None
        return original(tensor, op=op, group=group, async_op=async_op)

    all_reduce._single_rank_fast_path = True
    dist.all_reduce = all_reduce


def _split_sizes(sizes):
    """Split sizes as gloo's binding takes them: a list of ints (or None)."""
    if sizes is None or isinstance(sizes, list):
        return sizes
    if torch.is_tensor(sizes):
        return [int(n) for n in sizes.tolist()]
    return [int(n) for n in sizes]  # a numpy array or a tuple


def _gloo_uneven_collectives() -> None:
    """Let megatron-core's ``alltoall`` MoE token dispatcher run on gloo.

    The dispatcher moves tokens with ``tensor_parallel.mappings.all_to_all`` (``_AllToAll``,
    ``mappings.py:420-461``; ``token_dispatcher.py:666-671`` and ``:810``), whose forward and
    backward both call ``torch.distributed.all_to_all_single`` with uneven split sizes
    (``mappings.py:444``); with TP > 1 it also gathers and reduce-scatters over the TP group
    with uneven per-rank sizes (``token_dispatcher.py:691-700`` and ``:775-783`` through
    ``mappings.py:150`` and ``:193``). gloo moves uneven all-to-all and reduce-scatter data
    itself; what it does not take:

    - split sizes as tensors. With CUDA the dispatcher copies its split counts to the host as
      numpy arrays (``maybe_move_tensor_to_cpu(..., as_numpy=True)``, ``token_dispatcher.py:
      876-887``); that helper returns a tensor already on the CPU unchanged
      (``moe_utils.py:1093``), and the binding of ``all_to_all_single`` rejects tensors. They
      are turned into lists of ints here, and gloo's all-to-all moves the data.
    - ``all_gather`` into a list of tensors of different sizes (``mappings.py:150``): gloo's
      requires equal sizes. Emulated exactly: each rank pads its tensor to the largest size
      along dim 0, gloo gathers the equal-sized blocks, and each output takes its rank's block
      without the padding (a copy of the bytes; no arithmetic).

    The CUDA-only rest of that path (the dispatcher's side stream and its events,
    ``record_stream``, ``.cuda()``, ``torch.cuda.current_device()``) is already bridged by the
    device mode and the ``torch.cuda`` stand-ins above.
    """
    import torch.distributed as dist

    a2a, gather = dist.all_to_all_single, dist.all_gather
    if getattr(a2a, "_gloo_uneven", False):
        return

    def all_to_all_single(
        output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        return a2a(
            output,
            input,
            output_split_sizes=_split_sizes(output_split_sizes),
            input_split_sizes=_split_sizes(input_split_sizes),
            group=group,
            async_op=async_op,
        )

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list}
        if len(shapes) <= 1 or tensor.dim() == 0:
            return gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]].copy_(tensor)
        blocks = [torch.empty_like(padded) for _ in tensor_list]
        gather(blocks, padded, group=group)
        for out, block in zip(tensor_list, blocks, strict=True):
            out.copy_(block[: out.shape[0]])
        return _NullWork() if async_op else None

    all_to_all_single._gloo_uneven = True
    dist.all_to_all_single = all_to_all_single
    dist.all_gather = all_gather


class _NullWork:
    """A finished ``dist.Work``."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def enable_cpu_compat() -> bool:
    """Install the CUDA->CPU bridge once per process when CUDA is absent; return whether active."""
    global _mode
    if torch.cuda.is_available():
        return False
    if _mode is None:
        _patch_cuda_namespace()
        _single_rank_all_reduce()
        _gloo_uneven_collectives()
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        logger.info("CUDA not available: megatron-core runs on CPU through the compat layer")
    return True


@contextlib.contextmanager
def native_torch():
    """Suspend the CUDA->CPU mode inside the block (a no-op when it is off).

    The mode costs a Python call per torch function; the model's forward and our loss code make
    no CUDA assumption (``torch.cuda.current_device`` is patched, not the mode's work), so the
    step's hot path runs without it. When another mode sits above ours (``with torch.device``),
    nothing is suspended.
    """
    from torch.overrides import _get_current_function_mode

    if _mode is None or _get_current_function_mode() is not _mode:
        yield
        return
    _mode.__exit__(None, None, None)
    try:
        yield
    finally:
        _mode.__enter__()
