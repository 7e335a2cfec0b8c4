"""Unit checks of the model and bridge pieces against independent references."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_gvpo.bridge.mapping import (
    canonical_name,
    hf_to_mcore,
    mcore_names,
    mcore_to_hf,
    te_name,
)
from megatron_gvpo.bridge.tp import tp_shard
from megatron_gvpo.models.gpt import llama3_inv_freq
from megatron_gvpo.models.hf_config import arch_from_dict, padded_vocab_size
from megatron_gvpo.models.tiny import tiny_hf_config


def _arch(family: str):
    return arch_from_dict(tiny_hf_config(family).to_dict())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_every_parameter_maps_to_hf_and_back(family):
    arch = _arch(family)
    g = torch.Generator().manual_seed(0)
    # Realistic names and shapes from transformers itself.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_hf_config(family))
    hf = {n: torch.randn(p.shape, generator=g) for n, p in model.state_dict().items()}
    padded = padded_vocab_size(arch.vocab_size)
    seen = set()
    for name in mcore_names(arch):
        full = hf_to_mcore(name, hf.__getitem__, arch, padded)
        back = mcore_to_hf(name, full, arch)
        for k, v in back.items():
            assert torch.equal(v, hf[k]), (name, k)
            seen.add(k)
    assert seen == set(hf) - ({"lm_head.weight"} if arch.tie_word_embeddings else set())


def test_qkv_layout_is_grouped_per_query_group():
    arch = _arch("llama")  # 4 heads, 2 groups, head_dim 16
    d = arch.head_dim
    q = torch.arange(4 * d).float().unsqueeze(1)
    k = 1000 + torch.arange(2 * d).float().unsqueeze(1)
    v = 2000 + torch.arange(2 * d).float().unsqueeze(1)
    parts = {
        "model.layers.0.self_attn.q_proj.weight": q,
        "model.layers.0.self_attn.k_proj.weight": k,
        "model.layers.0.self_attn.v_proj.weight": v,
    }
    qkv = hf_to_mcore(
        "decoder.layers.0.self_attention.linear_qkv.weight", parts.__getitem__, arch, 256
    )
    # Group 0: q heads 0,1 then k head 0 then v head 0; group 1 likewise.
    expected = torch.cat([q[: 2 * d], k[:d], v[:d], q[2 * d :], k[d:], v[d:]])
    assert torch.equal(qkv, expected)
    # TP2: each rank holds one whole query group.
    assert torch.equal(
        tp_shard("decoder.layers.0.self_attention.linear_qkv.weight", qkv, 1, 2), expected[4 * d :]
    )


def test_gated_fc1_tp_shard_takes_gate_and_up_halves():
    full = torch.arange(8).float().unsqueeze(1)  # gate = 0..3, up = 4..7
    shard = tp_shard("decoder.layers.0.mlp.linear_fc1.weight", full, 1, 2)
    assert shard.squeeze(1).tolist() == [2, 3, 6, 7]


def test_te_and_local_spellings():
    te = "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert canonical_name(te) == "decoder.layers.3.input_layernorm.weight"
    assert (
        te_name("decoder.layers.3.pre_mlp_layernorm.weight")
        == "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"
    )
    assert (
        canonical_name("decoder.layers.3.mlp.linear_fc1.layer_norm_weight")
        == "decoder.layers.3.pre_mlp_layernorm.weight"
    )


def test_padded_vocab_is_layout_independent():
    assert (
        padded_vocab_size(250, 1) == padded_vocab_size(250, 2) == padded_vocab_size(250, 8) == 256
    )
    assert padded_vocab_size(151936, 4) == 151936
    assert padded_vocab_size(250, 3) % 3 == 0 and padded_vocab_size(250, 3) >= 250


@pytest.mark.parametrize("original,factor", [(8192, 8.0), (64, 8.0), (8192, 32.0)])
def test_llama3_rope_matches_transformers(original, factor):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=factor,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=original,
    )
    cfg = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        rope_parameters=rope,
        max_position_embeddings=2 * original,
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = llama3_inv_freq(
        128,
        500000.0,
        {
            k: rope[k]
            for k in (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            )
        },
    )
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)


def test_sdpa_attention_packed_sequences_match_float64_reference():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_gvpo.models.sdpa_attention import SDPAttention

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        attention_dropout=0.0,
    )
    attn = SDPAttention(
        cfg,
        1,
        AttnMaskType.causal,
        "self",
        pg_collection=SimpleNamespace(tp=SimpleNamespace(size=lambda: 1)),
    )
    g = torch.Generator().manual_seed(0)
    lens = [3, 5, 2]
    t = sum(lens)
    q = torch.randn(t, 1, 4, 8, generator=g)
    k = torch.randn(t, 1, 2, 8, generator=g)
    v = torch.randn(t, 1, 2, 8, generator=g)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    packed = PackedSeqParams(
        qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5
    )
    out = attn(q, k, v, None, packed_seq_params=packed)
    # Reference: each segment alone, causal softmax attention in float64, KV heads repeated.
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (x[s:e, 0].double() for x in (q, k, v))
        ks, vs = ks.repeat_interleave(2, dim=1), vs.repeat_interleave(2, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(8)
        n = e - s
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        ref.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs).reshape(n, 32))
    torch.testing.assert_close(out[:, 0].double(), torch.cat(ref), rtol=1e-5, atol=1e-6)
