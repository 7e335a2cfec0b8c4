"""Megatron-Core ``GPTModel`` from an HF architecture (llama, mistral, qwen2, qwen3, qwen3_moe)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_gvpo.models.fp8 import FP8Config
from megatron_gvpo.models.hf_config import HFArch, check_parallel_layout, padded_vocab_size
from megatron_gvpo.models.moe import (
    MoEConfig,
    moe_transformer_config_kwargs,
    patch_router_gemm_without_te,
)
from megatron_gvpo.models.rope import install_packed_rope
from megatron_gvpo.models.specs import layer_spec, te_available

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelConfig:
    """How to build the actor: precision, spec, vocab padding, sequence length."""

    precision: str = "fp32"  # fp32 | bf16 | fp16
    transformer_impl: str = "auto"  # auto | transformer_engine | local
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: int | None = None  # set from a checkpoint so TP changes keep its shape
    max_sequence_length: int | None = None
    recompute_granularity: str | None = None  # None | "full" | "selective"
    use_cpu_initialization: bool | None = None  # default: True without CUDA
    fp8: FP8Config = field(default_factory=FP8Config)  # FP8 GEMMs through Transformer Engine
    moe: MoEConfig = field(default_factory=MoEConfig)  # router losses, token dispatcher

    @property
    def dtype(self) -> torch.dtype:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"model.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}"
            )
        return PRECISIONS[self.precision]


# megatron-core's default CUDA-graph capture scope "full" is deprecated (a warning per model);
# [] means the same. 0.19 renamed the field from cuda_graph_scope to cuda_graph_modules.
_CUDA_GRAPH_FIELD = (
    "cuda_graph_modules"
    if "cuda_graph_modules" in TransformerConfig.__dataclass_fields__
    else "cuda_graph_scope"
)


def transformer_config(
    arch: HFArch,
    cfg: ModelConfig,
    tp: int,
    pp: int,
    perform_initialization: bool = True,
    ep: int = 1,
    etp: int | None = None,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` equivalent to the HF architecture (dropout off for RL)."""
    etp = tp if etp is None else etp
    check_parallel_layout(arch, tp, pp, ep=ep, etp=etp)
    dtype = cfg.dtype
    cfg.fp8.validate(cfg.precision, cfg.transformer_impl)
    cfg.fp8.check_layers(arch.num_layers, pp)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Losses arrive normalised for the whole step (trainer/objectives): megatron's schedule
        # must not divide by the number of micro-batches, nor DDP by the DP size.
        calculate_per_token_loss=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # megatron-core's MoE layer refuses to train under TP without sequence parallelism
        # (moe_layer.py); dense models keep the activations replicated over TP.
        sequence_parallel=arch.is_moe and tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        autocast_dtype=dtype,
        perform_initialization=perform_initialization,
        use_cpu_initialization=(
            not on_gpu if cfg.use_cpu_initialization is None else cfg.use_cpu_initialization
        ),
        # Fused kernels need CUDA (and apex/TE); keep them off on the CPU.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **{_CUDA_GRAPH_FIELD: []},
        recompute_granularity=cfg.recompute_granularity,
        recompute_method="uniform" if cfg.recompute_granularity == "full" else None,
        recompute_num_layers=1 if cfg.recompute_granularity == "full" else None,
        **cfg.fp8.transformer_config_kwargs(),
        **moe_transformer_config_kwargs(arch, cfg.moe, ep, etp),
    )


def build_gpt_model(
    arch: HFArch,
    cfg: ModelConfig,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    perform_initialization: bool = True,
) -> GPTModel:
    """Build this rank's GPTModel stage under the initialised parallel_state groups.

    ``perform_initialization=False`` skips random init when weights are loaded right after.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    config = transformer_config(arch, cfg, tp, pp, perform_initialization, ep=ep, etp=etp)
    use_te = _resolve_impl(cfg.transformer_impl)
    if arch.is_moe:
        patch_router_gemm_without_te()
    if not config.apply_rope_fusion:
        install_packed_rope()  # packed RoPE from positions, not a loop per sequence
    vocab = cfg.padded_vocab_size or padded_vocab_size(
        arch.vocab_size, tp, cfg.make_vocab_size_divisible_by
    )
    if vocab % tp or vocab < arch.vocab_size:
        raise ValueError(
            f"model.padded_vocab_size={vocab} must be >= vocab_size={arch.vocab_size} "
            f"and divisible by tp={tp}"
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    rope_scaling = arch.rope_scaling or {}
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_te, config),
        vocab_size=vocab,
        max_sequence_length=cfg.max_sequence_length or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta)
        if float(arch.rope_theta).is_integer()
        else arch.rope_theta,
        rope_scaling=bool(rope_scaling),
        rope_scaling_factor=rope_scaling.get("factor", 8.0),
    )
    if rope_scaling:
        _set_llama3_inv_freq(model, arch)
    if not perform_initialization:
        mark_tensor_parallel_params(model)
    model.true_vocab_size = arch.vocab_size
    return model


def mark_tensor_parallel_params(model: torch.nn.Module) -> None:
    """Tag TP-sharded weights with megatron's tensor-parallel attributes.

    megatron-core sets ``tensor_model_parallel`` only inside its random initialisation
    (``_initialize_affine_weight_cpu/gpu``); with ``perform_initialization=False`` (weights loaded
    right after) the attribute is never set. Gradient-norm and clipping then take every sharded
    weight for a TP duplicate and count only TP rank 0's shard: at TP2 the demo's grad norm read
    62.9 instead of 84.5, and clipping scaled the update differently from TP1.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dims = {"weight": 0, "bias": 0}
        elif isinstance(module, RowParallelLinear):
            dims = {"weight": 1}  # its bias is added after the reduction: not sharded
        else:
            continue
        for name, dim in dims.items():
            param = getattr(module, name, None)
            if isinstance(param, torch.nn.Parameter) and not getattr(
                param, "tensor_model_parallel", False
            ):
                set_tensor_model_parallel_attributes(param, True, dim, 1)


def _resolve_impl(impl: str) -> bool:
    if impl == "auto":
        return te_available()
    if impl == "transformer_engine":
        if not te_available():
            raise RuntimeError(
                "model.transformer_impl=transformer_engine needs CUDA and transformer_engine; "
                "install the 'gpu' extra or use model.transformer_impl=local"
            )
        return True
    if impl == "local":
        return False
    raise ValueError(f"model.transformer_impl={impl!r}: use auto, transformer_engine or local")


def llama3_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3 scaling for any factor/low/high/original settings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled).float()


def _set_llama3_inv_freq(model: GPTModel, arch: HFArch) -> None:
    """megatron-core hard-codes low=1, high=4, original=8192; apply the config's own values."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        return
    inv = llama3_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
    rope.inv_freq = inv.to(rope.inv_freq.device)
