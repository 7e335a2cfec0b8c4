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
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gvpo.bridge.export import ExportConfig, iter_buckets_on_rank0
from megatron_gvpo.bridge.hf_io import copy_side_files, write_bucket_shards
from megatron_gvpo.data.tokenizer import hf_dir
from megatron_gvpo.models.forward import forward_backward
from megatron_gvpo.models.moe import RouterStats
from megatron_gvpo.models.routing_replay import RoutingReplay
from megatron_gvpo.models.routing_replay import set_active as set_active_replay
from megatron_gvpo.parallel.cpu_compat import native_torch
from megatron_gvpo.parallel.ddp import wrap_with_ddp
from megatron_gvpo.parallel.initialize import destroy, device, initialize
from megatron_gvpo.parallel.launch import broadcast_object, is_rank0
from megatron_gvpo.rollout.base import SamplingParams
from megatron_gvpo.trainer.async_rollout import RoundSource
from megatron_gvpo.trainer.batch import (
    OldLogprobsFromForward,
    RolloutBatch,
    build_micro_batches,
    plan_for,
    response_token_logprobs,
    step_seq_logprobs,
)
from megatron_gvpo.trainer.checkpoint import RunState
from megatron_gvpo.trainer.config import RunConfig
from megatron_gvpo.trainer.data import PromptSource, prompt_room
from megatron_gvpo.trainer.evaluate import EvalSchedule, Evaluator
from megatron_gvpo.trainer.groups import (
    RolloutResult,
    drop_stale,
    filter_groups,
    logprob_mismatch,
    mix_replay,
    request_seed,
    reward_metrics,
    rollout_and_score,
    to_batch,
)
from megatron_gvpo.trainer.guards import (
    StepGuard,
    StopSignal,
)
from megatron_gvpo.trainer.logger import MetricsLogger
from megatron_gvpo.trainer.metrics import Metric, combine_updates, reduce_metrics
from megatron_gvpo.trainer.objectives import StepInputs, build_objective, load_builtin_objectives
from megatron_gvpo.trainer.replay import ReplayBuffer
from megatron_gvpo.trainer.setup import (
    build_engine,
    build_model,
    build_optimizer,
    build_reference,
    build_rewards,
    resolve_model_path,
)
from megatron_gvpo.trainer.sync import build_weight_sync


class Trainer:
    """Holds the run's parts; ``fit()`` runs rounds until ``trainer.max_steps``."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        t, r = cfg.trainer, cfg.rollout
        self.run_dir = Path(t.run_dir)
        # Cheap parts first: a bad reward spec or data file fails before any model is built
        # (the config itself was validated whole by run_config_from_dict).
        self.rewards = build_rewards(cfg.reward) if is_rank0() else None
        self.model_path = resolve_model_path(cfg.model)
        room = prompt_room(self.model_path, r.max_new_tokens, t.max_tokens_per_microbatch)
        self.prompts = PromptSource(
            cfg.data,
            self.model_path,
            self.run_dir,
            t.prompts_per_step,
            cfg.model.trust_remote_code,
            room,
        )
        self.objective = build_objective(cfg.algorithm, self.prompts.domains)
        initialize(cfg.parallel)
        model, self.arch = build_model(cfg.model, self.model_path)
        self.ddp = wrap_with_ddp(model, use_distributed_optimizer=t.use_distributed_optimizer)
        self.router_stats = (
            RouterStats(model, self.arch.num_layers, self.arch.num_experts)
            if self.arch.is_moe
            else None
        )
        self.routing_replay = None
        if self.arch.is_moe and cfg.model.moe.routing_replay == "old":
            self.routing_replay = RoutingReplay(model)
            set_active_replay(self.routing_replay)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, t, cfg.model)
        self.reference = build_reference(cfg, self.model_path)
        self.replay = ReplayBuffer(t.replay_capacity)
        self.step_guard = StepGuard(t.max_consecutive_skips)
        ahead = t.async_training.max_staleness
        self.engine = (
            build_engine(r, self.model_path, cfg.model.trust_remote_code, t.run_dir, ahead > 0)
            if is_rank0()
            else None
        )
        if ahead and self.engine is not None and self.engine.colocated:
            self.engine.shutdown()
            raise ValueError(
                "trainer.async_training.max_staleness > 0 needs an engine that does not share "
                "the trainer's accelerators (this one is colocated)"
            )
        self.rounds = RoundSource(self.prompts, self._rollout if is_rank0() else None, ahead)
        export = ExportConfig(bucket_bytes=r.bucket_mb << 20, fp8=r.fp8)
        self.weight_sync = build_weight_sync(self.ddp, self.arch, export, self.engine)
        self.eval_schedule = EvalSchedule(
            t.eval_interval, t.eval_at_start, t.max_steps, t.save_best, t.save_best_mode
        )
        self.evaluator = (
            Evaluator.build(
                self.prompts.eval_sets,
                cfg.eval,
                cfg.data.eval_sets,
                r.max_new_tokens,
                r.stop,
                t.seed,
            )
            if self.prompts.eval_sets and is_rank0()
            else None
        )
        self.step = 0
        self._resume()
        self.logger = MetricsLogger(self.run_dir, is_rank0(), resume_step=self.step)

    # -------------------------------------------------------------------------------- round

    def round(self) -> dict:
        """One step: rollout, rewards, assemble, logprobs, updates, sync."""
        t = self.cfg.trainer
        clock = _PhaseClock()
        with clock("rollout"):  # async: round self.step was generated while earlier ones trained
            rollout = broadcast_object(self.rounds.next(self.step))
            self.weight_sync.after_rollout()
        if not self.rounds.ahead:
            clock.split("rollout", "reward", rollout.reward_seconds)  # count each second once
        metrics = dict(rollout.metrics)

        drop_failed = self.cfg.reward.on_error == "drop"
        groups = filter_groups(
            rollout.groups, t.min_response_tokens, t.dynamic_sampling, drop_failed, metrics
        )
        # The actor is at version step - 1 (synced after each round); older samples are dropped.
        groups = drop_stale(groups, self.step - 1, self.rounds.max_staleness, metrics)
        metrics.update(reward_metrics(groups))
        fresh = [g for g in groups if g.responses]
        if not self._trainable(fresh, metrics):
            return self._skipped_round(metrics, clock)
        rng = random.Random(request_seed(t.seed, self.step, -1))
        batch = to_batch(
            mix_replay(fresh, self.replay, t.replay_ratio, rng, metrics), self.prompts.domains
        )
        self.objective.prepare_round(batch)

        with clock("logprob"):
            self._old_and_ref_logprobs(batch)
        with clock("train"):
            metrics.update(self._updates(batch))
        metrics.update(logprob_mismatch(batch.old_logprobs, fresh))  # theta' is known now
        with clock("rollout_wait"):
            self.rounds.wait_idle()  # new weights never land inside a generation
        with clock("sync"):
            metrics.update(self.weight_sync.sync(version=self.step))
        metrics.update(self.rounds.metrics())
        metrics.update(clock.metrics(tokens=sum(batch.lengths)))
        return metrics

    def _trainable(self, fresh: list, metrics: dict) -> bool:
        """Whether a group with two responses is left; counts the round if not (raises after
        ``trainer.max_consecutive_skips`` in a row)."""
        trainable = any(len(g.responses) >= 2 for g in fresh)
        why = f"{metrics.get('filter/reward_failed', 0)} failed rewards, "
        why += f"{metrics.get('filter/short_responses', 0)} short responses"
        ok = self.step_guard.round_trainable(trainable, why)
        metrics["train/skipped_rounds"] = int(not ok)
        return ok

    def _skipped_round(self, metrics: dict, clock: _PhaseClock) -> dict:
        """A round with nothing to train on: no update; the engine is still tagged with the step
        (samples keep their versions) and the round is logged."""
        with clock("rollout_wait"):
            self.rounds.wait_idle()
        with clock("sync"):
            metrics.update(self.weight_sync.sync(version=self.step))
        metrics["train/skipped_steps"] = 0
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics.update(self.rounds.metrics())
        metrics.update(clock.metrics(tokens=0))
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
        with native_torch():  # the embedded engine's decode loop makes no CUDA assumption
            return rollout_and_score(
                self.engine, self.rewards, rows, sampling, r.n_samples_per_prompt, seeds
            )

    def evaluate(self) -> dict:
        """The eval sets' metrics (``eval/...``) on every rank, sampled by the driver rank's
        engine with the weights of the last sync; empty without an eval set."""
        if not self.prompts.eval_sets:
            return {}
        self.rounds.wait_idle()  # nothing in flight: the engine holds version self.step only
        metrics = None
        if self.evaluator is not None:
            with native_torch():
                metrics = self.evaluator.run(self.engine, self.rewards, version=self.step)
        return broadcast_object(metrics)

    def _old_and_ref_logprobs(self, batch: RolloutBatch) -> None:
        """theta' (the policy that sampled) and, if the objective needs it, the reference."""
        plan = self._plan(batch)
        temperature = self.cfg.algorithm.temperature
        if self.cfg.trainer.updates_per_round > 1:  # else the only update's forward gives them
            replay = self.routing_replay
            with replay.recording() if replay else nullcontext():
                batch.old_logprobs = response_token_logprobs(self.ddp, batch, plan, temperature)
            if replay is not None:  # every update of the round routes tokens as theta' did
                batch.routes = replay.routes(len(batch))
        if self.reference is not None:
            batch.ref_logprobs = response_token_logprobs(self.reference, batch, plan, temperature)

    def _updates(self, batch: RolloutBatch) -> dict:
        """``trainer.updates_per_round`` optimizer steps, each on whole groups of the batch
        (with routing replay, each routing every token as the round's theta' pass did)."""
        if batch.routes is None:
            return self._run_updates(batch)
        with self.routing_replay.replaying() as replay:
            out = self._run_updates(batch)
        out["moe/routing_replay_flips"] = _dp_mean(replay.flip_fraction())
        return out

    def _run_updates(self, batch: RolloutBatch) -> dict:
        t = self.cfg.trainer
        per_update = []
        for u, sub in enumerate(_split_by_groups(batch, t.updates_per_round)):
            plan = self._plan(sub)
            mbs = build_micro_batches(sub, plan)
            step = StepInputs(sub, plan, mbs, partial(self._step_logprobs, sub, mbs, u == 0))
            loss_fn = self.objective.step_loss(step)
            # theta = theta' at a round's only update: its forward's detached logprobs are s'.
            fill = OldLogprobsFromForward(loss_fn, sub) if sub.old_logprobs is None else None
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            if self.router_stats is not None:
                self.router_stats.reset()
            results = forward_backward(
                self.ddp,
                mbs,
                fill or loss_fn,
                temperature=self.cfg.algorithm.temperature,
                with_entropy=t.log_entropy,
            )
            if fill is not None:  # one update: sub is the whole batch, in order
                batch.old_logprobs = sub.old_logprobs = fill.collect(self.ddp)
            metrics = reduce_metrics(results)
            if self.router_stats is not None:  # collective: expert load summed over ranks
                metrics.update(
                    {k: Metric(v, "mean") for k, v in self.router_stats.metrics().items()}
                )
            values = {k: float(m.value) for k, m in metrics.items()}
            if self.step_guard.skip(self.ddp, self.optimizer, values):
                continue  # non-finite loss or gradient: counted, never applied
            ok, grad_norm, _ = self.optimizer.step()
            if not self.step_guard.stepped(ok, grad_norm):
                continue
            self.scheduler.step(1)
            metrics["grad_norm"] = Metric(float(grad_norm or 0.0), "mean")
            for k, v in self.objective.derived_metrics(values).items():
                metrics[k] = Metric(v, "mean")
            per_update.append(metrics)
        out = combine_updates(per_update)
        out["train/skipped_steps"] = self.step_guard.pop_skipped()
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        out.update(self.objective.metrics())
        return out

    def _step_logprobs(self, sub: RolloutBatch, mbs, first_update: bool):
        """``(s, s')`` of the step's samples at the current theta. On a round's first update
        theta = theta', so s = s' and no forward pass is needed (delta = beta (s - s') is all
        that is used: zeros when s' comes from the update's own forward)."""
        if first_update and sub.old_logprobs is None:
            zeros = torch.zeros(len(sub), dtype=torch.float64)
            return zeros, zeros
        if first_update:
            old = torch.stack([x.double().sum() for x in sub.old_logprobs])
            return old, old
        return step_seq_logprobs(self.ddp, mbs, len(sub), self.cfg.algorithm.temperature)

    def _plan(self, batch: RolloutBatch):
        t = self.cfg.trainer
        pad = 16 if self.cfg.model.fp8.enabled else 8
        return plan_for(batch, t.max_tokens_per_microbatch, t.keep_groups_whole, pad)

    # ---------------------------------------------------------------------- run, save, resume

    def fit(self) -> None:
        """Rounds until ``trainer.max_steps``, or until SIGUSR1/SIGTERM (Slurm's warning before
        a time limit or preemption): then the current step finishes, is saved, and we exit."""
        t = self.cfg.trainer
        stop = StopSignal(t.stop_grace_s)
        self.weight_sync.sync(version=self.step)
        if self.step == 0 and self.prompts.eval_sets and self.eval_schedule.due(0):
            self.logger.log(0, self.evaluate())  # the starting point, before any update
        while self.step < t.max_steps:
            self.step += 1
            metrics = self.round()
            best = self.eval_schedule.after_step(self.step, self.evaluate, metrics)
            self.logger.log(self.step, metrics)
            stopping = stop.agreed()
            if self.step % t.save_interval == 0 or self.step == t.max_steps or stopping or best:
                self.save()
            if t.plot and is_rank0() and (self.step % 10 == 0 or self.step == t.max_steps):
                self.logger.plot()
            if stopping:
                if is_rank0():
                    print(f"stop signal: saved step {self.step}, exiting to be resumed", flush=True)
                break
        self.close()

    def close(self) -> None:
        self.logger.close()
        self.rounds.close()  # rounds in flight are discarded
        if self.engine is not None:
            self.engine.shutdown()
        self.weight_sync.close()
        destroy()

    def _resume(self) -> None:
        t = self.cfg.trainer
        parts = {"prompts": self.prompts, "replay": self.replay, "eval": self.eval_schedule}
        self.state = RunState(self.scheduler, self.objective, parts)
        self.step = self.state.resume(
            self.run_dir, asdict(self.cfg), t.allow_config_change, self.ddp, self.optimizer
        )

    def save(self) -> None:
        t = self.cfg.trainer
        self.state.save(
            self.run_dir,
            self.step,
            asdict(self.cfg),
            self.ddp,
            self.optimizer,
            t.keep_last,
            part_states={"prompts": self.rounds.prompt_state()},  # as of the last trained round
            export_hf=self._export_hf if t.export_hf else None,
            best=self.eval_schedule,
        )

    def _export_hf(self, out_dir: Path) -> None:
        """Collective: rank 0 writes the actor as an HF checkpoint (shards, index, side files)."""
        buckets = iter_buckets_on_rank0(self.ddp, self.arch, ExportConfig())
        if is_rank0():
            write_bucket_shards(buckets, out_dir)
            copy_side_files(hf_dir(self.model_path), out_dir)  # a converted checkpoint: its hf/
        else:
            for _ in buckets:  # take part in the gathers and sends
                pass


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


class _PhaseClock:
    """Wall time per phase of a round (``time/<phase>``) and the step's total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def split(self, phase: str, part: str, seconds: float) -> None:
        """``seconds`` of ``phase`` were really ``part``."""
        self.seconds[phase] -= seconds
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds

    def metrics(self, tokens: int) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/step"] = sum(self.seconds.values())
        out["throughput/tokens_per_s"] = tokens / max(out["time/step"], 1e-9)
        return out


def train(cfg: RunConfig) -> None:
    """Run (or resume) the job described by ``cfg``; offline objectives (preference pairs) have
    their own driver, ``trainer/preference.py``."""
    if load_builtin_objectives()[cfg.algorithm.name].offline:
        from megatron_gvpo.trainer.preference import PreferenceTrainer

        PreferenceTrainer(cfg).fit()
        return
    Trainer(cfg).fit()
