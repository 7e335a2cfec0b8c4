"""FP8 training through Transformer Engine: the ``model.fp8`` settings, their checks, and the
megatron-core ``TransformerConfig`` fields they set.

Hardware (Transformer Engine's support matrix): per-tensor FP8 (``delayed``, ``tensorwise``) needs
compute capability >= 8.9 (Ada, Hopper and newer); ``blockwise`` needs >= 9.0 (Hopper and newer);
``mxfp8`` needs Blackwell data-centre GPUs (10.x). Minimum TE versions are the ones megatron-core
0.16 checks before it picks a recipe (``megatron.core.fp8_utils.get_fp8_recipe``).
Torch only, so the config can be checked before megatron-core is imported.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch

FORMATS = ("hybrid", "e4m3")
RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
AMAX_ALGOS = ("max", "most_recent")
PREFIX = "model.fp8"

# recipe -> (lowest compute capability, highest major or None, GPUs it means)
_CAPABILITY = {
    "delayed": ((8, 9), None, "Ada/Hopper or newer"),
    "tensorwise": ((8, 9), None, "Ada/Hopper or newer"),
    "blockwise": ((9, 0), None, "Hopper or newer"),
    "mxfp8": ((10, 0), 10, "Blackwell data-centre GPUs"),
}
# recipe -> lowest Transformer Engine version megatron-core 0.16 accepts for it
_MIN_TE = {"delayed": (1, 0), "tensorwise": (2, 2), "blockwise": (2, 3), "mxfp8": (2, 1)}


@dataclass
class FP8Config:
    """``model.fp8.*``: FP8 GEMMs via Transformer Engine (weights and optimizer stay bf16/fp32)."""

    enabled: bool = False
    format: str = "hybrid"  # hybrid: e4m3 forward, e5m2 gradients | e4m3 everywhere
    recipe: str = "delayed"  # delayed | tensorwise | blockwise | mxfp8
    first_last_layers_bf16: bool = False  # keep the first/last layers out of FP8
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1
    amax_history_len: int = 1024  # delayed scaling only
    amax_compute_algo: str = "max"  # delayed scaling only: max | most_recent
    margin: int = 0  # delayed scaling only: scale = 2^-margin * fp8_max / amax

    @classmethod
    def from_dict(cls, raw: dict | None, prefix: str = PREFIX) -> FP8Config:
        """Build from a config dict; an unknown key raises ValueError naming ``<prefix>.<key>``."""
        raw = dict(raw or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ValueError(
                f"unknown config key {prefix}.{unknown[0]} (known: {', '.join(sorted(names))})"
            )
        return cls(**raw)

    def check_values(self) -> None:
        """Checks that need neither hardware nor a model (run even when FP8 is off)."""
        if self.format not in FORMATS:
            raise ValueError(f"{PREFIX}.format={self.format!r}: use {' or '.join(FORMATS)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"{PREFIX}.recipe={self.recipe!r}: use one of {', '.join(RECIPES)}")
        if self.amax_compute_algo not in AMAX_ALGOS:
            raise ValueError(
                f"{PREFIX}.amax_compute_algo={self.amax_compute_algo!r}: use max or most_recent"
            )
        lowest = {
            "amax_history_len": 1,
            "margin": 0,
            "num_layers_at_start_in_bf16": 0,
            "num_layers_at_end_in_bf16": 0,
        }
        for key, low in lowest.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{PREFIX}.{key} must be an integer >= {low}, got {value!r}")
        for key in ("enabled", "first_last_layers_bf16"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(
                    f"{PREFIX}.{key} must be true or false, got {getattr(self, key)!r}"
                )
        if self.first_last_layers_bf16 and self.recipe == "delayed":
            raise ValueError(
                f"{PREFIX}.first_last_layers_bf16=true is not supported with "
                f"{PREFIX}.recipe=delayed (megatron-core); use tensorwise or blockwise"
            )

    def validate(self, precision: str, transformer_impl: str) -> None:
        """All checks, hardware included, before any model is built; errors name the key."""
        self.check_values()
        if not self.enabled:
            return
        if precision != "bf16":
            raise ValueError(
                f"{PREFIX}.enabled=true needs model.precision=bf16 (got {precision!r}): FP8 GEMMs "
                "run inside bf16 training"
            )
        if transformer_impl == "local":
            raise ValueError(
                f"{PREFIX}.enabled=true needs Transformer Engine layers: set "
                "model.transformer_impl=auto or transformer_engine (got local)"
            )
        cuda, capability, te_version, te_error = probe()
        if not cuda:
            raise ValueError(
                f"{PREFIX}.enabled=true needs Transformer Engine on a CUDA GPU with FP8 "
                "(compute capability >= 8.9), and no CUDA device is visible; "
                f"set {PREFIX}.enabled=false"
            )
        if te_version is None:
            raise ValueError(
                f"{PREFIX}.enabled=true needs Transformer Engine: transformer_engine.pytorch does "
                f"not import ({te_error}); install the 'gpu' extra"
            )
        lowest, top_major, gpus = _CAPABILITY[self.recipe]
        if capability < lowest or (top_major is not None and capability[0] > top_major):
            raise ValueError(
                f"{PREFIX}.recipe={self.recipe} needs compute capability "
                f"{'.'.join(map(str, lowest))}+ ({gpus}); this GPU is "
                f"{'.'.join(map(str, capability))}"
            )
        need = _MIN_TE[self.recipe]
        if te_version < need:
            raise ValueError(
                f"{PREFIX}.recipe={self.recipe} needs Transformer Engine >= "
                f"{'.'.join(map(str, need))}; found {'.'.join(map(str, te_version))}"
            )

    def check_layers(self, num_layers: int, pp: int) -> None:
        """The bf16 layer counts must fit in one pipeline stage (megatron-core's rule)."""
        if not (self.enabled and self.first_last_layers_bf16):
            return
        per_stage = num_layers // pp
        for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            if getattr(self, key) > per_stage:
                raise ValueError(
                    f"{PREFIX}.{key}={getattr(self, key)} exceeds the {per_stage} layers of one "
                    f"pipeline stage ({num_layers} layers / pp={pp})"
                )

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """megatron-core ``TransformerConfig`` fields; empty when FP8 is off (megatron defaults)."""
        if not self.enabled:
            return {}
        return {
            "fp8": self.format,
            "fp8_recipe": self.recipe,
            "fp8_margin": int(self.margin),
            "fp8_amax_history_len": int(self.amax_history_len),
            "fp8_amax_compute_algo": self.amax_compute_algo,
            "first_last_layers_bf16": bool(self.first_last_layers_bf16),
            "num_layers_at_start_in_bf16": int(self.num_layers_at_start_in_bf16),
            "num_layers_at_end_in_bf16": int(self.num_layers_at_end_in_bf16),
        }


def probe() -> tuple[bool, tuple[int, int], tuple[int, ...] | None, str]:
    """(CUDA visible, compute capability of device 0, TE version or None, TE import error)."""
    if not torch.cuda.is_available():
        return False, (0, 0), None, "no CUDA"
    capability = tuple(torch.cuda.get_device_capability(0))
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA extension built for another torch
        return True, capability, None, f"{type(e).__name__}: {e}"
    return True, capability, _version_tuple(getattr(transformer_engine, "__version__", "0")), ""


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"2.3.0.dev0+cu12"`` -> ``(2, 3, 0)``; unparsable -> ``(0,)``."""
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    return tuple(int(g) for g in m.groups() if g is not None) if m else (0,)
