"""Move weights between an HF safetensors checkpoint and this rank's Megatron GPTModel stage."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_gvpo.bridge.hf_io import SafetensorsReader
from megatron_gvpo.bridge.mapping import (
    canonical_name,
    fused_expert_source,
    hf_names,
    hf_to_mcore,
    is_checkpoint_only,
    is_expert_param,
    mcore_to_hf,
    read_fused_expert,
)
from megatron_gvpo.bridge.tp import (
    layer_offset,
    to_global_name,
    tp_gather,
    tp_shard,
    with_expert_index,
)
from megatron_gvpo.models.hf_config import HFArch


def _named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, param in model.named_parameters():
        if not is_checkpoint_only(name):
            yield name, param


def expert_offset(arch: HFArch) -> int:
    """Global index of this expert-parallel rank's first routed expert."""
    if not arch.is_moe:
        return 0
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    return parallel_state.get_expert_model_parallel_rank() * (arch.num_experts // ep_size)


def global_name(name: str, model: torch.nn.Module, arch: HFArch) -> str:
    """The whole-model (global layer, global expert), local-spec spelling of a stage's parameter."""
    return canonical_name(to_global_name(name, layer_offset(model), expert_offset(arch)))


def _tp_coords(name: str) -> tuple[int, int]:
    """(rank, size) of the group that splits ``name``: expert-TP for experts, else TP."""
    if is_expert_param(name):
        return (
            parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        )
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def _hf_getter(reader: SafetensorsReader):
    """``reader.get`` that also cuts per-expert tensors out of a fused 3-D expert layout."""

    def get(name: str) -> torch.Tensor:
        if name in reader or fused_expert_source(name) is None:
            return reader.get(name)
        return read_fused_expert(name, reader.get)

    return get


def _present(reader: SafetensorsReader, name: str) -> bool:
    fused = fused_expert_source(name)
    return name in reader or (fused is not None and fused[0] in reader)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, reader: SafetensorsReader, arch: HFArch) -> None:
    """Fill this rank's stage, TP shard and experts from HF tensors, each read once, on demand."""
    padded_vocab = model.vocab_size
    needed = {
        n
        for name, _ in _named_weights(model)
        for n in hf_names(global_name(name, model, arch), arch)
    }
    missing = sorted(n for n in needed if not _present(reader, n))
    if missing:
        raise KeyError(f"{reader.dir}: missing tensors for this model: {', '.join(missing[:8])}")
    get = _hf_getter(reader)
    for name, param in _named_weights(model):
        gname = global_name(name, model, arch)
        full = hf_to_mcore(gname, get, arch, padded_vocab)
        shard = tp_shard(gname, full, *_tp_coords(gname))
        if shard.shape != param.shape:
            raise ValueError(
                f"{reader.dir}: {', '.join(hf_names(gname, arch))} give shape {tuple(shard.shape)} "
                f"for {name}, expected {tuple(param.shape)}"
            )
        param.copy_(shard)


@torch.no_grad()
def iter_hf_tensors(
    model: torch.nn.Module, arch: HFArch, tensors: dict[str, torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for this PP stage, gathering TP shards (collective over TP).

    Every TP rank of the stage must iterate together; with expert parallelism, so must every rank
    of each EP group: a routed expert's weight is gathered over expert-TP, then over EP, and
    every EP rank yields all experts. ``tensors`` replaces the parameters by other per-parameter
    tensors of the same shapes (for example their gradients). The tied ``output_layer.weight``
    copy of the last stage is skipped: HF stores it once.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    for name, param in _named_weights(model):
        gname = global_name(name, model, arch)
        if gname == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        local = (param if tensors is None else tensors[name]).detach()
        if not is_expert_param(gname):
            yield from mcore_to_hf(gname, tp_gather(gname, local, group), arch).items()
            continue
        full = tp_gather(gname, local, parallel_state.get_expert_tensor_parallel_group())
        for expert, tensor in _gather_experts(gname, full, arch):
            yield from mcore_to_hf(with_expert_index(gname, expert), tensor, arch).items()


def _gather_experts(gname: str, full: torch.Tensor, arch: HFArch) -> list[tuple[int, torch.Tensor]]:
    """(global expert, tensor) of the same local expert on every EP rank (collective over EP)."""
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    if ep_size == 1:
        return [(_expert_of(gname), full)]
    per_rank = arch.num_experts // ep_size
    local_index = _expert_of(gname) - expert_offset(arch)
    full = full.contiguous()
    shards = [torch.empty_like(full) for _ in range(ep_size)]
    dist.all_gather(shards, full, group=parallel_state.get_expert_model_parallel_group())
    return [(r * per_rank + local_index, t) for r, t in enumerate(shards)]


def _expert_of(gname: str) -> int:
    return int(gname.split(".local_experts.")[1].split(".")[0])


def gather_hf_tensors(
    model: torch.nn.Module, arch: HFArch, tensors: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Every HF tensor of the whole model on every rank (collective; small models: tests, tools)."""
    import torch.distributed as dist

    stage = {k: v.cpu() for k, v in iter_hf_tensors(model, arch, tensors)}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return stage
    leader = (
        parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
    gathered: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(gathered, stage if leader else {})
    return {k: v for d in gathered for k, v in d.items()}
