"""RoPE on packed sequences from per-token positions, one gather instead of a loop per sequence.

megatron-core's unfused ``thd`` RoPE (``rope_utils._apply_rotary_pos_emb_thd``, the path without
TE's fused kernel, i.e. the CPU path) splits the packed tokens per sequence, slices the frequency
table for each and concatenates the slices: a Python loop over the sequences, per layer, for
queries and keys, forward only but with a ``tolist`` and 2 x sequences small ops each time. With
one context-parallel rank the result is ``freqs`` read at each token's position, so this module
builds the positions once per call with tensor ops (``arange`` minus each sequence's start),
gathers the table rows, and applies the same ``_apply_rotary_pos_emb_bshd`` to the whole row:
the same values in the same operation, bit for bit (tests/test_fast_paths.py). Context
parallelism (several CP ranks) keeps megatron's own function.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

_megatron_thd = rope_utils._apply_rotary_pos_emb_thd


def packed_freqs(cu_seqlens: torch.Tensor, freqs: torch.Tensor, total: int) -> torch.Tensor | None:
    """``freqs`` rows for each of ``total`` packed tokens (one CP rank), or None when the
    boundaries do not cover exactly ``total`` tokens (megatron's function then decides)."""
    cu = cu_seqlens.to(device=freqs.device, dtype=torch.long)
    seqlens = cu[1:] - cu[:-1]
    if int(seqlens.sum()) != total:
        return None
    if freqs.dim() >= 1 and freqs.size(0) == cu[-1]:
        # megatron's exact-mapping case: sequence i reads freqs[cu[i] : cu[i + 1]]
        return freqs[int(cu[0]) : int(cu[-1])]
    starts = torch.repeat_interleave(cu[:-1] - cu[0], seqlens, output_size=total)
    return freqs[torch.arange(total, device=freqs.device) - starts]


def apply_rotary_pos_emb_thd(
    t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    freqs: torch.Tensor,
    rotary_interleaved: bool = False,
    mscale: float = 1.0,
    cp_group: torch.distributed.ProcessGroup = None,
    **mla: bool | None,
) -> torch.Tensor:
    """Drop-in for megatron-core's ``_apply_rotary_pos_emb_thd`` (same arguments, same result).

    ``mla``: the MLA interleaving flag under the installed release's name
    (``multi_latent_attention`` in 0.16, ``mla_rotary_interleaved`` from 0.17), passed on as
    given to megatron's functions, which take it under the same name."""
    per_token = None
    if cp_group is not None and cp_group.size() == 1:
        per_token = packed_freqs(cu_seqlens, freqs, t.size(0))
    if per_token is None:
        return _megatron_thd(
            t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved, mscale=mscale,
            cp_group=cp_group, **mla,
        )
    return rope_utils._apply_rotary_pos_emb_bshd(
        t.unsqueeze(1), per_token, rotary_interleaved=rotary_interleaved, mscale=mscale, **mla
    ).squeeze(1)


def install_packed_rope() -> None:
    """Route megatron-core's unfused packed RoPE through :func:`apply_rotary_pos_emb_thd`
    (idempotent; ``rope_utils.apply_rotary_pos_emb`` looks the function up at each call)."""
    rope_utils._apply_rotary_pos_emb_thd = apply_rotary_pos_emb_thd
