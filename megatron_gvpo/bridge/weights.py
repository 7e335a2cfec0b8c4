"""Move weights between an HF safetensors checkpoint and this rank's Megatron GPTModel stage."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core import parallel_state

from megatron_gvpo.bridge.hf_io import SafetensorsReader
from megatron_gvpo.bridge.mapping import (
    canonical_name,
    hf_names,
    hf_to_mcore,
    is_checkpoint_only,
    mcore_to_hf,
)
from megatron_gvpo.bridge.tp import layer_offset, to_global_name, tp_gather, tp_shard
from megatron_gvpo.models.hf_config import HFArch


def _named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, param in model.named_parameters():
        if not is_checkpoint_only(name):
            yield name, param


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, reader: SafetensorsReader, arch: HFArch) -> None:
    """Fill this rank's stage and TP shard from HF tensors, reading each tensor once, on demand."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    offset = layer_offset(model)
    padded_vocab = model.vocab_size
    needed = {
        n for name, _ in _named_weights(model) for n in hf_names(to_global_name(name, offset), arch)
    }
    missing = sorted(n for n in needed if n not in reader)
    if missing:
        raise KeyError(f"{reader.dir}: missing tensors for this model: {', '.join(missing[:8])}")
    for name, param in _named_weights(model):
        gname = canonical_name(to_global_name(name, offset))
        full = hf_to_mcore(gname, reader.get, arch, padded_vocab)
        shard = tp_shard(gname, full, tp_rank, tp_size)
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

    Every TP rank of the stage must iterate together. ``tensors`` replaces the parameters by other
    per-parameter tensors of the same shapes (for example their gradients). The tied
    ``output_layer.weight`` copy of the last stage is skipped: HF stores it once.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    offset = layer_offset(model)
    for name, param in _named_weights(model):
        gname = canonical_name(to_global_name(name, offset))
        if gname == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        local = param if tensors is None else tensors[name]
        full = tp_gather(gname, local.detach(), group)
        yield from mcore_to_hf(gname, full, arch).items()


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
