"""The RL driver: one round per step, read top to bottom in :meth:`Trainer.round`.

    prompts -> rollout + rewards (the driver rank owns the engine) -> groups on every rank
    -> filters, replay -> batch -> theta' logprobs (+ reference) -> optimizer steps
    -> weight sync -> held-out eval (when due) -> metrics, checkpoint

Every rank runs this loop; ranks hold the same step batch and compute the same placement plan, so
only the rollout, the reward and the engine live on the driver rank (global rank 0). What differs
between algorithms lives in their objective (``trainer/objectives/``); how weights reach the
engine, in the weight-sync strategy (``trainer/sync.py``).
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext

import torch
import torch.distributed as dist

from megatron_gvpo.bridge.export import ExportConfig
from megatron_gvpo.parallel.initialize import device
from megatron_gvpo.parallel.launch import broadcast_object, is_rank0
from megatron_gvpo.rollout.base import SamplingParams
from megatron_gvpo.trainer.actor import Actor
from megatron_gvpo.trainer.async_rollout import RoundSource
from megatron_gvpo.trainer.batch import RolloutBatch, ThetaPrime, pack
from megatron_gvpo.trainer.config import RunConfig
from megatron_gvpo.trainer.data import PromptSource, prompt_room
from megatron_gvpo.trainer.evaluate import Evaluator
from megatron_gvpo.trainer.groups import (
    BatchRules,
    RolloutResult,
    assemble_batch,
    request_seed,
    rollout_and_score,
)
from megatron_gvpo.trainer.metrics import Metric, PhaseClock, combine_updates, logprob_mismatch
from megatron_gvpo.trainer.objectives import StepInputs, build_objective
from megatron_gvpo.trainer.replay import ReplayBuffer
from megatron_gvpo.trainer.run import Run
from megatron_gvpo.trainer.setup import (
    build_engine,
    build_rewards,
    build_turn_runner,
    resolve_model_path,
)
from megatron_gvpo.trainer.sync import build_weight_sync


class Trainer(Run):
    """The RL driver: ``round()`` is one step; the rest of the run is :class:`Run`'s."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        t, r = cfg.trainer, cfg.rollout
        # Cheap parts first: a bad reward spec or data file fails before any model is built
        # (the config itself was validated whole by run_config_from_dict).
        self.rewards = build_rewards(cfg.reward) if is_rank0() else None
        self.model_path = resolve_model_path(cfg.model)
        room = prompt_room(self.model_path, r.response_room, t.max_tokens_per_microbatch)
        self.prompts = PromptSource(
            cfg.data,
            self.model_path,
            self.run_dir,
            t.prompts_per_step,
            cfg.model.trust_remote_code,
            room,
        )
        self.turns = build_turn_runner(r, self.prompts.tokenizer) if is_rank0() else None
        self.objective = build_objective(cfg.algorithm, self.prompts.domains)
        self.objective.set_domain_sizes(self.prompts.domain_counts())
        self.prompts.make_sampler(self.objective.domain_allocation())
        self.actor = Actor(cfg, self.model_path)
        self.theta_prime = ThetaPrime(
            self.actor.ddp, self.actor.temperature, t.updates_per_round, self.actor.packing,
            self.actor.routing_replay, self.actor.reference,
        )  # fmt: skip
        self.batch_rules = BatchRules(
            t.min_response_tokens, t.dynamic_sampling, cfg.reward.on_error == "drop",
            t.async_training.max_staleness, t.replay_ratio, len(self.actor.route_layers or ()),
        )  # fmt: skip
        self.replay = ReplayBuffer(t.replay_capacity)
        ahead = t.async_training.max_staleness
        self.engine = (
            build_engine(
                r, self.model_path, cfg.model.trust_remote_code, t.run_dir, ahead > 0,
                routes=self.actor.route_layers is not None,
            )
            if is_rank0()
            else None
        )
        self.rounds = RoundSource(self.prompts, self._rollout if is_rank0() else None, ahead)
        export = ExportConfig(bucket_bytes=r.bucket_mb << 20, fp8=r.fp8)
        self.weight_sync = build_weight_sync(self.actor.ddp, self.actor.arch, export, self.engine)
        self.evaluator = (
            Evaluator.build(
                self.prompts.eval_sets, cfg.eval, cfg.data.eval_sets, r.max_new_tokens, r.stop,
                t.seed, cfg.reward.round_timeout_s, self.turns,
            )
            if self.prompts.eval_sets and is_rank0()
            else None
        )
        self.resume({"prompts": self.prompts, "replay": self.replay})

    # -------------------------------------------------------------------------------- round

    def round(self) -> dict:
        """One step: rollout, rewards, assemble, logprobs, updates, sync."""
        t = self.cfg.trainer
        clock = PhaseClock()
        with clock("rollout"):  # async: round self.step was generated while earlier ones trained
            rollout = broadcast_object(self.rounds.next(self.step))
            self.weight_sync.after_rollout()
        if not self.rounds.ahead:
            clock.split("rollout", "reward", rollout.reward_seconds)  # count each second once
        metrics = dict(rollout.metrics)
        rng = random.Random(request_seed(t.seed, self.step, -1))
        # The actor is at version step - 1 (synced after each round); older samples are dropped.
        batch, fresh = assemble_batch(
            rollout.groups, self.batch_rules, self.step - 1, self.replay, rng,
            self.prompts.domains, metrics,
        )  # fmt: skip
        # Counted; too many rounds in a row with no group of two responses stop the run.
        why = f"{metrics.get('filter/reward_failed', 0)} failed rewards, "
        why += f"{metrics.get('filter/short_responses', 0)} short responses"
        self.actor.guard.round_trainable(batch is not None, why)
        metrics["train/skipped_rounds"] = int(batch is None)
        tokens = 0
        if batch is not None:
            self.objective.prepare_round(batch)
            with clock("logprob"):
                self.theta_prime.before_updates(batch)
            with clock("train"):
                metrics.update(self._updates(batch))
            metrics.update(logprob_mismatch(batch.old_logprobs, fresh))  # theta' is known now
            tokens = sum(batch.lengths)
        else:  # nothing to train on: no update; the engine is still tagged with the step
            metrics["train/skipped_steps"] = 0
            metrics["lr"] = self.actor.lr
        with clock("rollout_wait"):
            self.rounds.wait_idle()  # new weights never land inside a generation
        with clock("sync"):
            metrics.update(self.weight_sync.sync(version=self.step))
        metrics.update(self.rounds.metrics())
        metrics.update(clock.metrics(tokens=tokens))
        return metrics

    def _rollout(self, step: int, rows) -> RolloutResult:
        """Driver rank: sample ``rollout.n_samples_per_prompt`` responses per prompt of round
        ``step``, score them (in a background thread when rounds are generated ahead)."""
        r, seed = self.cfg.rollout, self.cfg.trainer.seed
        sampling = SamplingParams(
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            stop=list(r.stop),
        )
        seeds = [request_seed(seed, step, i) for i in range(len(rows))]
        return rollout_and_score(
            self.engine, self.rewards, rows, sampling, r.n_samples_per_prompt, seeds,
            round_timeout_s=self.cfg.reward.round_timeout_s, turns=self.turns,
        )  # fmt: skip

    @property
    def has_eval(self) -> bool:
        return bool(self.prompts.eval_sets)

    def evaluate(self) -> dict:
        """The eval sets' metrics (``eval/...``) on every rank, sampled by the driver rank's
        engine with the weights of the last sync; empty without an eval set."""
        if not self.has_eval:
            return {}
        self.rounds.wait_idle()  # nothing in flight: the engine holds version self.step only
        metrics = None
        if self.evaluator is not None:
            metrics = self.evaluator.run(self.engine, self.rewards, version=self.step)
        return broadcast_object(metrics)

    def _updates(self, batch: RolloutBatch) -> dict:
        """``trainer.updates_per_round`` optimizer steps, each on whole groups of the batch
        (with routing replay, each routing every token by ``batch.routes``: as the round's theta'
        pass did, or as the rollout engine did)."""
        replay = self.actor.routing_replay if batch.routes is not None else None
        with replay.replaying() if replay is not None else nullcontext():
            out = self._run_updates(batch)
        if replay is not None:
            out["moe/routing_replay_flips"] = _dp_mean(replay.flip_fraction())
            if self.theta_prime.engine_route_flips is not None:
                out["moe/rollout_route_flips"] = _dp_mean(self.theta_prime.engine_route_flips)
        return out

    def _run_updates(self, batch: RolloutBatch) -> dict:
        t = self.cfg.trainer
        per_update = []
        for u, sub in enumerate(_split_by_groups(batch, t.updates_per_round)):
            plan, mbs = pack(sub, self.actor.packing)
            ratio = self.theta_prime.step_log_ratio(sub, mbs, first=u == 0)
            loss_fn = self.theta_prime.update_loss(
                self.objective.step_loss(StepInputs(sub, plan, mbs, ratio)), sub
            )
            metrics, applied = self.actor.step(mbs, loss_fn, t.log_entropy)
            self.theta_prime.after_update(loss_fn, batch, sub)
            if not applied:
                continue  # non-finite loss or gradient: counted, never applied
            values = {k: float(m.value) for k, m in metrics.items()}
            for k, v in self.objective.derived_metrics(values).items():
                metrics[k] = Metric(v, "mean")
            per_update.append(metrics)
        out = combine_updates(per_update)
        out["train/skipped_steps"] = self.actor.pop_skipped()
        out["lr"] = self.actor.lr
        out.update(self.objective.metrics())
        return out

    # ------------------------------------------------------------------- the run's hooks

    def start(self) -> None:
        self.weight_sync.sync(version=self.step)  # the engine holds the (resumed) actor

    def part_states(self) -> dict:
        return {"prompts": self.rounds.prompt_state()}  # as of the last trained round

    def close(self) -> None:
        self.rounds.close()  # rounds in flight are discarded
        if self.engine is not None:
            self.engine.shutdown()
        self.weight_sync.close()
        super().close()


def _dp_mean(value: float) -> float:
    """The mean of a per-rank float over every rank (identical everywhere after)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _split_by_groups(batch: RolloutBatch, parts: int) -> list[RolloutBatch]:
    """``parts`` sub-batches of whole groups, in group order (fewer if groups run out)."""
    gids = batch.group_ids.tolist()
    order = list(dict.fromkeys(gids))
    per = math.ceil(len(order) / parts)
    subs = []
    for u in range(parts):
        chosen = set(order[u * per : (u + 1) * per])
        if chosen:
            subs.append(batch.select([i for i, g in enumerate(gids) if g in chosen]))
    return subs
