"""Vectorised helpers for per-group reductions over integer group ids (no Python loop over groups),
and the argument checks the losses share."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_group_ids(group_ids: Tensor, n: int, name: str = "group_ids") -> Tensor:
    """Validate a 1-D integer id tensor of length ``n`` and return it as int64."""
    if not isinstance(group_ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(group_ids).__name__}")
    if group_ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {group_ids.dtype}")
    if group_ids.numel() != n:
        raise ValueError(f"{name} has length {group_ids.numel()}, expected {n}")
    return group_ids.to(torch.int64)


def group_index(group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(unique_ids, inverse, counts)``: sorted unique ids ``[G]``, each sample's group index
    ``[N]`` and each group's size ``[G]``."""
    unique, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return unique, inverse, counts


def group_sum(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """Sum ``values`` ``[N]`` into ``[num_groups]`` by ``inverse`` (differentiable)."""
    out = values.new_zeros(num_groups)
    return out.index_add(0, inverse, values)


def check_beta(beta: float) -> float:
    """``beta`` as a float; a ValueError unless it is a positive finite number."""
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}") from None
    if not math.isfinite(b) or b <= 0.0:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    return b


def first_of_group(group_ids: Tensor) -> Tensor:
    """``[N]`` bool: True at the first sample of each group (one count per group)."""
    _, inverse, counts = group_index(group_ids)
    n = group_ids.numel()
    first = torch.full((counts.numel(),), n, dtype=torch.int64, device=group_ids.device)
    first = first.scatter_reduce(
        0, inverse, torch.arange(n, device=group_ids.device), reduce="amin"
    )
    mask = torch.zeros(n, dtype=torch.bool, device=group_ids.device)
    mask[first] = True
    return mask
