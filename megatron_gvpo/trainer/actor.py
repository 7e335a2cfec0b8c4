"""The actor: the trained model and everything that steps it, shared by every driver.

    Actor(cfg, model_path): parallel state, the model (DDP-wrapped), Megatron's optimizer and LR
    scheduler, the frozen reference when the loss needs one, the step guard; for MoE models the
    router statistics and routing replay
    actor.plan(batch)            where each sample runs (whole groups to one DP rank, packed)
    actor.packing                the run's layout (trainer.max_tokens_per_microbatch,
                                 trainer.keep_groups_whole), for trainer.batch.pack
    actor.step(mbs, loss_fn)     zero grads -> forward_backward -> guard -> optimizer step

A driver (RL rounds in ``trainer/loop.py``, preference steps in ``trainer/preference.py``) owns
what goes into a step; the actor owns how a step is taken, so both drivers skip, count and clip
the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron_gvpo.bridge.export import ExportConfig, iter_buckets_on_rank0
from megatron_gvpo.bridge.hf_io import copy_side_files, write_bucket_shards
from megatron_gvpo.data.batching import StepPlan
from megatron_gvpo.data.tokenizer import hf_dir
from megatron_gvpo.models.forward import MicroBatch, forward_backward
from megatron_gvpo.models.moe import RouterStats
from megatron_gvpo.models.routing_replay import RoutingReplay
from megatron_gvpo.models.routing_replay import set_active as set_active_replay
from megatron_gvpo.parallel.ddp import wrap_with_ddp
from megatron_gvpo.parallel.initialize import initialize
from megatron_gvpo.parallel.launch import is_rank0
from megatron_gvpo.trainer.batch import Packing, RolloutBatch, plan_for
from megatron_gvpo.trainer.config import RunConfig
from megatron_gvpo.trainer.guards import StepGuard
from megatron_gvpo.trainer.metrics import Metric, reduce_metrics
from megatron_gvpo.trainer.setup import build_model, build_optimizer, build_reference


class Actor:
    """The model under training, its optimizer, scheduler, reference and step guard."""

    def __init__(self, cfg: RunConfig, model_path: str):
        t = cfg.trainer
        self.model_path = model_path
        self.temperature = cfg.algorithm.temperature
        self.packing = Packing(  # FP8 GEMMs want multiples of 16
            t.max_tokens_per_microbatch, t.keep_groups_whole, 16 if cfg.model.fp8.enabled else 8
        )
        initialize(cfg.parallel)
        model, self.arch = build_model(cfg.model, model_path)
        self.ddp = wrap_with_ddp(model, use_distributed_optimizer=t.use_distributed_optimizer)
        moe = self.arch.is_moe
        self.router_stats = (
            RouterStats(model, self.arch.num_layers, self.arch.num_experts) if moe else None
        )
        # model.moe.routing_replay: old (theta''s routes) or rollout (the engine's), replayed
        self.routing_replay = None
        self.route_layers: list[int] | None = None  # rollout: the MoE layers the engine reports
        if moe and cfg.model.moe.routing_replay in ("old", "rollout"):
            layers = [i for i, m in enumerate(self.arch.moe_layers) if m]
            self.routing_replay = RoutingReplay(model, cfg.model.moe.routing_replay, layers)
            set_active_replay(self.routing_replay)
            if cfg.model.moe.routing_replay == "rollout":
                self.route_layers = layers
        self.optimizer, self.scheduler = build_optimizer(self.ddp, t, cfg.model)
        self.reference = build_reference(cfg, model_path)
        self.guard = StepGuard(t.max_consecutive_skips)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def plan(self, batch: RolloutBatch, keep_groups_whole: bool = True) -> StepPlan:
        """The placement plan of ``batch``, the same on every rank."""
        p = self.packing
        return plan_for(batch, p.max_tokens_per_microbatch, keep_groups_whole, p.pad_multiple)

    def step(
        self, micro_batches: list[MicroBatch], loss_fn: Callable, with_entropy: bool = False
    ) -> tuple[dict[str, Metric], bool]:
        """One optimizer step on ``micro_batches`` under ``loss_fn``.

        Returns the step's reduced metrics (with ``grad_norm`` when applied) and whether the
        update was applied: a non-finite loss or gradient, or an update the optimizer refused,
        is counted by the guard (``pop_skipped``) and never applied; too many in a row raise.
        """
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.router_stats is not None:
            self.router_stats.reset()
        results = forward_backward(
            self.ddp, micro_batches, loss_fn, temperature=self.temperature,
            with_entropy=with_entropy,
        )
        metrics = reduce_metrics(results)
        if self.router_stats is not None:  # collective: expert load summed over ranks
            metrics.update({k: Metric(v, "mean") for k, v in self.router_stats.metrics().items()})
        values = {k: float(m.value) for k, m in metrics.items()}
        if self.guard.skip(self.ddp, self.optimizer, values):
            return metrics, False
        ok, grad_norm, _ = self.optimizer.step()
        if not self.guard.stepped(ok, grad_norm):
            return metrics, False
        self.scheduler.step(1)
        metrics["grad_norm"] = Metric(float(grad_norm or 0.0), "mean")
        return metrics, True

    def pop_skipped(self) -> int:
        """Steps skipped since the last call."""
        return self.guard.pop_skipped()

    def export_hf(self, out_dir: Path) -> None:
        """Collective: rank 0 writes the actor as an HF checkpoint (shards, index, side files)."""
        buckets = iter_buckets_on_rank0(self.ddp, self.arch, ExportConfig())
        if is_rank0():
            write_bucket_shards(buckets, out_dir)
            copy_side_files(hf_dir(self.model_path), out_dir)  # a converted checkpoint: its hf/
        else:
            for _ in buckets:  # take part in the gathers and sends
                pass
