"""The preference driver (DPO, IPO, GR-DPO, GR-IPO): offline pairs, no rollout.

    next pairs (resumable sampler) -> reference logprobs (frozen model, recomputed per step)
    -> objective.step_loss (GR: alpha moves first) -> Megatron forward_backward -> optimizer step
    -> metrics; evaluation on data.eval_path before the first step, every trainer.eval_interval
    steps and at the end (``trainer/evaluate.py``'s schedule and best checkpoint)
    -> checkpoint every trainer.save_interval

A pair is a group of two samples (chosen, rejected) in a ``RolloutBatch``; the placement plan
keeps groups whole, so both halves of a pair land in one micro-batch and its margin is computed
there. The actor (``trainer/actor.py``) and the run around the steps (``trainer/run.py``:
checkpoints, resume, eval schedule, logging) are the RL driver's too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from megatron_gvpo.data.preference import Pair, PairDataset, load_pairs
from megatron_gvpo.data.prompts import DataError
from megatron_gvpo.data.sampler import build_sampler
from megatron_gvpo.data.tokenizer import load_tokenizer
from megatron_gvpo.demo.preference import write_preference_demo
from megatron_gvpo.models.forward import forward_backward, step_log_ratio
from megatron_gvpo.trainer.actor import Actor
from megatron_gvpo.trainer.batch import (
    RolloutBatch,
    build_micro_batches,
    response_token_logprobs,
)
from megatron_gvpo.trainer.config import RunConfig
from megatron_gvpo.trainer.data import PreferenceDataSection
from megatron_gvpo.trainer.metrics import PhaseClock, reduce_metrics
from megatron_gvpo.trainer.objectives import StepInputs, build_objective
from megatron_gvpo.trainer.objectives.preference import step_margins
from megatron_gvpo.trainer.run import Run
from megatron_gvpo.trainer.setup import resolve_model_path


class PairSource:
    """Tokenised training and evaluation pairs, their domains, and the sampler over training pairs
    (built by :meth:`make_sampler` once the objective says whether it wants balanced steps)."""

    def __init__(
        self,
        cfg: PreferenceDataSection,
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


class PreferenceTrainer(Run):
    """The preference driver: ``round()`` is one optimizer step on the next batch of pairs; the
    rest of the run is :class:`Run`'s."""

    plot_key = "preference/loss"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        t = cfg.trainer
        self.model_path = resolve_model_path(cfg.model)
        # Pairs are read and checked before any model is built.
        self.data = PairSource(
            cfg.data, self.model_path, self.run_dir, t.prompts_per_step, cfg.model.trust_remote_code
        )
        self.objective = build_objective(cfg.algorithm, self.data.domains)
        self.objective.set_domain_sizes(self.data.domain_counts)
        self.data.make_sampler(self.objective.domain_allocation())
        self.actor = Actor(cfg, self.model_path)
        self._eval_batch: RolloutBatch | None = None
        self.resume({"pairs": self.data})

    def round(self) -> dict:
        """One optimizer step on the next batch of pairs."""
        clock = PhaseClock()
        batch = self.data.next_batch()
        plan = self._plan(batch)
        with clock("logprob"):
            batch.ref_logprobs = response_token_logprobs(
                self.actor.reference, batch, plan, self.actor.temperature
            )
        with clock("train"):
            metrics = self._update(batch, plan)
        metrics.update(clock.metrics(tokens=sum(batch.lengths)))
        return metrics

    def _update(self, batch: RolloutBatch, plan) -> dict:
        a = self.actor
        mbs = build_micro_batches(batch, plan)
        ratio = partial(step_log_ratio, a.ddp, mbs, len(batch), a.temperature, "ref_logprobs")
        loss_fn = self.objective.step_loss(StepInputs(batch, plan, mbs, ratio))
        metrics, _ = a.step(mbs, loss_fn, self.cfg.trainer.log_entropy)
        out = {k: float(m.value) for k, m in metrics.items()}  # a skipped step's loss too
        out["train/skipped_steps"] = a.pop_skipped()
        out.update(self.objective.derived_metrics(out))
        out["lr"] = a.lr
        out.update(self.objective.metrics())  # the alpha this step used
        return out

    @property
    def has_eval(self) -> bool:
        return self.data.eval is not None

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The preference metrics on every held-out pair, under ``eval/`` (no training)."""
        if self.data.eval is None:
            return {}
        if self._eval_batch is None:  # the reference is frozen: its logprobs once
            batch = self.data.to_batch(list(self.data.eval.pairs))
            plan = self._plan(batch)
            batch.ref_logprobs = response_token_logprobs(
                self.actor.reference, batch, plan, self.actor.temperature
            )
            self._eval_batch = batch
        batch = self._eval_batch
        plan = self._plan(batch)
        mbs = build_micro_batches(batch, plan)
        h = None
        if not plan.groups_whole:
            a = self.actor
            h = step_margins(
                step_log_ratio(a.ddp, mbs, len(batch), a.temperature, "ref_logprobs"), batch
            )
        loss_fn = self.objective.eval_loss(batch, h)
        results = forward_backward(
            self.actor.ddp, mbs, loss_fn, forward_only=True, temperature=self.actor.temperature
        )
        values = {
            k: float(m.value)
            for k, m in reduce_metrics(results).items()
            if k.startswith("preference/")
        }
        values.update(self.objective.derived_metrics(values))
        return {f"eval/{k}": v for k, v in values.items()}

    def _plan(self, batch: RolloutBatch):
        return self.actor.plan(batch)  # a pair's two halves share a micro-batch
