"""Hugging Face <-> Megatron-Core parameter names and layouts for llama/mistral/qwen2/qwen3 and
the mixtures of experts qwen2_moe/qwen3_moe.

Megatron names here are *global* (layer index over the whole model, not per pipeline stage;
expert index over all experts, not per expert-parallel rank) and *full* (not split over TP). TP splitting and merging live in :mod:`megatron_gvpo.bridge.tp`.
Both spellings of the norms are accepted: the local spec's ``input_layernorm.weight`` and
Transformer Engine's fused ``self_attention.linear_qkv.layer_norm_weight``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from megatron_gvpo.models.hf_config import HFArch

# TE fuses the pre-attention / pre-MLP norms into the following linear; map to the local names.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LOCAL_TO_TE = {v: k for k, v in _TE_TO_LOCAL.items()}

# Per-layer 1:1 renames (megatron suffix -> HF suffix).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    # qwen2_moe's shared expert (megatron-core SharedExpertMLP) and its sigmoid gate, [1, hidden]
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_expert.down_proj.weight",
    "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Routed experts (megatron-core SequentialMLP) and HF's per-expert layout (transformers 5 saves
# ``mlp.experts.{e}.{gate,up,down}_proj.weight`` as Hub checkpoints have them).
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_HF_EXPERT_RE = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$"
)


def is_expert_param(name: str) -> bool:
    """Whether ``name`` is a routed expert's weight (split over EP and expert-TP ranks)."""
    return ".mlp.experts.local_experts." in name


def canonical_name(name: str) -> str:
    """Map a TE-spec parameter name to the local-spec spelling (other names unchanged)."""
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _TE_TO_LOCAL:
        return f"decoder.layers.{m.group(1)}.{_TE_TO_LOCAL[m.group(2)]}"
    return name


def te_name(name: str) -> str:
    """Map a local-spec parameter name to the TE-spec spelling (other names unchanged)."""
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LOCAL_TO_TE:
        return f"decoder.layers.{m.group(1)}.{_LOCAL_TO_TE[m.group(2)]}"
    return name


def is_checkpoint_only(name: str) -> bool:
    """TE's FP8 metadata (``_extra_state``) is not a weight and has no HF counterpart."""
    return name.endswith("_extra_state")


def hf_names(mcore_name: str, arch: HFArch) -> list[str]:
    """The HF tensor names one Megatron parameter is built from (in merge order)."""
    name = canonical_name(mcore_name)
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if name == "output_layer.weight":
        # With tied embeddings the last PP stage still holds a copy named output_layer.weight.
        return ["model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"]
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    m = _LAYER_RE.match(name)
    if not m:
        raise KeyError(f"no HF mapping for Megatron parameter {mcore_name!r}")
    i, suffix = int(m.group(1)), m.group(2)
    pre = f"model.layers.{i}."
    if suffix in _LAYER_RENAMES:
        return [pre + _LAYER_RENAMES[suffix]]
    if suffix == "self_attention.linear_qkv.weight":
        return [pre + f"self_attn.{p}_proj.weight" for p in "qkv"]
    if suffix == "self_attention.linear_qkv.bias":
        return [pre + f"self_attn.{p}_proj.bias" for p in "qkv"]
    if suffix == "mlp.linear_fc1.weight":
        return [pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"]
    if suffix == "mlp.shared_experts.linear_fc1.weight":
        return [
            pre + "mlp.shared_expert.gate_proj.weight",
            pre + "mlp.shared_expert.up_proj.weight",
        ]
    if suffix == "mlp.router.weight":
        return [pre + "mlp.gate.weight"]
    e = _EXPERT_RE.match(suffix)
    if e:
        expert = f"{pre}mlp.experts.{e.group(1)}."
        if e.group(2) == "linear_fc1":
            return [expert + "gate_proj.weight", expert + "up_proj.weight"]
        return [expert + "down_proj.weight"]
    raise KeyError(f"no HF mapping for Megatron parameter {mcore_name!r}")


def mcore_names(arch: HFArch) -> list[str]:
    """Every Megatron parameter (global, local spelling) of the full model, in model order."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(arch.num_layers):
        pre = f"decoder.layers.{i}."
        names += [pre + "input_layernorm.weight", pre + "self_attention.linear_qkv.weight"]
        if arch.add_qkv_bias:
            names.append(pre + "self_attention.linear_qkv.bias")
        if arch.qk_layernorm:
            names += [
                pre + "self_attention.q_layernorm.weight",
                pre + "self_attention.k_layernorm.weight",
            ]
        names += [pre + "self_attention.linear_proj.weight", pre + "pre_mlp_layernorm.weight"]
        if arch.is_moe_layer(i):
            names.append(pre + "mlp.router.weight")
            for e in range(arch.num_experts):
                names += [
                    pre + f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                    pre + f"mlp.experts.local_experts.{e}.linear_fc2.weight",
                ]
            if arch.shared_expert_ffn_hidden_size:
                names += [
                    pre + "mlp.shared_experts.linear_fc1.weight",
                    pre + "mlp.shared_experts.linear_fc2.weight",
                    pre + "mlp.shared_experts.gate_weight",
                ]
        else:
            names += [pre + "mlp.linear_fc1.weight", pre + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def fused_expert_source(hf_name: str) -> tuple[str, int, slice | None] | None:
    """Where a per-expert HF tensor sits in transformers' fused 3-D expert layout, if it could.

    ``model.layers.L.mlp.experts.E.gate_proj.weight`` is ``experts.gate_up_proj[E, :I]``, its
    ``up_proj`` ``[E, I:]`` (``gate_up_proj`` is [experts, 2 x moe_intermediate, hidden], gate
    first, as transformers' ``Qwen3MoeExperts`` holds it) and ``down_proj`` is
    ``experts.down_proj[E]``. Returns (fused name, expert, half) with half None for the whole
    row, or None for a name that is not a per-expert weight.
    """
    m = _HF_EXPERT_RE.match(hf_name)
    if not m:
        return None
    base, expert, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj == "down":
        return f"{base}.down_proj", expert, None
    return f"{base}.gate_up_proj", expert, slice(0, 1) if proj == "gate" else slice(1, 2)


def read_fused_expert(hf_name: str, get_hf: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """A per-expert HF tensor cut out of the fused layout (see :func:`fused_expert_source`)."""
    fused, expert, half = fused_expert_source(hf_name)
    row = get_hf(fused)[expert]
    return row if half is None else row.chunk(2, dim=0)[half.start]


def unfuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with transformers' fused 3-D expert tensors (``mlp.experts.gate_up_proj``,
    ``mlp.experts.down_proj``, e.g. a model's in-memory parameters or their gradients) replaced
    by the per-expert names a checkpoint uses (views: writing one writes the fused tensor)."""
    out = {}
    for name, t in tensors.items():
        base, _, leaf = name.rpartition(".")
        if not base.endswith("mlp.experts") or leaf not in ("gate_up_proj", "down_proj"):
            out[name] = t
            continue
        for e in range(t.shape[0]):
            if leaf == "down_proj":
                out[f"{base}.{e}.down_proj.weight"] = t[e]
            else:
                gate, up = t[e].chunk(2, dim=0)
                out[f"{base}.{e}.gate_proj.weight"] = gate
                out[f"{base}.{e}.up_proj.weight"] = up
    return out


def hf_to_mcore(
    mcore_name: str, get_hf: Callable[[str], torch.Tensor], arch: HFArch, padded_vocab: int
) -> torch.Tensor:
    """Build the full Megatron tensor for ``mcore_name`` from HF tensors fetched by ``get_hf``."""
    parts = [get_hf(n) for n in hf_names(mcore_name, arch)]
    name = canonical_name(mcore_name)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return _interleave_qkv(*parts, arch)
    if name.endswith("linear_fc1.weight"):
        return torch.cat(parts, dim=0)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return _pad_vocab(parts[0], padded_vocab)
    return parts[0]


def mcore_to_hf(mcore_name: str, full: torch.Tensor, arch: HFArch) -> dict[str, torch.Tensor]:
    """Split a full Megatron tensor back into its HF tensors (vocab padding removed)."""
    names = hf_names(mcore_name, arch)
    name = canonical_name(mcore_name)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return dict(zip(names, _split_qkv(full, arch), strict=True))
    if name.endswith("linear_fc1.weight"):
        return dict(zip(names, full.chunk(2, dim=0), strict=True))
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return {names[0]: full[: arch.vocab_size]}
    return {names[0]: full}


def _interleave_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: HFArch
) -> torch.Tensor:
    """[q; k; v] -> megatron's per-query-group layout [q_g0 (n heads), k_g0, v_g0, q_g1, ...]."""
    g, d = arch.num_query_groups, arch.head_dim
    n = arch.num_attention_heads // g
    rest = q.shape[1:]
    q = q.reshape(g, n * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(g * (n + 2) * d, *rest)


def _split_qkv(qkv: torch.Tensor, arch: HFArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = arch.num_query_groups, arch.head_dim
    n = arch.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (n + 2) * d, *rest)
    q, k, v = grouped.split([n * d, d, d], dim=1)
    return (
        q.reshape(g * n * d, *rest).contiguous(),
        k.reshape(g * d, *rest).contiguous(),
        v.reshape(g * d, *rest).contiguous(),
    )


def _pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    if weight.shape[0] == padded_vocab:
        return weight
    pad = weight.new_zeros(padded_vocab - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)
