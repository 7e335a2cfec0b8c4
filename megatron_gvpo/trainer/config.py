"""The run's configuration as dataclasses, built from Hydra's tree and validated before any model.

Every error names the Hydra key (``trainer.max_steps``, ``parallel.tp``, ``data.path``) so the
fix is one command-line override away.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
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
    # A sample whose reward failed (raise, timeout, non-finite in float32): "drop" takes it out
    # of its group (the group's statistics use the others); "zero" trains on it as a 0 reward.
    on_error: str = "drop"


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
    # Steps whose loss or gradient norm is not finite are skipped (no optimizer update); this
    # many in a row stop the run with an error.
    max_consecutive_skips: int = 3
    # After SIGTERM/SIGUSR1, seconds to wait for the running step before exiting without saving
    # it (the last checkpoint stands); a step that ends in time is saved.
    stop_grace_s: float = 120.0
    # Resume even when algorithm, lr or group size differ from the checkpoint's config.
    allow_config_change: bool = False


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
    _check_types(cls, raw, prefix)
    try:
        return cls(**raw)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(f"{prefix}.") else f"{prefix}: {msg}") from None


_SCALARS = (bool, int, float, str)


def _check_types(cls: type, raw: dict, prefix: str) -> None:
    """Scalar fields get a value of their declared type (``trainer.max_steps=2.5`` or
    ``trainer.seed=abc`` fail here, naming the key); ints are accepted where floats are."""
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        hint = hints.get(name)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = typing.get_args(hint) if union else (hint,)
        allowed = [t for t in options if t in _SCALARS or t is type(None)]
        if len(allowed) != len(options):
            continue  # containers, nested sections: checked by their own code
        ok = any(
            (value is None and t is type(None))
            or (t is bool and isinstance(value, bool))
            or (t is int and isinstance(value, int) and not isinstance(value, bool))
            or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (t is str and isinstance(value, str))
            for t in allowed
        )
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{prefix}.{name} must be {names}, got {value!r}")
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            raw[name] = float(value)


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
    if t.clip_grad < 0:
        raise ValueError(f"trainer.clip_grad must be >= 0 (0: no clipping), got {t.clip_grad}")
    if t.max_consecutive_skips < 1:
        raise ValueError(
            f"trainer.max_consecutive_skips must be >= 1, got {t.max_consecutive_skips}"
        )
    if t.stop_grace_s < 0:
        raise ValueError(f"trainer.stop_grace_s must be >= 0, got {t.stop_grace_s}")
    if cfg.reward.on_error not in ("drop", "zero"):
        raise ValueError(f"reward.on_error={cfg.reward.on_error!r}: drop or zero")
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
    if r.n_samples_per_prompt < 2:
        raise ValueError(
            f"rollout.n_samples_per_prompt={r.n_samples_per_prompt}: {cfg.algorithm.name} learns "
            "from differences within a prompt's group of responses; use 2 or more"
        )
    if r.temperature < 0:
        raise ValueError(f"rollout.temperature must be >= 0, got {r.temperature}")
    if not 0 < r.top_p <= 1:
        raise ValueError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if r.top_k == 0 or r.top_k < -1:
        raise ValueError(f"rollout.top_k must be -1 (off) or >= 1, got {r.top_k}")
    if m.precision not in PRECISIONS:
        raise ValueError(f"model.precision={m.precision!r}: {', '.join(PRECISIONS)}")
    if m.transformer_impl not in ("auto", "transformer_engine", "local"):
        raise ValueError(
            f"model.transformer_impl={m.transformer_impl!r}: auto, transformer_engine or local"
        )
    m.fp8.validate(m.precision, m.transformer_impl)  # hardware checks too: fail before any model
    if m.path is not None and not Path(m.path).exists():
        raise FileNotFoundError(f"model.path={m.path}: no such file or directory")
    if m.path is not None:
        _check_model_type(Path(m.path))
    if not cfg.reward.rewards:
        raise ValueError("reward.rewards is empty: name at least one reward")
    check_domains(cfg.algorithm, cfg.data.domain_key)
    cfg.data.check_files()


def _check_model_type(path: Path) -> None:
    """An unsupported architecture (gpt2, ...) is named before anything is built."""
    from megatron_gvpo.data.tokenizer import hf_dir
    from megatron_gvpo.models.hf_config import SUPPORTED_MODEL_TYPES

    cfg_file = hf_dir(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model.path={path}: no config.json at {cfg_file}")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"model.path: {cfg_file} is not a JSON object ({e})") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model.path: {cfg_file}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
