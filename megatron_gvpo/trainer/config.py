"""The run's configuration: dataclasses that are Hydra's structured-config schemas and the checks
that run before any model is built.

Defaults live here, once. Each YAML in ``configs/<group>/`` starts from its group's schema
(``defaults: [<group>_schema]``; an algorithm's from ``<name>_schema``, registered by its
objective) and overrides only what differs, so Hydra rejects unknown keys and values of the wrong
type, naming the key. ``run_config_from_dict`` then builds the dataclasses and checks them in
three tiers, all before any model is built: each section checks its own fields as it is built
(``__post_init__``), then the checks of its own that read files, import code or probe hardware
(``check()``); ``validate`` holds only the checks that span sections (the algorithm against the
loop, data and rollouts; rollouts against the model; the layout against the world size). Every
error is one line naming the Hydra key, one command-line override away from the fix.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_gvpo.models.fp8 import FP8Config
from megatron_gvpo.models.gpt import PRECISIONS
from megatron_gvpo.models.moe import MoEConfig
from megatron_gvpo.parallel.initialize import ParallelConfig, validate_layout
from megatron_gvpo.trainer.data import (
    DataSection,
    PreferenceDataSection,
    preference_only_fields,
)
from megatron_gvpo.trainer.evaluate import EvalSection, eval_set_config
from megatron_gvpo.trainer.objectives import (
    Objective,
    ObjectiveConfig,
    algorithm_config,
    load_builtin_objectives,
)

TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")


@dataclass
class ModelSection:
    """``model.*``: the actor's weights and how Megatron builds it."""

    path: str | None = None
    """An HF folder (safetensors) or a converted checkpoint; None: the demo model, built once."""
    demo_cache_dir: str = "~/.cache/megatron_gvpo"
    """Where the demo model is built and cached."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (parameters and compute)."""
    transformer_impl: str = "auto"
    """auto (Transformer Engine on GPU when installed), transformer_engine or local."""
    recompute_granularity: str | None = None
    """Activation recompute: None, selective or full."""
    trust_remote_code: bool = False
    """Let transformers run code shipped in a model folder (tokenizer, config)."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 GEMMs through Transformer Engine (``models/fp8.py``)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts models: router losses and token dispatcher (``models/moe.py``)."""

    def __post_init__(self) -> None:
        if isinstance(self.fp8, dict):  # from Hydra: the model.fp8 sub-tree
            self.fp8 = FP8Config.from_dict(self.fp8, prefix="model.fp8")
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.precision not in PRECISIONS:
            raise ValueError(f"model.precision={self.precision!r}: {', '.join(PRECISIONS)}")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(
                f"model.transformer_impl={self.transformer_impl!r}: auto, transformer_engine or "
                "local"
            )
        self.moe.validate()
        if self.moe.routing_replay != "off" and self.path is None:
            raise ValueError(
                f"model.moe.routing_replay={self.moe.routing_replay!r} needs a mixture-of-experts "
                "model.path; the demo model is dense"
            )

    def check(self) -> None:
        """The checks that touch files or hardware: FP8 needs Transformer Engine on an FP8 GPU
        (checked before any model is built), and ``model.path`` exists."""
        self.fp8.validate(self.precision, self.transformer_impl)
        if self.path is not None:
            _check_exists(Path(self.path), "model.path")


LOCAL_DTYPES = ("auto", "float32", "bfloat16", "float16")
LOCAL_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


@dataclass
class LocalEngineSection:
    """``rollout.local.*``: the embedded transformers engine (``rollout/local.py``)."""

    device: str = "cpu"
    """Where it generates (cpu, cuda, cuda:N)."""
    max_batch_size: int = 256
    """Responses generated together (SGLang keeps every request of a round in flight instead, up
    to ``rollout.sglang.max_concurrency`` per server)."""
    process: bool | None = None
    """Run it in its own process (``rollout/process.py``) so generation overlaps training;
    None: only when ``trainer.async_training.max_staleness > 0``."""
    sampling_dtype: str = "auto"
    """The engine's weight dtype: auto (the checkpoint's), float32, bfloat16 or float16. A dtype
    other than the actor's samples from a perturbed policy (engine/trainer mismatch, as bf16
    inference engines have); ``rollout/logprob_abs_diff/*`` measures the gap."""

    def __post_init__(self) -> None:
        if not LOCAL_DEVICE.fullmatch(self.device):
            raise ValueError(f"rollout.local.device={self.device!r}: cpu, cuda or cuda:N")
        if self.max_batch_size < 1:
            raise ValueError(
                f"rollout.local.max_batch_size must be >= 1, got {self.max_batch_size}"
            )
        if self.sampling_dtype not in LOCAL_DTYPES:
            raise ValueError(
                f"rollout.local.sampling_dtype={self.sampling_dtype!r}: {', '.join(LOCAL_DTYPES)}"
            )


@dataclass
class RolloutSection:
    """``rollout.*``: how responses are sampled, and the engine that samples them."""

    backend: str = "local"
    """local (transformers in the driver process) or sglang (SGLang servers)."""
    n_samples_per_prompt: int = 8
    """Responses per prompt: the group size k."""
    max_new_tokens: int = 24
    """Response length limit."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1: off."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (the response keeps them)."""
    bucket_mb: int = 512
    """Weight-sync bucket size."""
    fp8: bool = False
    """Blockwise e4m3 weight sync (needs an FP8-capable engine)."""
    sglang: dict[str, Any] = field(default_factory=dict)
    """``SGLangConfig`` fields (``rollout/sglang/config.py``), checked with the rest of the config."""
    local: LocalEngineSection = field(default_factory=LocalEngineSection)
    """The embedded engine's own settings (``backend=local``)."""
    env: str | None = None
    """Multi-turn rollouts: ``path/to/file.py:Name`` or ``module:Name``, an environment class
    (``rollout/env.py``) built per trajectory with the dataset row. None: one turn, no env."""
    max_turns: int = 1
    """Model turns per trajectory (with ``rollout.env``); more cut it short (``truncated``)."""
    max_total_tokens: int = 0
    """Tokens after the prompt a trajectory may hold, model turns and observations together
    (0: ``max_turns * max_new_tokens``); a trajectory reaching it is cut (``truncated``)."""
    turn_stop: list[str] = field(default_factory=list)
    """Stop strings that end a model turn and stay in it (e.g. ``</tool_call>``)."""
    env_observation_role: str | None = None
    """None: observations are appended as plain text; ``tool`` or ``user``: wrapped as that
    role's message by the tokenizer's chat template."""
    env_timeout_s: float | None = None
    """Seconds an environment call (constructor, reset, step) may take; past it the sample is
    dropped like a failed reward and counted in ``env/timeouts`` (None: no limit)."""
    env_workers: int = 16
    """Environment calls that may run at once (steps of different trajectories overlap)."""

    @property
    def response_room(self) -> int:
        """Tokens after the prompt one sample may hold: a response, or a whole trajectory."""
        if self.env is None:
            return self.max_new_tokens
        return self.max_total_tokens or self.max_turns * self.max_new_tokens

    def __post_init__(self) -> None:
        if isinstance(self.local, dict):  # from Hydra: the rollout.local sub-tree
            self.local = _section(LocalEngineSection, self.local, "rollout.local")
        if self.backend not in ("local", "sglang"):
            raise ValueError(f"rollout.backend={self.backend!r}: local or sglang")
        if self.backend == "sglang" and self.local != LocalEngineSection():
            raise ValueError(
                "rollout.local.* set the embedded engine's options: rollout.backend=local"
            )
        _positive(
            "rollout",
            n_samples_per_prompt=self.n_samples_per_prompt,
            max_new_tokens=self.max_new_tokens,
            bucket_mb=self.bucket_mb,
        )
        _nonnegative("rollout", temperature=self.temperature)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"rollout.top_k must be -1 (off) or >= 1, got {self.top_k}")
        self._check_turn_keys()

    def _check_turn_keys(self) -> None:
        """The multi-turn keys mean something only with ``rollout.env``."""
        if self.env is not None:
            _nonnegative("rollout", max_total_tokens=self.max_total_tokens)
            return
        for key, value, default in (
            ("max_turns", self.max_turns, 1),
            ("max_total_tokens", self.max_total_tokens, 0),
            ("turn_stop", list(self.turn_stop), []),
            ("env_observation_role", self.env_observation_role, None),
            ("env_timeout_s", self.env_timeout_s, None),
        ):
            if value != default:
                raise ValueError(
                    f"rollout.{key}={value!r} sets multi-turn rollouts: it needs rollout.env"
                )

    def check(self) -> None:
        """The checks that import code: the ``rollout.env`` class imports and has reset/step,
        the turn loop takes the multi-turn settings, and ``rollout.sglang`` is a valid
        ``SGLangConfig`` (errors name ``rollout.sglang.<key>``)."""
        if self.env is not None:
            from megatron_gvpo.rollout.env import load_env
            from megatron_gvpo.rollout.turns import OBSERVATION_ROLES

            load_env(self.env)
            role = self.env_observation_role
            if role is not None and role not in OBSERVATION_ROLES:
                raise ValueError(
                    f"rollout.env_observation_role={role!r}: {', '.join(OBSERVATION_ROLES)} or null"
                )
            turn_settings(self)  # the remaining ranges
        if self.backend == "sglang":
            sglang_config(self, SGLANG_MODEL_PLACEHOLDER)


SGLANG_MODEL_PLACEHOLDER = "<model.path>"
"""What ``rollout.sglang`` is checked with before the model's path is resolved (the demo model is
built later); only its presence matters to the check."""


@dataclass
class RewardSection:
    """``reward.*``: a weighted sum of registered rewards."""

    rewards: list[Any] = field(default_factory=lambda: [{"name": "toy_addition"}])
    """Each ``{name, weight, kwargs...}``: a registered reward or ``module:function``."""
    on_error: str = "drop"
    """A sample whose reward failed (raised, timed out, non-finite in float32): ``drop`` takes it
    out of its group (the group's statistics use the others); ``zero`` trains on it as 0."""
    round_timeout_s: float | None = None
    """One deadline per round: a round's rewards are due this many seconds after its last
    response arrives. Remote rewards stop there (requests in flight are abandoned, no retry
    starts) and samples still unscored fail as ``on_error`` says, counted in
    ``reward_fn/round_deadline_missed``. None: no round deadline (each remote request still has
    its own ``request_timeout_s``)."""

    def __post_init__(self) -> None:
        if self.on_error not in ("drop", "zero"):
            raise ValueError(f"reward.on_error={self.on_error!r}: drop or zero")
        rt = self.round_timeout_s
        if rt is not None and (
            isinstance(rt, bool) or not isinstance(rt, (int, float))
            or not math.isfinite(rt) or rt <= 0
        ):  # fmt: skip
            raise ValueError(
                f"reward.round_timeout_s must be a finite number > 0 or null, got {rt!r}"
            )

    def check(self) -> None:
        """Each ``reward.rewards`` entry names a registered reward or an importable function,
        with arguments it takes."""
        from megatron_gvpo.rewards import check_reward_configs

        check_reward_configs(self.rewards)


@dataclass
class AsyncTrainingSection:
    """``trainer.async_training.*``: rollout overlapped with training (``trainer/async_rollout.py``).

    Named after verl's ``async_training`` section: ``trainer.async`` cannot be a
    dataclass field (``async`` is a Python keyword) and Hydra's structured configs are dataclasses.
    """

    max_staleness: int = 0
    """Rounds generated ahead of training: round t + k is sampled by the weights of version
    t - 1 while round t trains; samples older than actor version - k are dropped and counted.
    0: the synchronous loop. Exact for GVPO (Theorem 2); the GRPO family may add algorithm.use_tis."""

    def __post_init__(self) -> None:
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int):
            raise ValueError(
                f"trainer.async_training.max_staleness must be an int, got {self.max_staleness!r}"
            )
        _nonnegative("trainer.async_training", max_staleness=self.max_staleness)


@dataclass
class TrainerSection:
    """``trainer.*``: the loop, the optimizer, checkpoints."""

    run_dir: str = "runs/demo"
    """Metrics, TensorBoard, checkpoints; a run with the same run_dir resumes."""
    seed: int = 1234
    max_steps: int = 60
    """Rounds (one rollout each)."""
    prompts_per_step: int = 16
    """Prompts per round (each sampled rollout.n_samples_per_prompt times)."""
    updates_per_round: int = 1
    """Optimizer steps per round, each on prompts_per_step / updates_per_round whole groups. With
    1, theta = theta' at every update and GVPO's variance term never acts (centred REINFORCE)."""
    lr: float = 1e-3
    min_lr: float = 1e-4
    """Floor of the decayed learning rate (<= lr)."""
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"
    """constant, linear or cosine."""
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    use_distributed_optimizer: bool = False
    max_tokens_per_microbatch: int = 4096
    """Token budget of one packed micro-batch."""
    keep_groups_whole: bool = True
    """Keep every group in one micro-batch when it fits (no step-wide statistics pass)."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (DAPO); GVPO trains on them."""
    min_response_tokens: int = 0
    """Drop responses shorter than this."""
    replay_ratio: float = 0.0
    """GVPO off-policy reuse: replayed groups per fresh group (0 = off)."""
    replay_capacity: int = 256
    """Groups kept in the replay buffer."""
    save_interval: int = 20
    keep_last: int = 2
    """Checkpoints kept."""
    export_hf: bool = False
    """Also write an HF folder into every checkpoint."""
    plot: bool = True
    """Write reward_curve.png every 10 steps."""
    log_entropy: bool = True
    """Report the policy's mean response-token entropy (one more reduction over the vocabulary)."""
    max_consecutive_skips: int = 3
    """Steps whose loss or gradient norm is not finite are skipped (no update); this many in a
    row stop the run with an error."""
    stop_grace_s: float = 120.0
    """After SIGTERM/SIGUSR1, seconds to wait for the running step before exiting without saving
    it (the last checkpoint stands); a step that ends in time is saved."""
    allow_config_change: bool = False
    """Resume even when algorithm, lr or group size differ from the checkpoint's config."""
    eval_interval: int = 0
    """Evaluate the eval sets (data.eval_path, data.eval_sets) every this many steps; 0: only at
    the end (the last step always evaluates)."""
    eval_at_start: bool = True
    """Also evaluate before any update: a ``"step": 0`` row (fresh runs; a resumed run has it)."""
    save_best: str | None = None
    """An eval metric (e.g. ``eval/accuracy``): keep the checkpoint of its best step beside the
    keep_last ones (``checkpoints/best.json`` names it); exported as HF with export_hf."""
    save_best_mode: str = "max"
    """max or min: which direction of trainer.save_best is better."""
    async_training: AsyncTrainingSection = field(default_factory=AsyncTrainingSection)
    """Rollout overlapped with training (off by default)."""

    def __post_init__(self) -> None:
        if isinstance(self.async_training, dict):  # from Hydra: the sub-tree
            self.async_training = _section(
                AsyncTrainingSection, self.async_training, "trainer.async_training"
            )
        self._check_optimizer()
        self._check_loop()

    def _check_optimizer(self) -> None:
        """The optimizer and its schedule: positive, finite, the decay's floor below lr."""
        _positive("trainer", lr=self.lr)
        _finite(
            "trainer",
            lr=self.lr,
            min_lr=self.min_lr,
            weight_decay=self.weight_decay,
            clip_grad=self.clip_grad,
            adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2,
            replay_ratio=self.replay_ratio,
        )
        if self.clip_grad < 0:
            raise ValueError(
                f"trainer.clip_grad must be >= 0 (0: no clipping), got {self.clip_grad}"
            )
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(
                f"trainer.min_lr={self.min_lr} must lie in [0, trainer.lr={self.lr}] "
                "(the decay's floor)"
            )
        _nonnegative("trainer", lr_warmup_steps=self.lr_warmup_steps)
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"trainer.lr_decay_style={self.lr_decay_style!r}: constant, linear or cosine"
            )

    def _check_loop(self) -> None:
        """The loop, replay, guards, checkpoints and evaluation schedule."""
        _positive(
            "trainer",
            max_steps=self.max_steps,
            prompts_per_step=self.prompts_per_step,
            updates_per_round=self.updates_per_round,
            max_tokens_per_microbatch=self.max_tokens_per_microbatch,
            save_interval=self.save_interval,
            keep_last=self.keep_last,
            replay_capacity=self.replay_capacity,
        )
        _nonnegative(
            "trainer",
            replay_ratio=self.replay_ratio,
            stop_grace_s=self.stop_grace_s,
            eval_interval=self.eval_interval,
        )
        if self.max_consecutive_skips < 1:
            raise ValueError(
                f"trainer.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}"
            )
        if self.save_best_mode not in ("max", "min"):
            raise ValueError(f"trainer.save_best_mode={self.save_best_mode!r}: max or min")
        if self.save_best is not None and not self.save_best.startswith("eval/"):
            raise ValueError(
                f"trainer.save_best={self.save_best!r}: name an eval metric, e.g. eval/accuracy"
            )


@dataclass
class RunConfig:
    model: ModelSection
    parallel: ParallelConfig
    algorithm: ObjectiveConfig
    rollout: RolloutSection
    reward: RewardSection
    data: DataSection
    """A ``PreferenceDataSection`` for preference objectives."""
    trainer: TrainerSection
    eval: EvalSection = field(default_factory=EvalSection)


_SECTION_TYPES = {
    "model": ModelSection,
    "parallel": ParallelConfig,
    "rollout": RolloutSection,
    "reward": RewardSection,
    "data": DataSection,
    "trainer": TrainerSection,
    "eval": EvalSection,
}
"""Each section's schema, ``<group>_schema`` in Hydra (``data`` also has
``preference_data_schema``, see :func:`data_section_type`)."""


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (``<group>_schema``; objectives store theirs)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, cls in _SECTION_TYPES.items():
        cs.store(group=group, name=f"{group}_schema", node=cls)
    cs.store(group="data", name="preference_data_schema", node=PreferenceDataSection)
    load_builtin_objectives()


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
    ``trainer.seed=abc`` fail here, naming the key, also when a dict does not come through
    Hydra's schema); ints are accepted where floats are."""
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


def data_section_type(raw: dict | None, offline: bool) -> type[DataSection]:
    """``data.*``'s schema: preference pairs' (``data.chosen_key``, ...) for an offline objective,
    or where the data config has their keys (``data=preference`` composed for an RL objective:
    :func:`validate` names that mismatch); else the RL one, which has no such keys."""
    if offline or set(raw or {}) & preference_only_fields():
        return PreferenceDataSection
    return DataSection


def sections_from_dict(raw: dict, check: bool = False) -> RunConfig:
    """The config's dataclasses from a plain dict. Unknown keys fail, and each section checks
    its own values as it is built; ``check``: also each section's ``check()`` (files, imports,
    hardware; off for tools that only read the config). Checks that span sections are
    :func:`validate`'s."""
    unknown = sorted(set(raw) - set(_SECTION_TYPES) - {"algorithm", "hydra"})
    if unknown:
        raise ValueError(f"unknown config group {unknown[0]!r}")
    algorithm = algorithm_config(**(raw.get("algorithm") or {}))
    offline = load_builtin_objectives()[algorithm.name].offline
    schemas = {**_SECTION_TYPES, "data": data_section_type(raw.get("data"), offline)}
    sections = {k: _section(cls, raw.get(k), k) for k, cls in schemas.items()}
    if check:
        for section in sections.values():
            if hasattr(section, "check"):
                section.check()
    return RunConfig(algorithm=algorithm, **sections)


def run_config_from_dict(raw: dict) -> RunConfig:
    """Build and check the whole config from a plain dict (``OmegaConf.to_container``)."""
    cfg = sections_from_dict(raw, check=True)
    validate(cfg)
    return cfg


def _finite(prefix: str, **values: float) -> None:
    """inf and nan pass every ``<`` / ``>`` check (nan compares false): refuse them by name."""
    for k, v in values.items():
        if not math.isfinite(v):
            raise ValueError(f"{prefix}.{k} must be a finite number, got {v!r}")


def _positive(prefix: str, **values: float) -> None:
    for k, v in values.items():
        if v is None or not v > 0:  # nan too
            raise ValueError(f"{prefix}.{k} must be > 0, got {v!r}")


def _nonnegative(prefix: str, **values: float) -> None:
    for k, v in values.items():
        if v < 0:
            raise ValueError(f"{prefix}.{k} must be >= 0, got {v}")


def turn_settings(r: RolloutSection):
    """``rollout.*`` as the turn loop's ``TurnSettings`` (``rollout/turns.py``)."""
    from megatron_gvpo.rollout.turns import TurnSettings

    return TurnSettings(
        max_turns=r.max_turns,
        max_total_tokens=r.response_room,
        turn_stop=list(r.turn_stop),
        env_timeout_s=r.env_timeout_s,
        env_workers=r.env_workers,
    )


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """The checks that span sections (each section checked its own fields when it was built):
    the layout against the world size, the algorithm against the loop, rollouts, model and
    data; all before any model is built."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    validate_layout(cfg.parallel, world_size)
    objective = load_builtin_objectives()[cfg.algorithm.name]
    _check_loop_fits_algorithm(cfg, objective)
    _check_rollout_fits_run(cfg, objective)
    _check_model_fits_run(cfg, objective)
    _check_data_fits_run(cfg, objective)


def _check_loop_fits_algorithm(cfg: RunConfig, objective: type[Objective]) -> None:
    """``trainer.*`` against the algorithm: replay, whole groups per update, group size."""
    t, r, name = cfg.trainer, cfg.rollout, cfg.algorithm.name
    if t.replay_ratio > 0 and not objective.supports_replay:
        raise ValueError(
            f"trainer.replay_ratio={t.replay_ratio} reuses old groups, which only GVPO supports "
            f"without importance weights (algorithm.name={name})"
        )
    if objective.offline:
        return  # preference steps: no groups, no rollouts
    if t.prompts_per_step % t.updates_per_round:
        raise ValueError(
            f"trainer.prompts_per_step={t.prompts_per_step} must be a multiple of "
            f"trainer.updates_per_round={t.updates_per_round} (each update takes whole groups)"
        )
    if t.max_tokens_per_microbatch <= r.response_room:
        what = (
            f"rollout.max_new_tokens={r.max_new_tokens}"
            if r.env is None
            else f"a trajectory of up to rollout.max_total_tokens={r.response_room}"
        )
        raise ValueError(
            f"trainer.max_tokens_per_microbatch={t.max_tokens_per_microbatch} cannot hold one "
            f"sample: a prompt token plus {what} tokens need {r.response_room + 1} or more"
        )
    if r.n_samples_per_prompt < 2:
        raise ValueError(
            f"rollout.n_samples_per_prompt={r.n_samples_per_prompt}: {name} learns from "
            "differences within a prompt's group of responses; use 2 or more"
        )


def _check_rollout_fits_run(cfg: RunConfig, objective: type[Objective]) -> None:
    """``rollout.*`` against the algorithm, async training and the rewards."""
    r, t = cfg.rollout, cfg.trainer
    if r.env is not None and objective.offline:
        raise ValueError("rollout.env rolls out trajectories: a preference objective has none")
    if r.backend == "sglang" and t.async_training.max_staleness > 0:
        if sglang_config(r, SGLANG_MODEL_PLACEHOLDER).weight_sync == "tensor":
            raise ValueError(
                "trainer.async_training.max_staleness > 0 needs an engine that does not share the "
                "trainer's accelerators: rollout.sglang.weight_sync=tensor is the colocated mode "
                "(use distributed or disk)"
            )
    if not cfg.reward.rewards and r.env is None:
        raise ValueError(
            "reward.rewards is empty: name at least one reward (only a rollout.env may be the "
            "sole source of rewards)"
        )


def _check_model_fits_run(cfg: RunConfig, objective: type[Objective]) -> None:
    """``model.*`` against the layout, the rollouts and routing replay."""
    m, r, p = cfg.model, cfg.rollout, cfg.parallel
    if m.moe.routing_replay == "rollout":
        _check_rollout_routes(r, cfg.trainer, objective.offline)
    if p.ep > 1 and m.path is None:
        raise ValueError(
            f"parallel.ep={p.ep} needs a mixture-of-experts model.path; the demo model is dense"
        )
    if m.path is None:
        return
    context = _check_model_type(Path(m.path), p, m.moe)
    if r.max_new_tokens >= context and not objective.offline:
        raise ValueError(
            f"rollout.max_new_tokens={r.max_new_tokens} leaves no room for a prompt in the "
            f"model's context (max_position_embeddings={context} in model.path={m.path})"
        )


def _check_data_fits_run(cfg: RunConfig, objective: type[Objective]) -> None:
    """``data.*`` against the algorithm (prompts or pairs, domain labels), the eval settings
    and ``trainer.save_best``."""
    d, name, offline = cfg.data, cfg.algorithm.name, objective.offline
    if offline and d.builtin == "toy_addition":
        raise ValueError(
            f"algorithm.name={name} trains on preference pairs, not prompts: use "
            "data=preference data.path=<pairs.jsonl> or data=preference_demo"
        )
    if not offline and d.builtin == "preference_demo":
        raise ValueError(
            f"data.builtin=preference_demo holds preference pairs: algorithm.name={name} "
            f"needs prompts (use algorithm={_offline_names()})"
        )
    if not offline and isinstance(d, PreferenceDataSection):
        raise ValueError(
            "data.chosen_key and data.rejected_key are preference pairs' keys (data=preference): "
            f"algorithm.name={name} trains on prompts (use data=jsonl, or "
            f"algorithm={_offline_names()})"
        )
    for set_name, spec in (d.eval_sets or {}).items():
        eval_set_config(cfg.eval, set_name, spec)  # each set's own eval.* settings, typed now
    if cfg.trainer.save_best is not None and not d.has_eval():
        raise ValueError(
            f"trainer.save_best={cfg.trainer.save_best!r} needs an eval set: set data.eval_path "
            "or data.eval_sets"
        )
    if objective.needs_domains and not d.domain_key:
        raise ValueError(
            f"algorithm.name={name} needs a domain label per prompt: set data.domain_key "
            "to the field that holds it"
        )


def _offline_names() -> str:
    """The preference objectives, for messages: ``dpo, ipo, gr_dpo or gr_ipo``."""
    names = [n for n, o in load_builtin_objectives().items() if o.offline]
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)


def _check_exists(path: Path, key: str) -> None:
    """``path`` exists; a symlink loop or a dangling link is named as such (``Path.exists`` says
    only False for both)."""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python 3.11 raises this for a loop
        raise FileNotFoundError(f"{key}={path}: a symlink loop") from None
    except FileNotFoundError:
        if path.is_symlink():
            raise FileNotFoundError(
                f"{key}={path}: a symlink to {os.readlink(path)}, which does not exist"
            ) from None
        raise FileNotFoundError(f"{key}={path}: no such file or directory") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileNotFoundError(f"{key}={path}: a symlink loop") from None
        raise FileNotFoundError(f"{key}={path}: {e.strerror}") from None


def _check_model_type(path: Path, parallel: ParallelConfig, moe: MoEConfig) -> int:
    """An unsupported architecture (gpt2, ...), or one the layout cannot split, is named before
    anything is built. Returns the model's context length (``max_position_embeddings``, 4096
    when the config has none)."""
    from megatron_gvpo.data.tokenizer import hf_dir
    from megatron_gvpo.models.hf_config import (
        MOE_MODEL_TYPES,
        SUPPORTED_MODEL_TYPES,
        check_parallel_layout,
        read_hf_config,
    )

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
    context = int(json.loads(cfg_file.read_text()).get("max_position_embeddings", 4096))
    if model_type not in MOE_MODEL_TYPES and parallel.ep == 1 and moe.routing_replay == "off":
        return context  # dense: the layout is checked against the full config when built
    arch = read_hf_config(cfg_file)
    if moe.routing_replay != "off" and not arch.is_moe:
        raise ValueError(
            f"model.moe.routing_replay={moe.routing_replay!r} needs a mixture-of-experts model; "
            f"model.path {cfg_file} is {arch.model_type}"
        )
    check_parallel_layout(
        arch,
        parallel.tp,
        parallel.pp,
        source=f"model.path: {cfg_file}",
        ep=parallel.ep,
        etp=parallel.etp,
    )
    return context


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


ROUTE_REPORTING_BACKENDS = ("local", "sglang")
"""Engines that report each token's experts (``Sample.routes``): the embedded engine from
transformers' routers, SGLang servers started with ``--enable-return-routed-experts``."""


def _check_rollout_routes(r: RolloutSection, t, offline: bool) -> None:
    """``model.moe.routing_replay=rollout`` needs rollouts whose engine reports routes, and
    every trained sample fresh from the engine."""
    if offline:
        raise ValueError(
            "model.moe.routing_replay=rollout replays the rollout engine's routes; preference "
            "training has no rollouts (use old or off)"
        )
    if r.backend not in ROUTE_REPORTING_BACKENDS:
        raise ValueError(
            f"model.moe.routing_replay=rollout: rollout.backend={r.backend!r} reports no routes "
            f"({', '.join(ROUTE_REPORTING_BACKENDS)} do)"
        )
    if t.replay_ratio > 0:
        raise ValueError(
            f"model.moe.routing_replay=rollout: trainer.replay_ratio={t.replay_ratio} replays "
            "older groups, which carry no engine routes (use routing_replay=old)"
        )


def sglang_config(r: RolloutSection, model_path: str, run_dir: str | None = None):
    """``rollout.sglang`` as an ``SGLangConfig``; errors name ``rollout.sglang.<key>``."""
    from megatron_gvpo.rollout.sglang import SGLangConfig

    return _section(SGLangConfig, sglang_kwargs(r, model_path, run_dir), "rollout.sglang")


register_configs()
