"""Vocab-parallel per-token log-probabilities and entropy, chunked to bound memory.

Each tensor-parallel (TP) rank holds the logits of its own vocabulary slice
``[tp_rank * V_local, (tp_rank + 1) * V_local)``. Log-softmax statistics are combined across the
TP group one chunk of tokens at a time (an all-reduce MAX, then one all-reduce SUM), so no rank
ever holds a float32 ``[tokens, V_local]`` tensor for all tokens, let alone the full vocabulary.

Backward saves only the input logits (plus a few float32 scalars per token), recomputes the
softmax chunk by chunk and writes the gradient into a single buffer of the logits' shape and
dtype. It needs no communication: every rank's slice of the gradient depends on its own logits and
the per-token statistics saved by forward.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = ["vocab_parallel_logprobs"]


def _resolve_group(
    tp_group: dist.ProcessGroup | None,
) -> tuple[dist.ProcessGroup | None, int, int]:
    """Return (group, world size, rank) of the TP group; (None, 1, 0) means no communication."""
    if tp_group is None:
        # Only look at megatron's state when it has been imported: if it has not, model
        # parallelism cannot be initialised, and importing it costs seconds.
        ps = sys.modules.get("megatron.core.parallel_state")
        if ps is not None and ps.model_parallel_is_initialized():
            tp_group = ps.get_tensor_model_parallel_group()
    if tp_group is None or not dist.is_initialized():
        return None, 1, 0
    world = dist.get_world_size(tp_group)
    if world == 1:
        return None, 1, 0
    return tp_group, world, dist.get_rank(tp_group)


def _local_target(
    target: torch.Tensor, vocab_start: int, n_valid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each target in this rank's slice (clamped in range) and whether the rank owns it."""
    local = target - vocab_start
    owned = (local >= 0) & (local < n_valid)
    return local.clamp(0, max(n_valid - 1, 0)), owned


def _tempered_minus(
    chunk: torch.Tensor, shift: torch.Tensor, temperature: float, cdt: torch.dtype
) -> torch.Tensor:
    """New ``cdt`` tensor ``chunk / T - shift[:, None]``, one upcast copy then in-place ops.

    (A mixed-dtype ``torch.sub(chunk, shift)`` would save a pass on CUDA, but on CPU it
    materialises an extra float32 copy of the chunk.) ``copy=True``: an input already in ``cdt``
    must not be modified.
    """
    out = chunk.to(cdt, copy=True)
    if temperature != 1.0:
        out.div_(temperature)
    return out.sub_(shift.unsqueeze(-1))


class _VocabParallelLogprobs(torch.autograd.Function):
    """Autograd function behind :func:`vocab_parallel_logprobs` (flattened tokens)."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        group: dist.ProcessGroup | None,
        vocab_start: int,
        n_valid: int,
        temperature: float,
        chunk_size: int,
        want_entropy: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        n_tokens = logits.shape[0]
        cdt = torch.promote_types(logits.dtype, torch.float32)
        dev = logits.device
        logz = torch.empty(n_tokens, dtype=cdt, device=dev)
        logprobs = torch.empty(n_tokens, dtype=cdt, device=dev)
        entropy = torch.empty(n_tokens, dtype=cdt, device=dev) if want_entropy else None

        for c0 in range(0, n_tokens, chunk_size):
            c1 = min(c0 + chunk_size, n_tokens)
            chunk = logits[c0:c1, :n_valid]
            if n_valid > 0:
                zmax = chunk.amax(dim=-1).to(cdt).div_(temperature)  # max commutes with / T > 0
            else:
                zmax = torch.full((c1 - c0,), float("-inf"), dtype=cdt, device=dev)
            if group is not None:
                dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
            z = _tempered_minus(chunk, zmax, temperature, cdt)  # z - max <= 0

            idx, owned = _local_target(target[c0:c1], vocab_start, n_valid)
            if n_valid > 0:
                z_tgt = z.gather(1, idx.unsqueeze(-1)).squeeze(-1)
                z_tgt = torch.where(owned, z_tgt, torch.zeros_like(z_tgt))
            else:
                z_tgt = torch.zeros(c1 - c0, dtype=cdt, device=dev)

            if want_entropy:
                e = torch.exp(z)
                sum_e = e.sum(dim=-1)
                sum_ez = e.mul_(z).sum(dim=-1)
                del e
                stats = torch.stack([sum_e, z_tgt, sum_ez])
            else:
                sum_e = z.exp_().sum(dim=-1)
                stats = torch.stack([sum_e, z_tgt])
            del z
            if group is not None:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)

            log_sum = stats[0].log()
            logprobs[c0:c1] = stats[1] - log_sum
            logz[c0:c1] = zmax + log_sum
            if entropy is not None:
                # H = -sum p log p = log S - sum(e (z - max)) / S
                entropy[c0:c1] = log_sum - stats[2] / stats[0]

        ctx.save_for_backward(logits, target, logz, entropy)
        ctx.vocab_start = vocab_start
        ctx.n_valid = n_valid
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)

        logprobs = logprobs.float()
        if entropy is None:
            return logprobs
        return logprobs, entropy.float()

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: torch.Tensor | None):
        logits, target, logz, entropy = ctx.saved_tensors
        g_lp = grad_outputs[0]
        g_ent = grad_outputs[1] if len(grad_outputs) > 1 else None
        if g_lp is None and g_ent is None:
            return (None,) * 8

        cdt = logz.dtype
        n_tokens, v_local = logits.shape
        n_valid, temp, chunk_size = ctx.n_valid, ctx.temperature, ctx.chunk_size
        # Upstream gradients with the chain-rule factor 1/T (and the sign) folded in.
        g_lp = g_lp.to(cdt) / temp if g_lp is not None else None
        g_ent = g_ent.to(cdt) / temp if g_ent is not None else None
        neg_lp = -g_lp if g_lp is not None else None
        neg_ent = -g_ent if g_ent is not None else None

        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if n_valid < v_local:
            grad[:, n_valid:].zero_()  # vocabulary padding: no gradient
        for c0 in range(0, n_tokens, chunk_size):
            c1 = min(c0 + chunk_size, n_tokens)
            # log p = z - logZ, recomputed for this chunk only.
            x = _tempered_minus(logits[c0:c1, :n_valid], logz[c0:c1], temp, cdt)
            # d/dlogits_j of g_lp * logp_t + g_ent * H
            #   = (g_lp 1[j==t] - p_j (g_lp + g_ent (log p_j + H))) / T
            if g_ent is None:
                x.exp_().mul_(neg_lp[c0:c1].unsqueeze(-1))
            else:
                p = torch.exp(x)
                x.add_(entropy[c0:c1].unsqueeze(-1)).mul_(neg_ent[c0:c1].unsqueeze(-1))
                if g_lp is not None:
                    x.add_(neg_lp[c0:c1].unsqueeze(-1))
                x.mul_(p)
                del p
            if g_lp is not None and n_valid > 0:
                idx, owned = _local_target(target[c0:c1], ctx.vocab_start, n_valid)
                hit = torch.where(owned, g_lp[c0:c1], torch.zeros_like(g_lp[c0:c1]))
                x.scatter_add_(1, idx.unsqueeze(-1), hit.unsqueeze(-1))
            grad[c0:c1, :n_valid].copy_(x)
            del x
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    true_vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (and entropy) of ``target`` under vocab-parallel ``logits``.

    Args:
        logits: ``[..., V_local]``, this TP rank's slice of the (padded) vocabulary, columns
            ``[tp_rank * V_local, (tp_rank + 1) * V_local)``; any float dtype, may require grad.
            Leading dims that cannot be flattened without a copy (a non-contiguous slice) are copied
            once in the logits' dtype; pass contiguous logits to avoid that.
        target: ``[...]`` (= ``logits.shape[:-1]``) integer GLOBAL token ids. Precondition, not
            checked (a check would synchronise the device): ``0 <= target < true_vocab_size``.
            There is no ignore index; mask unwanted positions in the loss instead.
        tp_group: the TP process group. None: megatron's tensor-model-parallel group when model
            parallelism is initialised, else a single rank (no communication).
        true_vocab_size: global columns ``>= true_vocab_size`` are vocabulary padding and never
            affect the result (they are left out of the softmax, i.e. treated as -inf, and get a
            zero gradient). None: no padding.
        temperature: logits are divided by it before the softmax.
        chunk_size: tokens per chunk. Memory beyond the inputs and the logits' gradient is one
            float32 ``[chunk_size, V_local]`` buffer (two with ``return_entropy``).
        return_entropy: also return the entropy of the tempered distribution.

    Returns:
        float32 log-probabilities of shape ``target.shape``, and with ``return_entropy`` the
        float32 entropies of the same shape. Gradients may flow from either output or both.
    """
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor [..., V_local], got {logits.dtype}")
    if tuple(logits.shape[:-1]) != tuple(target.shape):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal logits.shape[:-1] = "
            f"{tuple(logits.shape[:-1])}"
        )
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must hold integer token ids, got {target.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    group, world, rank = _resolve_group(tp_group)
    v_local = logits.shape[-1]
    padded_vocab = v_local * world
    if true_vocab_size is None:
        true_vocab_size = padded_vocab
    if not 0 < true_vocab_size <= padded_vocab:
        raise ValueError(
            f"true_vocab_size={true_vocab_size} must be in [1, V_local * tp = {padded_vocab}]"
        )
    vocab_start = rank * v_local
    n_valid = min(max(true_vocab_size - vocab_start, 0), v_local)

    out_shape = target.shape
    flat_logits = logits.reshape(-1, v_local)
    flat_target = target.reshape(-1).to(torch.long)
    out = _VocabParallelLogprobs.apply(
        flat_logits,
        flat_target,
        group,
        vocab_start,
        n_valid,
        float(temperature),
        int(chunk_size),
        bool(return_entropy),
    )
    if return_entropy:
        logprobs, entropy = out
        return logprobs.view(out_shape), entropy.view(out_shape)
    return out.view(out_shape)
