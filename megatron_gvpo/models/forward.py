"""Run the actor over micro-batches with megatron's pipeline schedule and get per-token logprobs.

Logits stay TP-sharded and are reduced to per-token logprobs (and entropy) on the last pipeline
stage by :func:`megatron_gvpo.parallel.logprobs.vocab_parallel_logprobs`; a loss function there
turns them into a scalar. For forward-only passes the logprobs are broadcast to every PP stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megatron_gvpo.models.moe import AuxLossScale
from megatron_gvpo.models.routing_replay import notify_forward
from megatron_gvpo.parallel.cpu_compat import native_torch
from megatron_gvpo.parallel.initialize import device
from megatron_gvpo.parallel.logprobs import vocab_parallel_logprobs


@dataclass
class MicroBatch:
    """One micro-batch: ``tokens`` [b, s]; logprobs are of tokens[:, 1:] given the prefix."""

    tokens: torch.Tensor
    position_ids: torch.Tensor | None = None
    packed_seq_params: PackedSeqParams | None = None
    extra: dict | None = None  # whatever a loss function needs (masks, rewards, group ids)


# (logprobs [b, s-1], entropy [b, s-1] or None, micro-batch) -> (loss, metrics dict)
# (logprobs [1, T-1], entropy [1, T-1] or None, micro-batch) -> (loss, tagged metrics)
MicroBatchLoss = Callable[
    [torch.Tensor, torch.Tensor | None, MicroBatch], tuple[torch.Tensor, dict]
]


def forward_backward(
    model: torch.nn.Module,
    micro_batches: list[MicroBatch],
    loss_fn: MicroBatchLoss,
    forward_only: bool = False,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> list[dict]:
    """One pass of megatron's schedule (1F1B with PP) over ``micro_batches``.

    ``loss_fn`` runs on the last PP stage and must return a loss that is already normalised as
    the caller wants (the schedule adds no division: ``calculate_per_token_loss`` is set). Returns
    the metrics dicts of the last stage, one per micro-batch (empty on other stages).
    """
    shapes = {tuple(mb.tokens.shape) for mb in micro_batches}
    if len(shapes) != 1:
        raise ValueError(
            f"all micro-batches must share one [batch, seq] shape, got {sorted(shapes)}"
        )
    ((mbs, seq),) = shapes
    if not get_attr_wrapped_model(model, "config").calculate_per_token_loss:
        raise ValueError("forward_backward needs calculate_per_token_loss=True (models/gpt.py)")
    true_vocab = getattr(unwrap(model), "true_vocab_size", None)
    it = iter(micro_batches)

    def step(data_iterator, model_chunk):
        mb = next(data_iterator)
        device = next(model_chunk.parameters()).device
        tokens = mb.tokens.to(device)
        pos = mb.position_ids
        if pos is None:
            pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        notify_forward(mb)  # routing replay (MoE): which samples' routes this forward takes
        with native_torch():  # the CPU compat layer's mode is for megatron's schedule, not this
            output = model_chunk(
                tokens, pos.to(device), attention_mask=None, packed_seq_params=mb.packed_seq_params
            )

        def loss_func(logits: torch.Tensor):
            # logits [b, s, V/tp]: position t predicts token t + 1.
            with native_torch():
                out = vocab_parallel_logprobs(
                    logits[:, :-1],
                    tokens[:, 1:],
                    true_vocab_size=true_vocab,
                    temperature=temperature,
                    return_entropy=with_entropy,
                )
                logprobs, entropy = out if with_entropy else (out, None)
                loss, metrics = loss_fn(logprobs, entropy, mb)
                return loss, torch.ones((), dtype=torch.int), metrics

        return output, loss_func

    def run() -> list[dict]:
        return get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=it,
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )

    config = get_attr_wrapped_model(model, "config")
    if forward_only or not _has_router_loss(config):
        return run()
    with AuxLossScale(_step_tokens(micro_batches)):
        return run()


def _has_router_loss(config) -> bool:
    return bool(config.num_moe_experts) and (
        bool(config.moe_aux_loss_coeff) or bool(config.moe_z_loss_coeff)
    )


def _step_tokens(micro_batches: list[MicroBatch]) -> int:
    """Token positions of the step's micro-batches over every DP rank (the router losses'
    step-wide normaliser, see :class:`megatron_gvpo.models.moe.AuxLossScale`)."""
    count = torch.tensor([float(sum(mb.tokens.numel() for mb in micro_batches))], device=device())
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return int(count.item())


@torch.no_grad()
def compute_logprobs(
    model: torch.nn.Module,
    micro_batches: list[MicroBatch],
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-token logprobs [b, s-1] (and entropy) of every micro-batch, on every PP stage."""

    def collect(logprobs, entropy, mb):
        out = {"logprobs": logprobs.float()}
        if entropy is not None:
            out["entropy"] = entropy.float()
        return logprobs.new_zeros(()), out

    results = forward_backward(
        model,
        micro_batches,
        collect,
        forward_only=True,
        temperature=temperature,
        with_entropy=with_entropy,
    )
    keys = ("logprobs", "entropy") if with_entropy else ("logprobs",)
    out = []
    for i, mb in enumerate(micro_batches):
        b, s = mb.tokens.shape
        tensors = [
            results[i][k] if results else torch.empty(b, s - 1, device=device()) for k in keys
        ]
        tensors = [broadcast_from_last_stage(t) for t in tensors]
        out.append(tuple(tensors) if with_entropy else tensors[0])
    return out


def broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    """``t`` of the last pipeline stage on every stage of the PP group (in place)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return t
    t = t.contiguous()
    dist.broadcast(
        t,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return t


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside megatron DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
