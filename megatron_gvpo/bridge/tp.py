"""Split full tensors into this rank's TP shard, and gather shards back; PP stage layer numbering."""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_LOCAL_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first transformer layer."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if not layers:
        return 0
    return layers[0].layer_number - 1


_LOCAL_EXPERT_RE = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def to_global_name(name: str, offset: int, expert_offset: int = 0) -> str:
    """``decoder.layers.{j}.x`` on a stage -> ``decoder.layers.{j + offset}.x`` in the whole model;
    a routed expert's ``local_experts.{e}`` on an expert-parallel rank -> ``{e + expert_offset}``."""
    name = _LOCAL_LAYER_RE.sub(
        lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name, count=1
    )
    if expert_offset:
        name = _LOCAL_EXPERT_RE.sub(
            lambda m: f".mlp.experts.local_experts.{int(m.group(1)) + expert_offset}.",
            name,
            count=1,
        )
    return name


def with_expert_index(name: str, expert: int) -> str:
    """``name`` with its routed expert's index replaced by ``expert``."""
    return _LOCAL_EXPERT_RE.sub(f".mlp.experts.local_experts.{expert}.", name, count=1)


def _is_gated_fc1(name: str) -> bool:
    return (
        name.endswith("linear_fc1.weight")
        and (
            name.endswith("mlp.linear_fc1.weight")
            or name.endswith("mlp.shared_experts.linear_fc1.weight")
            or ".local_experts." in name
        )
        or name.endswith("mlp.linear_fc1.bias")
    )


# Column-parallel weights split their output dim (0), row-parallel ones their input dim (1).
# By name rather than by the ``partition_dim`` attribute: megatron sets that attribute only when
# it initialises the weight, and conversion builds models without initialisation.
_PARTITION_DIMS = (
    ("embedding.word_embeddings.weight", 0),
    ("output_layer.weight", 0),
    ("self_attention.linear_qkv.weight", 0),
    ("self_attention.linear_qkv.bias", 0),
    ("mlp.linear_fc1.weight", 0),
    ("self_attention.linear_proj.weight", 1),
    ("mlp.linear_fc2.weight", 1),
    # qwen2_moe's shared expert: a dense MLP over the TP group (its gate_weight is replicated)
    ("mlp.shared_experts.linear_fc1.weight", 0),
    ("mlp.shared_experts.linear_fc2.weight", 1),
)
# A routed expert's linears split like the dense MLP's, over the expert tensor-parallel group.
_EXPERT_PARTITION_RE = re.compile(r"\.local_experts\.\d+\.linear_fc(1|2)\.weight$")


def partition_dim(name: str) -> int | None:
    """The dim megatron splits parameter ``name`` along over TP, or None when replicated."""
    for suffix, dim in _PARTITION_DIMS:
        if name.endswith(suffix):
            return dim
    m = _EXPERT_PARTITION_RE.search(name)
    if m:
        return 0 if m.group(1) == "1" else 1
    return None


def tp_shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of ``full`` for the megatron parameter ``name``."""
    dim = partition_dim(name)
    if dim is None or tp_size == 1:
        return full
    if _is_gated_fc1(name):
        # SwiGLU fc1 is [gate; up]; each rank holds [gate_r; up_r].
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]], dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def tp_gather(name: str, local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather a TP-sharded tensor into the full tensor (inverse of :func:`tp_shard`)."""
    dim = partition_dim(name)
    size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    if dim is None or size == 1:
        return local
    local = local.contiguous()
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local, group=group)
    if _is_gated_fc1(name):
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)
