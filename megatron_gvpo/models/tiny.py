"""Tiny random-weight HF models of each supported family, for tests, demos and benchmarks."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# Small but not degenerate: GQA, a vocabulary that needs padding, each family's own feature.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=250,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)
# The MoE families' shared shape: two layers, the first dense (mlp_only_layers), the second with
# 4 routed experts, top-2.
_TINY_MOE = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=24,
    mlp_only_layers=[0],
    rope_parameters=dict(rope_type="default", rope_theta=1e6),
)

TINY_FAMILIES = {
    # Llama-3 rope scaling with a short original context, so the scaled band is exercised.
    "llama": dict(
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "qwen2": dict(
        tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6)
    ),
    "qwen3": dict(head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "mistral": dict(sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=1e4)),
    "qwen3_moe": dict(_TINY_MOE, head_dim=16, norm_topk_prob=True),
    # plus a shared expert (width 40) behind its sigmoid gate; q/k/v biases, no q/k norms, top-k
    # probabilities not renormalised (transformers' defaults)
    "qwen2_moe": dict(_TINY_MOE, shared_expert_intermediate_size=40, norm_topk_prob=False),
}


def tiny_hf_config(family: str, **overrides):
    """A transformers config of ``family`` (llama, qwen2, qwen3, mistral, qwen3_moe, qwen2_moe) at
    tiny size."""
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise ValueError(f"family {family!r}: choose one of {', '.join(TINY_FAMILIES)}")
    # a copy: the families share nested values (rope_parameters, mlp_only_layers)
    kwargs = copy.deepcopy({**_COMMON, **TINY_FAMILIES[family], **overrides})
    return AutoConfig.for_model(family, **kwargs)


def save_tiny_hf_model(
    out_dir: str | Path, family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> Path:
    """Write a random-init tiny model (safetensors) of ``family`` to ``out_dir``; return the path."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Non-trivial norms (HF initialises them to 1), so a mis-mapped norm cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
                # HF initialises the router to zero: every expert ties. Spread the logits so the
                # top-k choice is decided and a mis-mapped router or expert shows (and the
                # shared expert's gate moves away from a constant sigmoid of about 0.5).
                p.normal_(0.0, 0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
