"""Build this rank's actor stage from an HF folder or a converted checkpoint, validating first."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_gvpo.bridge.checkpoint import load_model, read_meta
from megatron_gvpo.bridge.hf_io import SafetensorsReader
from megatron_gvpo.bridge.weights import load_hf_weights
from megatron_gvpo.models.gpt import ModelConfig, build_gpt_model
from megatron_gvpo.models.hf_config import HFArch, check_parallel_layout, read_hf_config


def _layout() -> dict:
    return dict(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
        etp=parallel_state.get_expert_tensor_parallel_world_size(),
    )


def validate_hf_dir(
    hf_dir: str | Path, tp: int, pp: int, ep: int = 1, etp: int | None = None
) -> tuple[HFArch, SafetensorsReader]:
    """Cheap checks before any model is built: config fields, layout, shard files and headers."""
    arch = read_hf_config(hf_dir)
    check_parallel_layout(arch, tp, pp, source=str(Path(hf_dir) / "config.json"), ep=ep, etp=etp)
    return arch, SafetensorsReader(hf_dir)


def build_from_hf(
    hf_dir: str | Path, cfg: ModelConfig | None = None
) -> tuple[torch.nn.Module, HFArch]:
    """GPTModel stage for this rank with weights read from HF safetensors (collective-free)."""
    arch, reader = validate_hf_dir(hf_dir, **_layout())
    cfg = cfg or ModelConfig(precision=precision_of(arch))
    model = build_gpt_model(arch, cfg, perform_initialization=False)
    load_hf_weights(model, reader, arch)
    return model, arch


def build_from_checkpoint(
    ckpt_dir: str | Path, cfg: ModelConfig | None = None
) -> tuple[torch.nn.Module, HFArch]:
    """GPTModel stage for this rank loaded from a converted dist checkpoint (collective)."""
    meta, arch = read_meta(ckpt_dir)
    check_parallel_layout(arch, **_layout(), source=str(Path(ckpt_dir) / "hf" / "config.json"))
    cfg = replace(
        cfg or ModelConfig(precision=meta.precision), padded_vocab_size=meta.padded_vocab_size
    )
    model = build_gpt_model(arch, cfg, perform_initialization=False)
    load_model(model, ckpt_dir)
    return model, arch


def precision_of(arch: HFArch) -> str:
    """The ``model.precision`` name of the HF checkpoint's own dtype."""
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[arch.torch_dtype]
