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
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

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
    """The decoder spec for ``arch``: TE fused modules, or local linears + SDPA + our RMSNorm.

    A mixture-of-experts model gets one spec per layer of this pipeline stage, dense or routed
    as ``arch.moe_layers`` says; its experts are megatron-core's ``SequentialMLP`` (one linear
    pair per expert, named ``experts.local_experts.{e}``) under both backends.
    """
    if arch.is_moe:
        return _moe_block_spec(arch, use_te, config)
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    spec = _local_layer_spec(arch)
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm
    )


def _local_layer_spec(arch: HFArch, num_experts: int | None = None) -> ModuleSpec:
    """megatron-core's local layer spec with SDPA attention and our RMSNorm."""
    spec = copy.deepcopy(
        get_gpt_layer_local_spec(
            num_experts=num_experts,
            moe_grouped_gemm=False,
            qk_layernorm=arch.qk_layernorm,
            normalization="RMSNorm",
        )
    )
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = SDPAttention
    if arch.qk_layernorm:
        attn.q_layernorm = RMSNorm
        attn.k_layernorm = RMSNorm
    return spec


def _moe_block_spec(
    arch: HFArch, use_te: bool, config: TransformerConfig
) -> TransformerBlockSubmodules:
    """This stage's layers: routed where ``arch.moe_layers`` has a 1, dense elsewhere."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        dense = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
        routed = get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_layernorm
        )
        final_norm = TENorm
    else:
        dense = _local_layer_spec(arch)
        routed = _local_layer_spec(arch, num_experts=arch.num_experts)
        final_norm = RMSNorm
    offset = get_transformer_layer_offset(config)
    specs = [
        routed if arch.is_moe_layer(offset + i) else dense
        for i in range(get_num_layers_to_build(config))
    ]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
