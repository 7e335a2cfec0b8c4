"""The run's configuration as dataclasses, built from Hydra's tree and validated before any model.

Every error names the Hydra key (``trainer.max_steps``, ``parallel.tp``, ``data.path``) so the
fix is one command-line override away.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_gvpo.algorithms.config import AlgorithmConfig, check_domains
from megatron_gvpo.models.fp8 import FP8Config
from megatron_gvpo.models.gpt import PRECISIONS
from megatron_gvpo.parallel.initialize import ParallelConfig, validate_layout
from megatron_gvpo.trainer.data import DataSection


@dataclass
class ModelSection:
    path: str | None = None  # None: the demo model, built and cached under demo_cache_dir
    demo_cache_dir: str = "~/.cache/megatron_gvpo"
    precision: str = "fp32"
    transformer_impl: str = "auto"
    recompute_granularity: str | None = None
    trust_remote_code: bool = False
    fp8: FP8Config = field(default_factory=FP8Config)

    def __post_init__(self) -> None:
        if isinstance(self.fp8, dict):  # from Hydra: the model.fp8 sub-tree
            self.fp8 = FP8Config.from_dict(self.fp8, prefix="model.fp8")


@dataclass
class RolloutSection:
    backend: str = "local"
    n_samples_per_prompt: int = 8
    max_new_tokens: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    device: str = "cpu"
    max_batch_size: int = 256
    bucket_mb: int = 512
    fp8: bool = False
    sglang: dict = field(default_factory=dict)


@dataclass
class RewardSection:
    rewards: list[dict] = field(default_factory=lambda: [{"name": "toy_addition"}])


@dataclass
class TrainerSection:
    run_dir: str = "runs/demo"
    seed: int = 1234
    max_steps: int = 60
    prompts_per_step: int = 16
    updates_per_round: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    use_distributed_optimizer: bool = False
    max_tokens_per_microbatch: int = 4096
    keep_groups_whole: bool = True
    dynamic_sampling: bool = False
    min_response_tokens: int = 0
    replay_ratio: float = 0.0
    replay_capacity: int = 256
    save_interval: int = 20
    keep_last: int = 2
    export_hf: bool = False
    plot: bool = True


@dataclass
class RunConfig:
    model: ModelSection
    parallel: ParallelConfig
    algorithm: AlgorithmConfig
    rollout: RolloutSection
    reward: RewardSection
    data: DataSection
    trainer: TrainerSection


_SECTION_TYPES = {
    "model": ModelSection,
    "parallel": ParallelConfig,
    "algorithm": AlgorithmConfig,
    "rollout": RolloutSection,
    "reward": RewardSection,
    "data": DataSection,
    "trainer": TrainerSection,
}


def _section(cls: type, raw: dict | None, prefix: str) -> Any:
    raw = dict(raw or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(
            f"unknown config key {prefix}.{unknown[0]} (known: {', '.join(sorted(names))})"
        )
    try:
        return cls(**raw)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(f"{prefix}.") else f"{prefix}: {msg}") from None


def sections_from_dict(raw: dict) -> RunConfig:
    """The config's dataclasses from a plain dict; unknown keys fail, values are not checked."""
    unknown = sorted(set(raw) - set(_SECTION_TYPES) - {"hydra"})
    if unknown:
        raise ValueError(f"unknown config group {unknown[0]!r}")
    sections = {k: _section(cls, raw.get(k), k) for k, cls in _SECTION_TYPES.items()}
    return RunConfig(**sections)


def run_config_from_dict(raw: dict) -> RunConfig:
    """Build and check the whole config from a plain dict (``OmegaConf.to_container``)."""
    cfg = sections_from_dict(raw)
    validate(cfg)
    return cfg


def _positive(prefix: str, **values: float) -> None:
    for k, v in values.items():
        if v is None or v <= 0:
            raise ValueError(f"{prefix}.{k} must be > 0, got {v!r}")


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Cheap checks that need no model: layout, files, numbers, combinations."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    validate_layout(cfg.parallel, world_size)
    t, r, m = cfg.trainer, cfg.rollout, cfg.model
    _positive(
        "trainer",
        max_steps=t.max_steps,
        prompts_per_step=t.prompts_per_step,
        updates_per_round=t.updates_per_round,
        lr=t.lr,
        max_tokens_per_microbatch=t.max_tokens_per_microbatch,
        save_interval=t.save_interval,
        keep_last=t.keep_last,
        replay_capacity=t.replay_capacity,
    )
    if t.replay_ratio < 0:
        raise ValueError(f"trainer.replay_ratio must be >= 0, got {t.replay_ratio}")
    if t.replay_ratio > 0 and cfg.algorithm.name not in ("gvpo", "gr_gvpo"):
        raise ValueError(
            f"trainer.replay_ratio={t.replay_ratio} reuses old groups, which only GVPO supports "
            f"without importance weights (algorithm.name={cfg.algorithm.name})"
        )
    if t.lr_decay_style not in ("constant", "linear", "cosine"):
        raise ValueError(f"trainer.lr_decay_style={t.lr_decay_style!r}: constant, linear or cosine")
    if t.prompts_per_step % t.updates_per_round:
        raise ValueError(
            f"trainer.prompts_per_step={t.prompts_per_step} must be a multiple of "
            f"trainer.updates_per_round={t.updates_per_round} (each update takes whole groups)"
        )
    if r.backend not in ("local", "sglang"):
        raise ValueError(f"rollout.backend={r.backend!r}: local or sglang")
    _positive(
        "rollout", n_samples_per_prompt=r.n_samples_per_prompt, max_new_tokens=r.max_new_tokens
    )
    if m.precision not in PRECISIONS:
        raise ValueError(f"model.precision={m.precision!r}: {', '.join(PRECISIONS)}")
    if m.transformer_impl not in ("auto", "transformer_engine", "local"):
        raise ValueError(
            f"model.transformer_impl={m.transformer_impl!r}: auto, transformer_engine or local"
        )
    m.fp8.validate(m.precision, m.transformer_impl)  # hardware checks too: fail before any model
    if m.path is not None and not Path(m.path).exists():
        raise FileNotFoundError(f"model.path={m.path}: no such file or directory")
    if not cfg.reward.rewards:
        raise ValueError("reward.rewards is empty: name at least one reward")
    check_domains(cfg.algorithm, cfg.data.domain_key)
    cfg.data.check_files()
