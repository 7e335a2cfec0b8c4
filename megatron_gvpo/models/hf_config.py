"""Read a Hugging Face ``config.json`` into the facts a Megatron GPTModel needs, with clear errors."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
_REQUIRED = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HFArch:
    """Architecture of a supported decoder-only HF model (llama, mistral, qwen2, qwen3, qwen2_moe,
    qwen3_moe).

    ``ffn_hidden_size`` is the dense MLP's width; a mixture-of-experts model adds the expert
    fields below (``num_experts`` 0 means a dense model).
    """

    model_type: str
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    norm_epsilon: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3-style: factor, low/high_freq_factor, original_max
    tie_word_embeddings: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    max_position_embeddings: int = 4096
    torch_dtype: str = "float32"
    num_experts: int = 0
    """Routed experts per MoE layer (HF ``num_experts``); 0 for a dense model."""
    moe_ffn_hidden_size: int = 0
    """Each expert's MLP width (HF ``moe_intermediate_size``)."""
    moe_router_topk: int = 0
    """Experts each token is sent to (HF ``num_experts_per_tok``)."""
    norm_topk_prob: bool = False
    """Renormalise the top-k routing probabilities to sum to one (HF ``norm_topk_prob``)."""
    moe_layers: list[int] = field(default_factory=list)
    """Per layer, 1 when its MLP is a mixture of experts, 0 when dense (HF ``mlp_only_layers``
    and ``decoder_sparse_step``); empty for a dense model."""
    shared_expert_ffn_hidden_size: int = 0
    """Width of the shared expert every token of a routed layer also passes through, its output
    scaled by sigmoid(``shared_expert_gate``) (qwen2_moe ``shared_expert_intermediate_size``);
    0: none."""
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.torch_dtype]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer ``layer`` (0-based) has routed experts."""
        return bool(self.moe_layers) and bool(self.moe_layers[layer])

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


def read_hf_config(path: str | Path) -> HFArch:
    """Parse ``config.json`` (a file or the folder holding it); raise ValueError naming file and field."""
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no config.json found")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    return arch_from_dict(raw, source=str(cfg_file))


def arch_from_dict(raw: dict, source: str = "config.json") -> HFArch:
    """Build an :class:`HFArch` from a config dict; ``source`` names it in errors."""
    model_type = raw.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    missing = [k for k in _REQUIRED if k not in raw or raw[k] is None]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"{source}: hidden_act {raw['hidden_act']!r} is not supported (need 'silu')"
        )
    if raw.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    if model_type in ("qwen2", "qwen2_moe") and raw.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported")

    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim") or hidden // heads
    rope = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or None
    if scaling:  # transformers 4.x spelling
        rope.update(scaling)
    rope_theta = float(raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(
            f"{source}: rope type {rope_type!r} is not supported (supported: default, llama3)"
        )
    rope_scaling = None
    if rope_type == "llama3":
        rope_scaling = {
            "factor": float(rope["factor"]),
            "low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(
                rope.get("original_max_position_embeddings", 8192)
            ),
        }
    dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "float32").replace("torch.", "")
    if dtype not in _DTYPES:
        raise ValueError(f"{source}: dtype {dtype!r} is not supported ({', '.join(_DTYPES)})")
    moe = _moe_fields(raw, source) if model_type in MOE_MODEL_TYPES else {}
    return HFArch(
        model_type=model_type,
        hidden_size=hidden,
        ffn_hidden_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        vocab_size=int(raw["vocab_size"]),
        norm_epsilon=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        add_qkv_bias=_qkv_bias(model_type, raw),
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        torch_dtype=dtype,
        raw=raw,
        **moe,
    )


def _qkv_bias(model_type: str | None, raw: dict) -> bool:
    """Biases on q, k and v: always for qwen2; qwen2_moe's ``qkv_bias`` (transformers' default
    True, ``Qwen2MoeAttention``); elsewhere ``attention_bias``."""
    if model_type == "qwen2":
        return True
    if model_type == "qwen2_moe":
        return bool(raw.get("qkv_bias", True))
    return bool(raw.get("attention_bias", False))


def _moe_fields(raw: dict, source: str) -> dict:
    """The expert fields of a qwen3_moe or qwen2_moe config, checked (HF's decoder layers decide
    a layer is sparse when it is not in ``mlp_only_layers`` and (layer + 1) is a multiple of
    ``decoder_sparse_step``). Hub configs spell the expert count ``num_experts``; transformers 5
    writes it as ``num_local_experts``. qwen2_moe adds a shared expert of width
    ``shared_expert_intermediate_size`` behind a sigmoid gate in every routed layer
    (``Qwen2MoeSparseMoeBlock``)."""
    raw = {**raw, "num_experts": raw.get("num_experts", raw.get("num_local_experts"))}
    missing = [
        k
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
        if raw.get(k) is None
    ]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
    experts, topk = int(raw["num_experts"]), int(raw["num_experts_per_tok"])
    if experts < 1 or not 1 <= topk <= experts:
        raise ValueError(
            f"{source}: num_experts={experts} and num_experts_per_tok={topk} need "
            "1 <= num_experts_per_tok <= num_experts"
        )
    layers = int(raw["num_hidden_layers"])
    step = int(raw.get("decoder_sparse_step") or 1)
    dense = set(raw.get("mlp_only_layers") or [])
    bad = sorted(i for i in dense if not 0 <= int(i) < layers)
    if bad:
        raise ValueError(f"{source}: mlp_only_layers {bad} are not layers of {layers}")
    shared = 0
    if raw.get("model_type") == "qwen2_moe":
        if raw.get("shared_expert_intermediate_size") is None:
            raise ValueError(f"{source}: missing required field(s) shared_expert_intermediate_size")
        shared = int(raw["shared_expert_intermediate_size"])
        if shared < 1:
            raise ValueError(
                f"{source}: shared_expert_intermediate_size={shared} must be >= 1 (a qwen2_moe "
                "layer always has its shared expert)"
            )
    return dict(
        shared_expert_ffn_hidden_size=shared,
        num_experts=experts,
        moe_ffn_hidden_size=int(raw["moe_intermediate_size"]),
        moe_router_topk=topk,
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        moe_layers=[int(i not in dense and (i + 1) % step == 0) for i in range(layers)],
    )


def check_parallel_layout(
    arch: HFArch, tp: int, pp: int, source: str = "config.json", ep: int = 1, etp: int | None = None
) -> None:
    """Raise ValueError when the model cannot be split over ``tp`` x ``pp`` (x ``ep`` experts,
    each over ``etp`` ranks, default ``tp``); name the fields."""
    problems = []
    etp = tp if etp is None else etp
    if ep > 1 and not arch.is_moe:
        problems.append(f"parallel.ep={ep} needs a mixture-of-experts model ({arch.model_type})")
    if arch.is_moe:
        if arch.num_experts % ep:
            problems.append(f"num_experts={arch.num_experts} is not divisible by ep={ep}")
        if arch.moe_ffn_hidden_size % etp:
            problems.append(
                f"moe_intermediate_size={arch.moe_ffn_hidden_size} is not divisible by etp={etp}"
            )
        if arch.shared_expert_ffn_hidden_size % tp:
            problems.append(
                f"shared_expert_intermediate_size={arch.shared_expert_ffn_hidden_size} is not "
                f"divisible by tp={tp}"
            )
    if arch.num_attention_heads % tp:
        problems.append(
            f"num_attention_heads={arch.num_attention_heads} is not divisible by tp={tp}"
        )
    if arch.num_query_groups % tp:
        problems.append(f"num_key_value_heads={arch.num_query_groups} is not divisible by tp={tp}")
    has_dense = not arch.is_moe or 0 in arch.moe_layers
    if has_dense and arch.ffn_hidden_size % tp:
        problems.append(f"intermediate_size={arch.ffn_hidden_size} is not divisible by tp={tp}")
    if arch.num_layers % pp:
        problems.append(f"num_hidden_layers={arch.num_layers} is not divisible by pp={pp}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Pad the vocabulary to a multiple of lcm(``divisible_by``, ``tp``).

    Unlike Megatron-LM's ``divisible_by * tp``, the result does not change with TP for any TP that
    divides ``divisible_by``, so one checkpoint loads under TP 1, 2, 4, 8 without reshaping the
    embedding. Padded rows are masked out of every logprob.
    """
    multiple = math.lcm(divisible_by, tp)
    return ((vocab_size + multiple - 1) // multiple) * multiple
