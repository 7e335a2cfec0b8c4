"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Drop-in for megatron-core's local ``DotProductAttention`` (same constructor and forward), used in
the local layer spec when Transformer Engine is absent. It needs no CUDA memory buffer, handles
GQA, and supports packed sequences (``PackedSeqParams`` with ``cu_seqlens_q``) with a
block-diagonal causal mask, so the CPU path can train on packed batches like TE does on GPU.
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
            # One causal attention per packed sequence: cost sum(len^2), not (sum len)^2.
            cu = packed_seq_params.cu_seqlens_q.tolist()
            out = torch.cat(
                [
                    self._sdpa(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], None)
                    for a, e in zip(cu[:-1], cu[1:], strict=True)
                    if e > a
                ],
                dim=2,
            )
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


def _tp_world_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()
