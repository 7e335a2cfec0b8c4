"""torchrun worker: the collectives of megatron-core's alltoall MoE token dispatcher on gloo.

Run by tests/test_moe.py as ``python -m torch.distributed.run --nproc_per_node W <this file>``.
With the CPU compatibility layer on, every rank calls megatron's ``all_to_all`` (uneven splits
handed over as tensors and as numpy arrays, as the dispatcher hands them) and
``gather_from_sequence_parallel_region`` with uneven per-rank sizes (one rank sending nothing),
forward and backward, and checks each result against rows it builds itself from the formula
that made every rank's input. Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    all_to_all,
    gather_from_sequence_parallel_region,
)

from megatron_gvpo.parallel.cpu_compat import enable_cpu_compat


def rows(src: int, dst: int, dtype=torch.float32) -> torch.Tensor:
    """The rows rank ``src`` sends rank ``dst``: (src + 2 dst) mod 3 of them, each unique."""
    n = (src + 2 * dst) % 3
    j = torch.arange(n, dtype=torch.float64)[:, None]
    return (1000 * src + 100 * dst + 10 * j + torch.arange(4)).to(dtype)


def check_all_to_all(rank: int, world: int, as_numpy: bool) -> None:
    group = dist.group.WORLD
    x = torch.cat([rows(rank, d) for d in range(world)]).requires_grad_()
    in_splits = torch.tensor([rows(rank, d).shape[0] for d in range(world)])
    out_splits = torch.tensor([rows(s, rank).shape[0] for s in range(world)])
    if as_numpy:
        in_splits, out_splits = in_splits.numpy(), out_splits.numpy()
    y = all_to_all(group, x, out_splits, in_splits)
    want = torch.cat([rows(s, rank) for s in range(world)])
    assert torch.equal(y, want), (rank, y, want)
    # backward is the reverse all-to-all: d(sum(y * w(y)))/dx = w(x) with w(v) = v + 0.5
    (y * (y.detach() + 0.5)).sum().backward()
    assert torch.equal(x.grad, x.detach() + 0.5), (rank, x.grad)


def check_uneven_all_gather(rank: int, world: int, dtype: torch.dtype) -> None:
    group = dist.group.WORLD
    sizes = [(3, 0, 2, 1)[r % 4] for r in range(world)]  # uneven; rank 1 has no tokens
    blocks = [_block(r, n, dtype) for r, n in enumerate(sizes)]
    x = blocks[rank].clone().requires_grad_()
    y = gather_from_sequence_parallel_region(x, group=group, output_split_sizes=sizes)
    want = torch.cat(blocks)
    assert torch.equal(y, want), (rank, dtype, y, want)
    # backward: an uneven reduce-scatter; every rank weighs y the same, so dx = world * weight
    weight = torch.arange(want.numel(), dtype=dtype).view_as(want) / 8
    (y * weight).sum().backward()
    start = sum(sizes[:rank])
    assert torch.equal(x.grad, world * weight[start : start + sizes[rank]]), (rank, x.grad)


def _block(rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s n rows for the gather (exact in bf16 too)."""
    return (100 * rank + 10 * torch.arange(n)[:, None] + torch.arange(4)).to(dtype)


def main() -> None:
    dist.init_process_group("gloo")
    assert enable_cpu_compat(), "this worker checks the CPU compatibility layer"
    rank, world = dist.get_rank(), dist.get_world_size()
    for as_numpy in (False, True):
        check_all_to_all(rank, world, as_numpy)
    for dtype in (torch.float32, torch.bfloat16):
        check_uneven_all_gather(rank, world, dtype)
    dist.barrier()
    if rank == 0:
        print("gloo collectives: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
