"""Wrap the actor in megatron-core DDP with gradients *summed* (not averaged) over DP ranks.

Our losses are normalised by the whole step batch before backward (see algorithms/), so the
gradient of one optimizer step is the sum of the per-rank gradients: ``calculate_per_token_loss``
turns off DDP's 1/DP scaling, and ``finalize_model_grads`` is called without a token count so
no further rescaling happens. It still all-reduces DP grads, sums tied-embedding grads across
the first/last PP stages, and sums q/k-layernorm grads across TP.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.utils import get_model_config


def _finalize_grads_unscaled(model: list[torch.nn.Module], num_tokens=None, **kwargs) -> None:
    if torch.distributed.get_world_size() == 1:
        return  # nothing to sum over: one rank holds every gradient, unscaled
    finalize_model_grads(model, num_tokens=None, **kwargs)


def wrap_with_ddp(
    model: torch.nn.Module,
    use_distributed_optimizer: bool = False,
    grad_reduce_in_fp32: bool = True,
    bucket_size: int | None = None,
) -> DistributedDataParallel:
    """megatron-core DDP around ``model``; gradients land in ``param.main_grad``."""
    config = get_model_config(model)
    if not config.calculate_per_token_loss:  # set where the config is made (models/gpt.py)
        raise ValueError("wrap_with_ddp needs a model built with calculate_per_token_loss=True")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=False,
        bucket_size=bucket_size,
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = _finalize_grads_unscaled
    ddp.broadcast_params()  # identical weights on every DP rank
    return ddp
