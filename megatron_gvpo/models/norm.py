"""RMSNorm for the local (non-TE) layer spec, numerically the same as Hugging Face's."""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(MegatronModule):
    """``weight * x / rms(x)`` computed in fp32 and cast back, as ``LlamaRMSNorm`` does.

    A ``MegatronModule`` (not a bare ``torch.nn.RMSNorm``), so its sharded state dict carries the
    pipeline layer offset like every other megatron module and checkpoints reshard across PP.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # The weight is replicated over TP: megatron's grad sync and checkpointing look for this.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
