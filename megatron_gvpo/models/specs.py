"""Transformer layer specs: Transformer Engine on GPU, megatron-core local modules + SDPA otherwise."""

from __future__ import annotations

import copy
import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_gvpo.models.hf_config import HFArch
from megatron_gvpo.models.norm import RMSNorm
from megatron_gvpo.models.sdpa_attention import SDPAttention


@functools.cache
def te_available() -> bool:
    """True when CUDA is present and transformer_engine imports."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA extension
        return False
    return True


def layer_spec(
    arch: HFArch, use_te: bool, config: TransformerConfig
) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder spec for ``arch``: TE fused modules, or local linears + SDPA + our RMSNorm."""
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    spec = copy.deepcopy(
        get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    )
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = SDPAttention
    if arch.qk_layernorm:
        attn.q_layernorm = RMSNorm
        attn.k_layernorm = RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm
    )
