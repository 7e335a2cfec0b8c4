"""The preference driver (DPO, IPO, GR-DPO, GR-IPO): offline pairs, no rollout.

    next pairs (resumable sampler) -> reference logprobs (frozen model, recomputed per step)
    -> objective.step_loss (GR: alpha moves first) -> Megatron forward_backward -> optimizer step
    -> metrics; evaluation on data.eval_path before the first step, every trainer.eval_interval
    steps and at the end (``trainer/evaluate.py``'s schedule and best checkpoint)
    -> checkpoint every trainer.save_interval

A pair is a group of two samples (chosen, rejected) in a ``RolloutBatch``; the placement plan
keeps groups whole, so both halves of a pair land in one micro-batch and its margin is computed
there. The parts (model, optimizer, reference, checkpoints, logger) are the RL trainer's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from megatron_gvpo.data.preference import Pair, PairDataset, load_pairs
from megatron_gvpo.data.prompts import DataError
from megatron_gvpo.data.sampler import build_sampler
from megatron_gvpo.data.tokenizer import load_tokenizer
from megatron_gvpo.demo.preference import write_preference_demo
from megatron_gvpo.models.forward import forward_backward
from megatron_gvpo.parallel.ddp import wrap_with_ddp
from megatron_gvpo.parallel.initialize import destroy, initialize
from megatron_gvpo.parallel.launch import is_rank0
from megatron_gvpo.trainer.batch import (
    RolloutBatch,
    build_micro_batches,
    plan_for,
    response_token_logprobs,
    step_seq_logprobs,
)
from megatron_gvpo.trainer.checkpoint import RunState
from megatron_gvpo.trainer.config import RunConfig
from megatron_gvpo.trainer.data import DataSection
from megatron_gvpo.trainer.evaluate import EvalSchedule
from megatron_gvpo.trainer.guards import (
    StepGuard,
    StopSignal,
)
from megatron_gvpo.trainer.logger import MetricsLogger
from megatron_gvpo.trainer.loop import _PhaseClock
from megatron_gvpo.trainer.metrics import reduce_metrics
from megatron_gvpo.trainer.objectives import StepInputs, build_objective
from megatron_gvpo.trainer.objectives.preference import step_margins
from megatron_gvpo.trainer.setup import (
    build_model,
    build_optimizer,
    build_reference,
    resolve_model_path,
)


class PairSource:
    """Tokenised training and evaluation pairs, their domains, and the sampler over training pairs
    (built by :meth:`make_sampler` once the objective says whether it wants balanced steps)."""

    def __init__(
        self,
        cfg: DataSection,
        model_path: str,
        run_dir: Path,
        batch_size: int,
        trust_remote_code: bool = False,
    ):
        if cfg.builtin == "preference_demo":
            train, evals = write_preference_demo(run_dir / "data", cfg.builtin_size, cfg.seed)
            cfg = replace(cfg, path=str(train), eval_path=str(evals), builtin=None)
        tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.train = load_pairs(cfg, tokenizer)
        self.eval: PairDataset | None = None
        if cfg.eval_path is not None:
            self.eval = load_pairs(cfg, tokenizer, cfg.eval_path, "data.eval_path")
            unknown = sorted(set(self.eval.domains) - set(self.train.domains))
            if unknown:
                raise DataError(
                    f"data.eval_path: domain {unknown[0]!r} does not occur in data.path "
                    f"(its domains: {', '.join(self.train.domains)})"
                )
        self.domains, self.domain_counts = self.train.domains, self.train.domain_counts
        self.cfg, self.batch_size = cfg, batch_size
        self.make_sampler(None)

    def make_sampler(self, allocation: Callable[[int], list[int]] | None) -> None:
        """The ``data.sampling`` sampler; ``allocation``: the objective's rows per domain of a
        step (``Objective.domain_allocation``), which ``auto`` follows."""
        c = self.cfg
        rows = self.train.domain_index()
        self.sampler = build_sampler(c.sampling, rows, self.batch_size, c.shuffle, c.seed, allocation)

    def next_batch(self) -> RolloutBatch:
        return self.to_batch([self.train[i] for i in self.sampler.next_batch()])

    def to_batch(self, pairs: list[Pair]) -> RolloutBatch:
        """Pair i as samples 2i (chosen, reward +1) and 2i+1 (rejected, reward -1), group id i."""
        index = {d: k for k, d in enumerate(self.domains)}
        prompts, responses, domains = [], [], []
        for p in pairs:
            prompts += [p.prompt_ids, p.prompt_ids]
            responses += [p.chosen_ids, p.rejected_ids]
            domains += [index[p.domain]] * 2
        n = len(pairs)
        return RolloutBatch(
            prompt_ids=prompts,
            response_ids=responses,
            group_ids=torch.arange(n).repeat_interleave(2),
            rewards=torch.tensor([1.0, -1.0]).repeat(n),
            domains=torch.tensor(domains, dtype=torch.long),
        )

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class PreferenceTrainer:
    """Holds the run's parts; ``fit()`` takes optimizer steps until ``trainer.max_steps``."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        t = cfg.trainer
        self.run_dir = Path(t.run_dir)
        self.model_path = resolve_model_path(cfg.model)
        # Pairs are read and checked before any model is built.
        self.data = PairSource(
            cfg.data, self.model_path, self.run_dir, t.prompts_per_step, cfg.model.trust_remote_code
        )
        self.step_guard = StepGuard(t.max_consecutive_skips)
        self.objective = build_objective(cfg.algorithm, self.data.domains)
        self.objective.set_domain_sizes(self.data.domain_counts)
        self.data.make_sampler(self.objective.domain_allocation())
        initialize(cfg.parallel)
        model, self.arch = build_model(cfg.model, self.model_path)
        self.ddp = wrap_with_ddp(model, use_distributed_optimizer=t.use_distributed_optimizer)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, t, cfg.model)
        self.reference = build_reference(cfg, self.model_path)
        self.temperature = cfg.algorithm.temperature
        self._eval_batch: RolloutBatch | None = None
        self.eval_schedule = EvalSchedule(
            t.eval_interval, t.eval_at_start, t.max_steps, t.save_best, t.save_best_mode
        )
        self.step = 0
        self._resume()
        self.logger = MetricsLogger(self.run_dir, is_rank0(), resume_step=self.step)

    def round(self) -> dict:
        """One optimizer step on the next batch of pairs."""
        clock = _PhaseClock()
        batch = self.data.next_batch()
        plan = self._plan(batch)
        with clock("logprob"):
            batch.ref_logprobs = response_token_logprobs(
                self.reference, batch, plan, self.temperature
            )
            batch.old_logprobs = batch.ref_logprobs  # the step-wide (s, r) pass reads "old"
        with clock("train"):
            metrics = self._update(batch, plan)
        metrics.update(clock.metrics(tokens=sum(batch.lengths)))
        return metrics

    def _update(self, batch: RolloutBatch, plan) -> dict:
        t = self.cfg.trainer
        mbs = build_micro_batches(batch, plan)
        step_logprobs = partial(step_seq_logprobs, self.ddp, mbs, len(batch), self.temperature)
        loss_fn = self.objective.step_loss(StepInputs(batch, plan, mbs, step_logprobs))
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = forward_backward(
            self.ddp, mbs, loss_fn, temperature=self.temperature, with_entropy=t.log_entropy
        )
        out = {k: float(m.value) for k, m in reduce_metrics(results).items()}
        out["train/skipped_steps"] = 0
        if self.step_guard.skip(self.ddp, self.optimizer, out):
            out["train/skipped_steps"] = self.step_guard.pop_skipped()
            return out  # non-finite loss or gradient: counted, never applied
        ok, grad_norm, _ = self.optimizer.step()
        if self.step_guard.stepped(ok, grad_norm):
            self.scheduler.step(1)
        out["train/skipped_steps"] = self.step_guard.pop_skipped()
        out["grad_norm"] = float(grad_norm or 0.0)
        out.update(self.objective.derived_metrics(out))
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        out.update(self.objective.metrics())  # the alpha this step used
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The preference metrics on every held-out pair, under ``eval/`` (no training)."""
        if self.data.eval is None:
            return {}
        if self._eval_batch is None:  # the reference is frozen: its logprobs once
            batch = self.data.to_batch(list(self.data.eval.pairs))
            plan = self._plan(batch)
            batch.ref_logprobs = response_token_logprobs(
                self.reference, batch, plan, self.temperature
            )
            batch.old_logprobs = batch.ref_logprobs
            self._eval_batch = batch
        batch = self._eval_batch
        plan = self._plan(batch)
        mbs = build_micro_batches(batch, plan)
        h = None
        if not plan.groups_whole:
            h = step_margins(*step_seq_logprobs(self.ddp, mbs, len(batch), self.temperature), batch)
        loss_fn = self.objective.eval_loss(batch, h)
        results = forward_backward(
            self.ddp, mbs, loss_fn, forward_only=True, temperature=self.temperature
        )
        values = {
            k: float(m.value)
            for k, m in reduce_metrics(results).items()
            if k.startswith("preference/")
        }
        values.update(self.objective.derived_metrics(values))
        return {f"eval/{k}": v for k, v in values.items()}

    def _plan(self, batch: RolloutBatch):
        t = self.cfg.trainer
        pad = 16 if self.cfg.model.fp8.enabled else 8
        return plan_for(batch, t.max_tokens_per_microbatch, True, pad)

    # ---------------------------------------------------------------------- run, save, resume

    def fit(self) -> None:
        """Steps until ``trainer.max_steps`` (or a stop signal: save the step and exit)."""
        t = self.cfg.trainer
        stop = StopSignal(self.cfg.trainer.stop_grace_s)
        if self.step == 0 and self.data.eval is not None and self.eval_schedule.due(0):
            self.logger.log(0, self.evaluate())  # the starting point, before any update
        while self.step < t.max_steps:
            self.step += 1
            metrics = self.round()
            best = self.eval_schedule.after_step(self.step, self.evaluate, metrics)
            self.logger.log(self.step, metrics)
            stopping = stop.agreed()
            if self.step % t.save_interval == 0 or self.step == t.max_steps or stopping or best:
                self.save()
            if stopping:
                if is_rank0():
                    print(f"stop signal: saved step {self.step}, exiting to be resumed", flush=True)
                break
        self.logger.close()
        destroy()

    def _resume(self) -> None:
        t = self.cfg.trainer
        parts = {"pairs": self.data, "eval": self.eval_schedule}
        self.state = RunState(self.scheduler, self.objective, parts)
        self.step = self.state.resume(
            self.run_dir, asdict(self.cfg), t.allow_config_change, self.ddp, self.optimizer
        )

    def save(self) -> None:
        self.state.save(self.run_dir, self.step, asdict(self.cfg), self.ddp, self.optimizer,
                        self.cfg.trainer.keep_last, best=self.eval_schedule)
