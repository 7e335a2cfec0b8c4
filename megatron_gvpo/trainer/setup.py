"""Build the run's parts from config: model path, actor, optimizer and scheduler, reference,
rewards, rollout engine. The loop calls these once; nothing here runs a step."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_gvpo.bridge.loader import build_from_checkpoint, build_from_hf
from megatron_gvpo.data.tokenizer import hf_dir
from megatron_gvpo.demo import toy_addition_reward  # noqa: F401  (registers the demo reward)
from megatron_gvpo.demo.model import demo_model_path
from megatron_gvpo.models.gpt import ModelConfig
from megatron_gvpo.models.hf_config import HFArch, read_hf_config
from megatron_gvpo.rewards import RewardManager
from megatron_gvpo.rollout.base import RolloutEngine
from megatron_gvpo.rollout.env import load_env
from megatron_gvpo.rollout.turns import TurnRunner
from megatron_gvpo.trainer.config import (
    ModelSection,
    RewardSection,
    RolloutSection,
    RunConfig,
    TrainerSection,
    sglang_config,
    turn_settings,
)


def resolve_model_path(m: ModelSection) -> str:
    """``model.path``, or the cached demo model, built first (by rank 0) when it is missing."""
    return str(m.path) if m.path else str(demo_model_path(m.demo_cache_dir))


def model_config(m: ModelSection) -> ModelConfig:
    return ModelConfig(
        precision=m.precision,
        transformer_impl=m.transformer_impl,
        recompute_granularity=m.recompute_granularity,
        fp8=m.fp8,
        moe=m.moe,
    )


def build_model(m: ModelSection, path: str | Path) -> tuple[torch.nn.Module, HFArch]:
    """This rank's stage from an HF folder or a converted checkpoint."""
    path = Path(path)
    if (path / "megatron_gvpo.json").is_file():
        return build_from_checkpoint(path, model_config(m))
    return build_from_hf(path, model_config(m))


def build_reference(cfg: RunConfig, actor_path: str) -> torch.nn.Module | None:
    """The frozen reference the objective asks for (``actor_init``: the actor's starting
    weights), or None."""
    if not cfg.algorithm.needs_reference:
        return None
    ref = cfg.algorithm.reference_path
    model, _ = build_model(cfg.model, actor_path if ref in (None, "actor_init") else ref)
    return model.eval().requires_grad_(False)


def build_optimizer(ddp: torch.nn.Module, t: TrainerSection, m: ModelSection):
    """Megatron's Adam (mixed precision, optionally distributed) and its LR/WD scheduler."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        clip_grad=t.clip_grad,
        bf16=m.precision == "bf16",
        fp16=m.precision == "fp16",
        params_dtype=model_config(m).dtype,
        use_distributed_optimizer=t.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp])
    for group in optimizer.param_groups:
        # Without TE or apex megatron falls back to torch's Adam, which picks its multi-tensor
        # (foreach) kernels on CUDA only; on CPU they are ~25 % faster, same bits.
        if group.get("foreach", False) is None:
            group["foreach"] = True
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.lr_warmup_steps else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_steps,
        lr_decay_steps=max(t.max_steps * t.updates_per_round, t.lr_warmup_steps + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def build_rewards(section: RewardSection) -> RewardManager | None:
    """The weighted sum of ``reward.rewards`` (each checked now, before any model is built);
    None for ``reward.rewards=[]`` (allowed when a ``rollout.env`` rewards the trajectories)."""
    if not section.rewards:
        return None
    return RewardManager(list(section.rewards))


def build_turn_runner(r: RolloutSection, tokenizer) -> TurnRunner | None:
    """The multi-turn loop of ``rollout.env`` (None without one), with the prompts' tokenizer
    for decoding turns and encoding observations."""
    if r.env is None:
        return None
    return TurnRunner(load_env(r.env), tokenizer, turn_settings(r), r.env_observation_role)


def build_engine(r: RolloutSection, model_path: str, trust_remote_code: bool,
                 run_dir: str | None = None, overlapped: bool = False,
                 routes: bool = False) -> RolloutEngine:
    """The rollout engine of ``rollout.backend``, loaded with the actor's starting weights;
    ``overlapped`` (async training) puts the embedded engine in its own process unless
    ``rollout.local.process`` says otherwise; ``routes`` (``model.moe.routing_replay=rollout``):
    every sample carries the experts the engine routed its tokens to."""
    if r.backend == "local":
        kwargs = dict(
            model_path=model_path,
            device=r.local.device,
            dtype=r.local.sampling_dtype,
            max_batch_size=r.local.max_batch_size,
            trust_remote_code=trust_remote_code,
            return_routes=routes,
        )
        if r.local.process if r.local.process is not None else overlapped:
            from megatron_gvpo.rollout.process import ProcessEngine

            return ProcessEngine(**kwargs)
        from megatron_gvpo.rollout.local import LocalEngine

        return LocalEngine(**kwargs)
    from megatron_gvpo.rollout.sglang import RouteLayout, SGLangEngine

    layout = None
    if routes:
        arch = read_hf_config(hf_dir(model_path) / "config.json")
        moe = tuple(i for i, m in enumerate(arch.moe_layers) if m)
        layout = RouteLayout(arch.num_layers, moe, arch.moe_router_topk)
    return SGLangEngine(sglang_config(r, model_path, run_dir), routes=layout)
