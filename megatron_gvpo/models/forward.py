"""Run the actor over micro-batches with megatron's pipeline schedule and get per-token logprobs.

Logits stay TP-sharded and are reduced to per-token logprobs (and entropy) on the last pipeline
stage by :func:`megatron_gvpo.parallel.logprobs.vocab_parallel_logprobs`; a loss function there
turns them into a scalar. For forward-only passes the logprobs are broadcast to every PP stage.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
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
    scale = nullcontext()  # the router losses' step-wide normaliser, when a backward adds them
    if not forward_only and _has_router_loss(get_attr_wrapped_model(model, "config")):
        scale = AuxLossScale(_step_tokens(micro_batches))

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

    with scale:
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


# ---------------------------------------------------------------- per-sample values of a pass
# Each sample lives in one micro-batch of one DP rank; a pass scatters this rank's samples into a
# zero-filled flat vector (all samples' response tokens, ``offsets[i]:offsets[i + 1]`` sample i),
# and a sum over DP gives every rank every sample.


def response_logprobs(logprobs: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """Per-sample response-token logprobs ``[n, L]`` (0 where masked) from a packed row ``[1, T-1]``."""
    index = mb.extra["response_index"].to(logprobs.device)
    mask = mb.extra["response_mask"].to(logprobs.device)
    picked = logprobs[0][index.flatten()].view_as(index)
    return torch.where(mask, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))


def sequence_logprobs(logprobs: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """Summed response-token logprobs ``[n]`` (token *sum*, as GVPO defines s)."""
    return response_logprobs(logprobs, mb).sum(-1)


def sequence_old_logprobs(mb: MicroBatch, key: str = "old_logprobs") -> torch.Tensor:
    """s' ``[n]``: the micro-batch's per-token ``key`` rows summed over the tokens that
    ``response_mask`` keeps (the model's own tokens)."""
    rows = mb.extra[key]
    mask = mb.extra["response_mask"].to(rows.device)
    return torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device)).sum(-1)


def sum_over_dp(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum ``t`` over the data-parallel ranks (collectives run on ``device``); returned on CPU.

    The exchange of per-sample values: each sample lives on one DP rank, the others hold zeros.
    """
    if parallel_state.get_data_parallel_world_size() == 1:
        return t
    t = t.to(device)
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t.cpu()


def scatter_rows(flat: torch.Tensor, offsets: list[int], rows: torch.Tensor, mb: MicroBatch) -> None:
    """Write a micro-batch's padded per-sample rows into their samples' spans of ``flat``."""
    for row, i in zip(rows, mb.extra["sample_ids"].tolist(), strict=True):
        flat[offsets[i] : offsets[i + 1]] = row[: offsets[i + 1] - offsets[i]]


def gather_rows(
    flat: torch.Tensor, offsets: list[int], model: torch.nn.Module, pp_broadcast: bool = False
) -> list[torch.Tensor]:
    """Per-sample rows from this rank's zero-filled flat vector, summed over DP (and taken from
    the last PP stage with ``pp_broadcast``), identical on every rank."""
    dev = next(model.parameters()).device
    if pp_broadcast and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        flat = broadcast_from_last_stage(flat.to(dev)).cpu()
    flat = sum_over_dp(flat, dev)
    return [flat[offsets[i] : offsets[i + 1]].clone() for i in range(len(offsets) - 1)]


@torch.no_grad()
def sample_token_logprobs(
    model: torch.nn.Module,
    micro_batches: list[MicroBatch],
    offsets: list[int],
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """Every sample's response-token logprobs under ``model``, on every rank: each DP rank scores
    its micro-batches, and the sum over DP of the flat vector gives every rank every sample (so
    later steps may place samples on other ranks)."""
    flat = torch.zeros(offsets[-1], dtype=torch.float32)
    for lp, mb in zip(
        compute_logprobs(model, micro_batches, temperature), micro_batches, strict=True
    ):
        with native_torch():
            scatter_rows(flat, offsets, response_logprobs(lp, mb).float().cpu(), mb)
    return gather_rows(flat, offsets, model)


@torch.no_grad()
def step_log_ratio(
    model: torch.nn.Module,
    micro_batches: list[MicroBatch],
    num_samples: int,
    temperature: float,
    baseline: str,
) -> torch.Tensor:
    """``s - s_base`` [N] float64 of the whole step at the current theta, identical on every
    rank: ``s`` the summed response logprobs under ``model``, ``s_base`` those of each
    micro-batch's ``extra[baseline]`` (``old_logprobs``: theta'; ``ref_logprobs``: the reference).

    A forward-only pass over this rank's micro-batches gives its samples; a sum all-reduce over DP
    of a zero-filled [N] vector (each sample lives on one DP rank) gives every rank all of them:
    the detached exchange of GVPO's delta and of the preference margins (group ids are known
    everywhere already).
    """
    out = torch.zeros(num_samples, dtype=torch.float64)
    logprobs = compute_logprobs(model, micro_batches, temperature=temperature)
    for lp, mb in zip(logprobs, micro_batches, strict=True):
        base = sequence_old_logprobs(mb, baseline).double().cpu()
        out[mb.extra["sample_ids"]] = sequence_logprobs(lp, mb).double().cpu() - base
    return sum_over_dp(out, next(model.parameters()).device)
