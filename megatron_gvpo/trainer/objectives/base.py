"""What a training objective is to the loop, and the registry that maps ``algorithm.name`` to it.

An objective owns everything the loop would otherwise switch on by name: its ``algorithm.*``
config (a frozen dataclass, registered as the Hydra schema ``<name>_schema`` of the ``algorithm``
group), whether it needs a frozen reference, how a round's samples get advantages, its per-step
preparation (step-wide statistics, alpha updates) and its micro-batch loss for Megatron, whose
tagged metrics (``trainer.metrics``) reach the logs as they are.

The pure functions in ``megatron_gvpo.algorithms`` are the specification; objectives adapt them to
packed micro-batches so that one optimizer step's gradient is the gradient of the loss over the
step's whole batch, whatever the TP/PP/DP layout and micro-batching (``tests/test_loss_layout.py``).

A new objective is one module in this package (found by ``load_builtin_objectives``) plus one
YAML in ``configs/algorithm/``::

    @dataclass(frozen=True)
    class MyConfig(ObjectiveConfig):
        name: str = "mine"
        alpha: float = 0.5

    @register_objective
    class Mine(Objective):
        Config = MyConfig
        def step_loss(self, step): ...
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from megatron_gvpo.algorithms.config import AlgorithmConfig
from megatron_gvpo.data.batching import StepPlan
from megatron_gvpo.models.forward import MicroBatch, MicroBatchLoss
from megatron_gvpo.trainer.batch import RolloutBatch
from megatron_gvpo.trainer.metrics import Metric

ObjectiveConfig = AlgorithmConfig
"""The base of every objective's ``algorithm.*`` dataclass (frozen): ``name``, ``temperature``,
``needs_reference``, ``reference_path`` and ``check_run``; it lives with the pure losses
(``algorithms/config.py``) so that a loss family's config can be both (``algorithms/grpo.py``)."""


@dataclass
class StepInputs:
    """One optimizer step's samples, as an objective sees them (identical on every rank but
    ``micro_batches``, which are this DP rank's)."""

    batch: RolloutBatch
    plan: StepPlan
    micro_batches: list[MicroBatch]
    step_log_ratio: Callable[[], Tensor]
    """``() -> s - s_base`` [N] float64 of the whole step at the current theta, on every rank:
    summed response logprobs against theta' (RL objectives) or the frozen reference (preference
    objectives). A detached forward plus a DP exchange; exactly 0 with no forward on a round's
    first update, where theta = theta' (``trainer.batch.ThetaPrime``)."""


class Objective:
    """A training objective: build it with its config and the run's data domains."""

    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    supports_replay: ClassVar[bool] = False
    """Whether older groups may be trained on without importance weights (GVPO's Theorem 2)."""
    needs_domains: ClassVar[bool] = False
    """Whether every prompt needs a data-domain label (``data.domain_key``)."""
    offline: ClassVar[bool] = False
    """Whether it trains on a fixed dataset (preference pairs, ``trainer/preference.py``) instead
    of rollouts."""

    def __init__(self, config: ObjectiveConfig, domains: Sequence[str] = ("default",)):
        self.config = config
        self.domains = list(domains)

    def domain_allocation(self) -> Callable[[int], list[int]] | None:
        """Rows per domain of the next step (batch size -> counts in ``domains`` order), which
        ``data.sampling=auto`` follows (group-robust objectives with the stratified estimator);
        default None: uniform sampling."""
        return None

    def set_domain_sizes(self, counts: Sequence[int]) -> None:
        """The dataset's units (pairs, prompts) per domain in ``domains`` order, counted once
        over the training data; default: not needed."""

    def prepare_round(self, batch: RolloutBatch) -> None:
        """Per-round preparation on the assembled batch (advantages); default: nothing."""

    def step_loss(self, step: StepInputs) -> MicroBatchLoss:
        """The micro-batch loss of one optimizer step (after any per-step preparation)."""
        raise NotImplementedError

    def derived_metrics(self, step: dict[str, float]) -> dict[str, float]:
        """Metrics computed from one step's reduced ones (ratios of sums); default: none."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Objective state worth logging after a step (robust weights); default: none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Training state to checkpoint (JSON-able); default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: ``algorithm.name = cls.Config.name`` selects ``cls``; its config becomes
    the Hydra schema ``algorithm/<name>_schema``."""
    name = cls.Config.name
    if not name:
        raise ValueError(f"{cls.__name__}.Config.name is empty")
    if name in OBJECTIVES and OBJECTIVES[name] is not cls:
        raise ValueError(f"objective {name!r} is already registered ({OBJECTIVES[name]})")
    OBJECTIVES[name] = cls
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    # A frozen dataclass makes a read-only node, which the YAML and the command line could not
    # set; the frozen config itself is built from the composed values (``algorithm_config``).
    schema = OmegaConf.structured(cls.Config)
    OmegaConf.set_readonly(schema, None)
    ConfigStore.instance().store(group="algorithm", name=f"{name}_schema", node=schema)
    return cls


def load_builtin_objectives() -> dict[str, type[Objective]]:
    """Import every module of this package (each registers its objectives)."""
    package = importlib.import_module(__package__)
    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name != "base":
            importlib.import_module(f"{__package__}.{mod.name}")
    return OBJECTIVES


def algorithm_config(**raw: Any) -> ObjectiveConfig:
    """The ``algorithm.*`` dataclass of ``raw['name']``; unknown keys and bad values raise a
    ValueError naming ``algorithm.<key>``."""
    objectives = load_builtin_objectives()
    name = raw.get("name", "gvpo")
    if name not in objectives:
        raise ValueError(f"algorithm.name={name!r} is not one of {', '.join(sorted(objectives))}")
    cls = objectives[name].Config
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f"algorithm.{unknown[0]} has no meaning for {name} "
            f"(its keys: {', '.join(sorted(known))})"
        )
    config = cls(**{**raw, "name": name})
    config.check_run()
    return config


def build_objective(config: ObjectiveConfig, domains: Sequence[str] = ("default",)) -> Objective:
    """The registered objective of ``config.name``."""
    return load_builtin_objectives()[config.name](config, domains)


def loss_metrics(loss: Tensor, mb: MicroBatch, entropy: Tensor | None = None) -> dict:
    """The metrics every objective reports: its loss share, samples, and response entropy."""
    x = mb.extra
    out = {
        "loss": Metric(loss.detach().float(), "sum"),
        "num_samples": Metric(float(x["sample_ids"].numel()), "sum"),
    }
    if entropy is not None:
        from megatron_gvpo.models.forward import response_logprobs

        mask = x["response_mask"].to(entropy.device)
        tokens = float(mask.sum())
        if tokens:
            ent = response_logprobs(entropy.detach(), mb).sum() / tokens
            out["entropy"] = Metric(ent.float(), "mean", tokens)
    return out
