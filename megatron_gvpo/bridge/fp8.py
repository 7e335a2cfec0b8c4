"""Blockwise FP8 (e4m3) weights in the layout of HF FP8 checkpoints (DeepSeek-V3, Qwen3-FP8).

A quantised ``x.weight`` is stored as ``float8_e4m3fn`` with the same shape, beside
``x.weight_scale_inv``: one float32 per block of the last two dims,
shape ``[ceil(rows / 128), ceil(cols / 128)]``; dequantised value = fp8 value * scale_inv.
Only the decoder layers' linear projections are quantised; embeddings, ``lm_head``, norms and
biases stay in their own dtype. Torch only, so the rollout side can dequantise without megatron.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"

NamedTensors = list[tuple[str, torch.Tensor]]


def fp8_quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict:
    """The ``quantization_config`` entry of ``config.json`` describing what this module writes."""
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": ["lm_head", "model.embed_tokens"],
    }


def scale_inv_name(name: str) -> str:
    """``x.weight`` -> ``x.weight_scale_inv`` (HF spelling); any other name gets ``_scale_inv``."""
    return name + SCALE_SUFFIX


def is_fp8_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """True for 2-D linear projection weights of decoder layers (what HF FP8 models quantise)."""
    return (
        tensor.dim() == 2
        and tensor.is_floating_point()
        and name.startswith("model.layers.")
        and name.endswith("_proj.weight")
    )


def scale_grid(shape: torch.Size | tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scale tensor for a weight of ``shape``: ceil-divided last two dims."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def _blocked(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Zero-pad the last two dims to whole blocks and view as [..., R, bm, C, bn]."""
    *lead, rows, cols = x.shape
    bm, bn = block
    pr, pc = -rows % bm, -cols % bn
    if pr or pc:
        x = F.pad(x, (0, pc, 0, pr))
    return x.reshape(*lead, (rows + pr) // bm, bm, (cols + pc) // bn, bn)


def _unblocked(xb: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    *lead, r, bm, c, bn = xb.shape
    return xb.reshape(*lead, r * bm, c * bn)[..., :rows, :cols]


def quantize_blockwise(
    weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale_inv) with scale_inv = block amax / 448 (1 for all-zero blocks)."""
    if weight.dim() < 2:
        raise ValueError(f"blockwise FP8 needs >= 2 dims, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape[-2:]
    xb = _blocked(weight.float(), block)
    amax = torch.maximum(xb.amax(dim=(-3, -1)), -xb.amin(dim=(-3, -1)))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xb / scale_inv[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return _unblocked(q, rows, cols).contiguous(), scale_inv.contiguous()


def dequantize_blockwise(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """fp8 weight * its block's scale_inv, in ``dtype``; checks the scale grid's shape."""
    want = scale_grid(q.shape, block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
            f"with blocks {list(block)} (expected {want})"
        )
    rows, cols = q.shape[-2:]
    xb = _blocked(fp8_to_float(q), block).mul_(scale_inv.float()[..., :, None, :, None])
    return _unblocked(xb, rows, cols).to(dtype)


def fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """float32 copy of an e4m3 tensor; on CPU via a 256-entry table (4x faster than ``.float()``)."""
    if q.device.type != "cpu":
        return q.float()
    table = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    codes = q.contiguous().view(torch.uint8).reshape(-1).int()
    return table.index_select(0, codes).view(q.shape)


def quantize_named(
    name: str, tensor: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> NamedTensors:
    """[(name, fp8), (name_scale_inv, scales)] for a quantisable weight, else [(name, tensor)]."""
    if not is_fp8_quantizable(name, tensor):
        return [(name, tensor)]
    q, s = quantize_blockwise(tensor, block)
    return [(name, q), (scale_inv_name(name), s)]
