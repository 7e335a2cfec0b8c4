"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Drop-in for megatron-core's local ``DotProductAttention`` (same constructor and forward), used in
the local layer spec when Transformer Engine is absent. It needs no CUDA memory buffer, handles
GQA, and supports packed sequences (``PackedSeqParams`` with ``cu_seqlens_q``), so the CPU path
can train on packed batches like TE does on GPU.

Packed sequences are regrouped into a few right-padded batches of similar lengths (one gather in,
one gather out) and each batch is one causal SDPA call: right padding never enters a real token's
causal window, so no mask is needed. Measured on the CPU (``tools/bench_attention.py``,
``docs/benchmarks.md``): one SDPA call per sequence cost a slice and, in backward, a zero-filled
full-size gradient per sequence and layer, O(sequences x tokens); a single block-diagonal mask
costs (sum len)^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Causal self-attention core: [sq, b, np, hn] x [sk, b, ng, hn] -> [sq, b, np * hn]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the TE spec")
        tp_size = pg_collection.tp.size() if pg_collection is not None else _tp_world_size()
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention bias")
        if packed_seq_params is not None and query.dim() == 3:
            # THD layout [t, np, hn]: add the batch dim megatron drops for packed sequences.
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        sq, b = query.shape[0], query.shape[1]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if packed_seq_params is not None and attention_mask is None and b == 1 and sq == k.shape[2]:
            # Packed sequences: batched by length (see PaddedSegments), cost ~ sum(len^2).
            segs = padded_segments(packed_seq_params.cu_seqlens_q, sq)
            out = segs.unpad([self._sdpa(*segs.pad(q, k, v, i), None) for i in segs.buckets()])
        else:
            mask = self._mask(sq, k.shape[2], b, attention_mask, packed_seq_params, q.device)
            out = self._sdpa(q, k, v, mask)
        out = out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            out = out.squeeze(1)
        return out

    def _sdpa(self, q, k, v, mask):
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=mask is None,
            scale=self.softmax_scale,
            enable_gqa=self.num_heads != self.num_groups,
        )

    def _mask(self, sq, sk, b, attention_mask, packed_seq_params, device):
        """Boolean mask (True = attend) or None for plain causal attention."""
        if packed_seq_params is None and attention_mask is None:
            return None
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
        allowed = allowed.view(1, 1, sq, sk)
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q.to(device)
            pos = torch.arange(sq, device=device)
            seg = torch.bucketize(pos, cu[1:], right=True)
            allowed = allowed & (seg.view(-1, 1) == seg.view(1, -1)).view(1, 1, sq, sk)
        if attention_mask is not None:
            # megatron convention: True marks a masked-out position.
            allowed = allowed & ~attention_mask.bool()
            # A fully masked row (padding) would give NaN; let it see itself, its output is unused.
            allowed = allowed | torch.eye(sq, sk, dtype=torch.bool, device=device)
        return allowed


# A segment joins a bucket when it is at most this many tokens, or this fraction of the bucket's
# longest, shorter than that longest: short rows share calls (a call costs more than their padding),
# long ones are padded by at most 10% (measured: tools/bench_attention.py).
_PAD_SLACK_TOKENS = 32
_PAD_SLACK_FRACTION = 0.1


class PaddedSegments:
    """Where the segments of one packed row go in length-bucketed, right-padded batches.

    ``gathers[i]``: ``[n_i, L_i]`` packed positions of bucket i's rows (padding repeats a row's
    last position; its outputs are discarded). ``inverse``: ``[T]`` position of every packed token
    in the buckets' concatenated ``n_i * L_i`` rows.
    """

    def __init__(self, cu: list[int], total: int):
        if cu[-1] < total:
            cu = [*cu, total]  # tokens past the last boundary: one more segment
        segs = [(a, e) for a, e in zip(cu[:-1], cu[1:], strict=True) if e > a]
        segs.sort(key=lambda s: s[0] - s[1])  # longest first (stable)
        buckets: list[list[tuple[int, int]]] = []
        for seg in segs:
            longest = buckets[-1][0][1] - buckets[-1][0][0] if buckets else 0
            slack = max(_PAD_SLACK_TOKENS, _PAD_SLACK_FRACTION * longest)
            if buckets and longest - (seg[1] - seg[0]) <= slack:
                buckets[-1].append(seg)
            else:
                buckets.append([seg])
        inverse = [0] * total
        self.gathers: list[torch.Tensor] = []
        offset = 0
        for bucket in buckets:
            width = bucket[0][1] - bucket[0][0]
            rows = []
            for a, e in bucket:
                rows.append([min(a + j, e - 1) for j in range(width)])
                inverse[a:e] = range(offset, offset + e - a)
                offset += width
            self.gathers.append(torch.tensor(rows, dtype=torch.long))
        self.inverse = torch.tensor(inverse, dtype=torch.long)

    def buckets(self) -> range:
        return range(len(self.gathers))

    def pad(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int):
        """Bucket ``i`` of ``[1, h, T, d]`` tensors as ``[n_i, h, L_i, d]`` (gathered along T in
        the ``[T, h, d]`` layout megatron's projections produce, so rows stay contiguous)."""
        idx = self.gathers[i].to(q.device)
        return tuple(x[0].transpose(0, 1)[idx].transpose(1, 2) for x in (q, k, v))

    def unpad(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """``[n_i, h, L_i, d]`` per bucket -> the packed ``[1, h, T, d]``."""
        flat = [o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3]) for o in outs]
        flat = flat[0] if len(flat) == 1 else torch.cat(flat, dim=0)
        return flat[self.inverse.to(flat.device)].transpose(0, 1).unsqueeze(0)


_last_segments: tuple[torch.Tensor, int, PaddedSegments] | None = None


def padded_segments(cu_seqlens: torch.Tensor, total: int) -> PaddedSegments:
    """:class:`PaddedSegments` of ``cu_seqlens``; every layer of a forward passes the same tensor,
    so the last one is kept (held, and compared by identity)."""
    global _last_segments
    if _last_segments is None or _last_segments[0] is not cu_seqlens or _last_segments[1] != total:
        _last_segments = (cu_seqlens, total, PaddedSegments(cu_seqlens.tolist(), total))
    return _last_segments[2]


def _tp_world_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()
