"""Build the run's non-Megatron parts from config: the model path, rewards, the rollout engine."""

from __future__ import annotations

import os
import time
from pathlib import Path

from megatron_gvpo.data.toy import toy_reward
from megatron_gvpo.rewards import RewardInput, RewardManager, register_reward
from megatron_gvpo.rollout.base import RolloutEngine
from megatron_gvpo.trainer.config import ModelSection, RewardSection, RolloutSection

DEMO_MODEL = "toy_addition_v1"  # bump when the demo model's recipe changes


@register_reward("toy_addition", override=True)
def toy_addition_reward(sample: RewardInput) -> float:
    """The demo task's exact partial-credit reward (``data.toy.toy_reward``)."""
    return toy_reward(sample.response, sample.label or "")


def resolve_model_path(m: ModelSection) -> str:
    """``model.path``, or the cached demo model, built first (by rank 0) when it is missing."""
    if m.path:
        return str(m.path)
    out = Path(os.path.expanduser(m.demo_cache_dir)) / DEMO_MODEL
    if (out / "config.json").is_file():
        return str(out)
    if int(os.environ.get("RANK", "0")) == 0:
        from megatron_gvpo.data.toy_model import build_demo_model

        print(f"building the demo model into {out} (once; cached)", flush=True)
        build_demo_model(out)
    else:
        deadline = time.monotonic() + 1800
        while not (out / "config.json").is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not build the demo model into {out}")
            time.sleep(1)
    return str(out)


def build_rewards(section: RewardSection) -> RewardManager:
    """The weighted sum of ``reward.rewards`` (each checked now, before any model is built)."""
    return RewardManager(list(section.rewards))


def build_engine(r: RolloutSection, model_path: str, trust_remote_code: bool,
                 run_dir: str | None = None) -> RolloutEngine:
    """The rollout engine of ``rollout.backend``, loaded with the actor's starting weights."""
    if r.backend == "local":
        from megatron_gvpo.rollout.local import LocalEngine

        return LocalEngine(
            model_path,
            device=r.device,
            max_batch_size=r.max_batch_size,
            trust_remote_code=trust_remote_code,
        )
    from megatron_gvpo.rollout.sglang import SGLangConfig, SGLangEngine

    return SGLangEngine(SGLangConfig(**sglang_kwargs(r, model_path, run_dir)))


def sglang_kwargs(r: RolloutSection, model_path: str, run_dir: str | None = None) -> dict:
    """``SGLangConfig`` fields: ``rollout.sglang``, plus ``fp8`` for FP8 sync.

    With ``rollout.fp8=true`` weights arrive as blockwise e4m3 with ``weight_scale_inv``, which
    only a server started from a blockwise-FP8 checkpoint has (``--quantization fp8`` quantizes
    a BF16 checkpoint online, without them): servers we start load an FP8 copy of the model,
    converted once into ``<run_dir>/fp8_model``.
    """
    kwargs = {"model_path": model_path, **r.sglang}
    if r.fp8:
        kwargs.setdefault("fp8", True)
        if kwargs["fp8"] and run_dir and not kwargs.get("fp8_dir"):
            kwargs["fp8_dir"] = str(Path(run_dir) / "fp8_model")
    return kwargs
