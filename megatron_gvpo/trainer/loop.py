"""The RL driver: one round per step, top to bottom.

    prompts -> rollout (rank 0 owns the engine) -> rewards -> broadcast -> filters, replay
    -> theta' logprobs (+ reference) -> updates_per_round optimizer steps -> weight sync
    -> metrics, checkpoint

Every rank runs this loop; ranks hold the same step batch and compute the same placement plan,
so only the rollout, the reward and the engine live on rank 0 alone.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_gvpo.algorithms.group_robust import GroupRobustWeights
from megatron_gvpo.algorithms.grpo import group_advantages
from megatron_gvpo.algorithms.gvpo import gvpo_group_stats
from megatron_gvpo.bridge.export import (
    ExportConfig,
    bucket_nbytes,
    iter_buckets_on_rank0,
    iter_stage_buckets,
)
from megatron_gvpo.bridge.hf_io import copy_side_files, write_bucket_shards
from megatron_gvpo.bridge.loader import build_from_checkpoint, build_from_hf
from megatron_gvpo.data.tokenizer import hf_dir
from megatron_gvpo.models.forward import forward_backward
from megatron_gvpo.models.gpt import ModelConfig
from megatron_gvpo.parallel.ddp import wrap_with_ddp
from megatron_gvpo.parallel.initialize import destroy, device, initialize
from megatron_gvpo.parallel.launch import is_rank0
from megatron_gvpo.rewards import RewardInput
from megatron_gvpo.rollout.base import GenerateRequest, RolloutEngine, SamplingParams
from megatron_gvpo.rollout.sglang import StageSyncSpec, StageWeightSender
from megatron_gvpo.trainer.batch import (
    RolloutBatch,
    build_micro_batches,
    plan_for,
    response_token_logprobs,
)
from megatron_gvpo.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_gvpo.trainer.config import RunConfig
from megatron_gvpo.trainer.data import PromptSource
from megatron_gvpo.trainer.guards import (
    StepGuard,
    StopSignal,
    check_finite_params,
    check_resume_config,
)
from megatron_gvpo.trainer.logger import MetricsLogger
from megatron_gvpo.trainer.loss import (
    GRGVPOMicroBatchLoss,
    GVPOMicroBatchLoss,
    PolicyMicroBatchLoss,
    count_groups,
    step_seq_logprobs,
)
from megatron_gvpo.trainer.replay import ReplayBuffer
from megatron_gvpo.trainer.secrets import redact
from megatron_gvpo.trainer.setup import build_engine, build_rewards, resolve_model_path


def _request_seed(seed: int, step: int, i: int) -> int:
    return ((seed * 1_000_003 + step) * 100_003 + i) % (2**31 - 1)


def _broadcast(obj):
    """Rank 0's Python object on every rank (small: token ids, rewards)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Trainer:
    """Holds the run's parts; ``fit()`` runs rounds until ``trainer.max_steps``."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        t = cfg.trainer
        self.run_dir = Path(t.run_dir)
        # Cheap parts first: a bad reward spec or data file fails before any model is built
        # (the config itself was validated whole by run_config_from_dict).
        self.rewards = build_rewards(cfg.reward) if is_rank0() else None
        self.model_path = resolve_model_path(cfg.model)
        self.prompts = PromptSource(
            cfg.data, self.model_path, self.run_dir, t.prompts_per_step, cfg.model.trust_remote_code
        )
        initialize(cfg.parallel)
        self.model, self.arch = self._build_model()
        self.ddp = wrap_with_ddp(self.model, use_distributed_optimizer=t.use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(self._optimizer_config(), [self.ddp])
        self.scheduler = self._scheduler()
        self.reference = None
        if cfg.algorithm.needs_reference:
            ref = cfg.algorithm.ref_model
            self.reference = self._build_model(None if ref == "actor_init" else ref)[0]
        if self.reference is not None:
            self.reference.eval().requires_grad_(False)
        self.robust = None
        if cfg.algorithm.name == "gr_gvpo":
            self.robust = GroupRobustWeights(len(self.prompts.domains), cfg.algorithm.robust_eta)
        self.replay = ReplayBuffer(t.replay_capacity)
        self.step_guard = StepGuard(t.max_consecutive_skips)
        self.engine: RolloutEngine | None = (
            build_engine(cfg.rollout, self.model_path, cfg.model.trust_remote_code)
            if is_rank0()
            else None
        )
        # SGLang on the training GPUs (CUDA-IPC weight sync): release its memory while training.
        self._colocated = (
            cfg.rollout.backend == "sglang"
            and cfg.rollout.sglang.get("weight_sync", "tensor") == "tensor"
        )
        # Disaggregated SGLang with PP: each stage's source rank feeds the servers itself.
        self._per_stage_sync = (
            cfg.rollout.backend == "sglang"
            and cfg.rollout.sglang.get("weight_sync", "tensor") == "distributed"
            and cfg.parallel.pp > 1
        )
        self._sender: StageWeightSender | None = None
        self.step = 0
        self._resume()
        self.logger = MetricsLogger(self.run_dir, is_rank0(), resume_step=self.step)

    # ------------------------------------------------------------------------------ building

    def _build_model(self, path: str | None = None):
        """This rank's stage from an HF folder or a converted checkpoint (default: the actor's)."""
        path = Path(path or self.model_path)
        is_ckpt = (path / "megatron_gvpo.json").is_file()
        cfg = self._model_config()
        return build_from_checkpoint(path, cfg) if is_ckpt else build_from_hf(path, cfg)

    def _model_config(self) -> ModelConfig:
        m = self.cfg.model
        return ModelConfig(
            precision=m.precision,
            transformer_impl=m.transformer_impl,
            recompute_granularity=m.recompute_granularity,
            fp8=m.fp8,
        )

    def _optimizer_config(self) -> OptimizerConfig:
        t, m = self.cfg.trainer, self.cfg.model
        return OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            clip_grad=t.clip_grad,
            bf16=m.precision == "bf16",
            fp16=m.precision == "fp16",
            params_dtype=self._model_config().dtype,
            use_distributed_optimizer=t.use_distributed_optimizer,
        )

    def _scheduler(self) -> OptimizerParamScheduler:
        t = self.cfg.trainer
        return OptimizerParamScheduler(
            self.optimizer,
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

    # ------------------------------------------------------------------------------- resume

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return
        check_resume_config(ckpt, asdict(self.cfg), self.cfg.trainer.allow_config_change)
        state = load_checkpoint(ckpt, self.ddp, self.optimizer)
        self.step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.prompts.load_state_dict(state["prompts"])
        self.replay.load_state_dict(state["replay"])
        if self.robust is not None:
            self.robust.load_state_dict({"alpha": torch.tensor(state["robust_alpha"])})
        if is_rank0():
            print(f"resumed from {ckpt} at step {self.step}", flush=True)

    def _trainer_state(self) -> dict:
        return {
            "scheduler": self.scheduler.state_dict(),
            "prompts": self.prompts.state_dict(),
            "replay": self.replay.state_dict(),
            "robust_alpha": None if self.robust is None else self.robust.alpha.tolist(),
            "config": redact(asdict(self.cfg)),  # no credentials in checkpoints
        }

    def save(self) -> None:
        t = self.cfg.trainer
        check_finite_params(self.ddp)  # a checkpoint never holds non-finite weights
        save_checkpoint(
            self.run_dir,
            self.step,
            self.ddp,
            self.optimizer,
            self._trainer_state(),
            t.keep_last,
            export_hf=self._export_hf if t.export_hf else None,
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

    # -------------------------------------------------------------------------------- round

    def fit(self) -> None:
        """Rounds until ``trainer.max_steps``, or until SIGUSR1/SIGTERM (Slurm's warning before
        a time limit or preemption): then the current step finishes, is saved, and we exit."""
        t = self.cfg.trainer
        stop = StopSignal(t.stop_grace_s)
        self.sync_weights()
        while self.step < t.max_steps:
            self.step += 1
            metrics = self.round()
            self.logger.log(self.step, metrics)
            stopping = stop.agreed()
            if self.step % t.save_interval == 0 or self.step == t.max_steps or stopping:
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
        if self.engine is not None:
            self.engine.shutdown()
        if self._sender is not None:
            self._sender.close()
        destroy()

    def round(self) -> dict:
        cfg = self.cfg
        times: dict[str, float] = {}
        clock = time.perf_counter()

        rows = self.prompts.next_batch()
        rollout = self._rollout(rows) if is_rank0() else None
        if self.engine is not None and self._colocated:
            self.engine.release_memory()  # the engine shares the GPUs: give them to training
        rollout = _broadcast(rollout)
        metrics = dict(rollout["metrics"])
        # _rollout also scores; keep the phases apart so time/step counts each second once.
        times["time/reward"] = rollout["reward_seconds"]
        times["time/rollout"] = time.perf_counter() - clock - times["time/reward"]

        batch, engine_lps = self._assemble(rows, rollout, metrics)
        clock = time.perf_counter()
        plan = self._plan(batch)
        temperature = cfg.algorithm.temperature
        batch.old_logprobs = response_token_logprobs(self.ddp, batch, plan, temperature)
        if self.reference is not None:
            batch.ref_logprobs = response_token_logprobs(self.reference, batch, plan, temperature)
        times["time/logprob"] = time.perf_counter() - clock
        metrics.update(_logprob_mismatch(batch.old_logprobs, engine_lps))

        clock = time.perf_counter()
        metrics.update(self._updates(batch))
        times["time/train"] = time.perf_counter() - clock

        clock = time.perf_counter()
        metrics.update(self.sync_weights())
        times["time/sync"] = time.perf_counter() - clock
        times["time/step"] = sum(times.values())
        metrics.update(times)
        metrics["throughput/tokens_per_s"] = sum(batch.lengths) / times["time/step"]
        return metrics

    def _rollout(self, rows) -> dict:
        """Rank 0: generate, decode, score. Returns plain Python data for the broadcast."""
        cfg, r = self.cfg, self.cfg.rollout
        sampling = SamplingParams(
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            stop=list(r.stop),
        )
        requests = [
            GenerateRequest(
                row.prompt_ids,
                r.n_samples_per_prompt,
                _request_seed(cfg.trainer.seed, self.step, i),
            )
            for i, row in enumerate(rows)
        ]
        clock = time.perf_counter()
        groups = _generate_with_progress(self.engine, requests, sampling, r.max_batch_size)
        gen_s = time.perf_counter() - clock
        clock = time.perf_counter()
        inputs = [(row, s) for row, group in zip(rows, groups, strict=True) for s in group]
        result = self.rewards(
            [RewardInput(row.text, s.text, row.answer, row.domain) for row, s in inputs]
        )
        reward_s = time.perf_counter() - clock
        gen_tokens = sum(len(s.response_ids) for _, s in inputs)
        finish = Counter(s.finish_reason for _, s in inputs)
        metrics = {
            "rollout/tokens_per_s": gen_tokens / max(gen_s, 1e-9),
            "rollout/generate_s": gen_s,
            **{f"rollout/finish_{k}": v / len(inputs) for k, v in finish.items()},
            **result.metrics("reward_fn"),
        }
        return {
            "responses": [[s.response_ids for s in group] for group in groups],
            "engine_logprobs": [[s.logprobs for s in group] for group in groups],
            "rewards": [result.scores[i : i + len(g)] for i, g in _offsets(groups)],
            "reward_failed": [result.failed[i : i + len(g)] for i, g in _offsets(groups)],
            "metrics": metrics,
            "reward_seconds": reward_s,
        }

    def _assemble(self, rows, rollout, metrics) -> tuple[RolloutBatch, list[list[float]]]:
        """Fresh groups (after filters) + replayed groups -> the round's batch, and the engine's
        logprobs of the fresh samples (which come first in the batch)."""
        t = self.cfg.trainer
        groups, short = [], 0
        drop_failed = self.cfg.reward.on_error == "drop"  # a failed reward is no 0: leave
        for i, row in enumerate(rows):
            resp = rollout["responses"][i]
            rew = rollout["rewards"][i]
            lps = rollout["engine_logprobs"][i]
            keep = [j for j, r in enumerate(resp) if len(r) >= max(1, t.min_response_tokens)]
            short += len(resp) - len(keep)
            keep = [j for j in keep if not (drop_failed and rollout["reward_failed"][i][j])]
            groups.append(
                (row, [resp[j] for j in keep], [rew[j] for j in keep], [lps[j] for j in keep])
            )
        metrics["filter/short_responses"] = short
        metrics["filter/reward_failed"] = sum(map(sum, rollout["reward_failed"]))
        if t.dynamic_sampling:
            before = len(groups)
            groups = [g for g in groups if len(set(g[2])) > 1]
            metrics["filter/constant_reward_groups"] = before - len(groups)
        _reward_metrics(metrics, groups)
        fresh = [(g[0].prompt_ids, g[1], g[2], g[0].domain) for g in groups if g[1]]
        engine_lps = [lp for g in groups for lp in g[3]]
        replayed = []
        if t.replay_ratio > 0:
            rng = random.Random(_request_seed(t.seed, self.step, -1))
            replayed = self.replay.sample(round(t.replay_ratio * len(fresh)), rng)
            self.replay.add(fresh)
            metrics["replay/groups"] = len(replayed)
        prompt_ids, response_ids, gids, rewards, domains = [], [], [], [], []
        for gi, (p, resps, rews, dom) in enumerate(fresh + replayed):
            for resp, rew in zip(resps, rews, strict=True):
                prompt_ids.append(list(p))
                response_ids.append(list(resp))
                gids.append(gi)
                rewards.append(float(rew))
                domains.append(self.prompts.domain_index(dom))
        batch = RolloutBatch(
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            group_ids=torch.tensor(gids, dtype=torch.long),
            rewards=torch.tensor(rewards, dtype=torch.float32),
            domains=torch.tensor(domains, dtype=torch.long),
        )
        if self.cfg.algorithm.name not in ("gvpo", "gr_gvpo"):
            std = self.cfg.algorithm.name != "dr_grpo"
            batch.advantages = group_advantages(batch.rewards, batch.group_ids, normalize_std=std)
        return batch, engine_lps

    def _updates(self, batch: RolloutBatch) -> dict:
        """``trainer.updates_per_round`` optimizer steps, each on whole groups of the batch."""
        t, a = self.cfg.trainer, self.cfg.algorithm
        gids = batch.group_ids.tolist()
        order = list(dict.fromkeys(gids))
        per = math.ceil(len(order) / t.updates_per_round)
        per_update: list[dict[str, float]] = []
        grad_norms, lrs = [], []
        for u in range(t.updates_per_round):
            chosen = set(order[u * per : (u + 1) * per])
            if not chosen:
                break
            sub = batch.select([i for i, g in enumerate(gids) if g in chosen])
            plan = self._plan(sub)
            mbs = build_micro_batches(sub, plan)
            loss_fn = self._loss(sub, plan, mbs, first_update=u == 0)
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            results = forward_backward(self.ddp, mbs, loss_fn, temperature=a.temperature)
            loss_metrics = _loss_metrics(results)
            if self.step_guard.skip(self.ddp, self.optimizer, loss_metrics):
                continue  # non-finite loss or gradient: counted, never applied
            ok, grad_norm, _ = self.optimizer.step()
            if not self.step_guard.stepped(ok, grad_norm):
                continue
            self.scheduler.step(1)
            grad_norms.append(float(grad_norm or 0.0))
            lrs.append(self.optimizer.param_groups[0]["lr"])
            per_update.append(loss_metrics)
        keys = {k for m in per_update for k in m}
        out = {k: sum(m.get(k, 0.0) for m in per_update) / max(len(per_update), 1) for k in keys}
        out["train/skipped_steps"] = self.step_guard.pop_skipped()
        out["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        out["lr"] = lrs[-1] if lrs else 0.0
        if self.robust is not None:
            alpha = self.robust.alpha.tolist()
            out.update(
                {f"robust/alpha/{d}": x for d, x in zip(self.prompts.domains, alpha, strict=True)}
            )
        return out

    def _plan(self, batch: RolloutBatch):
        t = self.cfg.trainer
        pad = 16 if self.cfg.model.fp8.enabled else 8
        return plan_for(batch, t.max_tokens_per_microbatch, t.keep_groups_whole, pad)

    def _loss(self, sub: RolloutBatch, plan, mbs, first_update: bool):
        a = self.cfg.algorithm
        if a.name == "gvpo":
            stats = None
            if not plan.groups_whole:  # group means over the whole step, not the micro-batch
                s, old = self._step_seq_logprobs(sub, mbs, first_update)
                stats = gvpo_group_stats(s, old, sub.rewards.double(), sub.group_ids, a.beta)
            return GVPOMicroBatchLoss(a.beta, count_groups(sub.group_ids), stats)
        if a.name == "gr_gvpo":
            s, old = self._step_seq_logprobs(sub, mbs, first_update)
            return GRGVPOMicroBatchLoss.for_step(
                s, old, sub.rewards, sub.group_ids, sub.domains, self.robust, a.beta
            )
        num_seq = sum(1 for r in sub.response_ids if r)
        return PolicyMicroBatchLoss(a, num_seq, sub.num_response_tokens)

    def _step_seq_logprobs(self, sub: RolloutBatch, mbs, first_update: bool):
        """``(s, s')`` of the step's samples at the current theta. On a round's first update
        theta = theta', so s = s' and no forward pass is needed."""
        if first_update:
            old = torch.stack([x.double().sum() for x in sub.old_logprobs])
            return old, old
        return step_seq_logprobs(self.ddp, mbs, len(sub), self.cfg.algorithm.temperature)

    def sync_weights(self) -> dict:
        """Export the actor (TP gather, PP stage by stage, buckets) into rank 0's engine."""
        r = self.cfg.rollout
        cfg = ExportConfig(bucket_bytes=r.bucket_mb << 20, fp8=r.fp8)
        if self._per_stage_sync:
            return self._sync_weights_per_stage(cfg)
        clock = time.perf_counter()
        nbytes = 0

        def counted():
            nonlocal nbytes
            for bucket in iter_buckets_on_rank0(self.ddp, self.arch, cfg):
                nbytes += bucket_nbytes(bucket)
                yield bucket

        if self.engine is not None:
            if self._colocated and self.step > 0:
                self.engine.resume_memory()
            self.engine.update_weights(counted(), version=self.step)
        else:
            for _ in counted():
                pass
        seconds = time.perf_counter() - clock
        return {"sync/seconds": seconds, "sync/gb_per_s": nbytes / 1e9 / max(seconds, 1e-9)}

    def _sync_weights_per_stage(self, cfg: ExportConfig) -> dict:
        """Each PP stage's source rank (TP 0 of rank 0's data replica) broadcasts its own
        stage's buckets to the servers; rank 0's engine pauses before and finishes after."""
        clock = time.perf_counter()
        version = self.step
        spec, rank0_host = _broadcast(
            (self.engine.stage_sync_spec(), socket.gethostname()) if is_rank0() else None
        )
        if is_rank0():
            self.engine.begin_update(version)
        dist.barrier()
        nbytes, error = 0, None
        in_replica = (
            parallel_state.get_data_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0
        )
        if in_replica:
            buckets = iter_stage_buckets(self.ddp, self.arch, cfg)
            if parallel_state.get_tensor_model_parallel_rank() == 0:
                nbytes, error = self._send_stage(spec, rank0_host, buckets, version)
            for _ in buckets:  # TP peers, or a failed sender: finish the TP gathers
                pass
        stats = torch.tensor([float(error is not None), float(nbytes)], device=device())
        dist.all_reduce(stats)
        failed, nbytes = stats.tolist()
        if is_rank0():
            if failed:
                self.engine.abort_update()
            else:
                self.engine.finish_update(version)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("weight sync failed on another pipeline stage's source rank")
        seconds = time.perf_counter() - clock
        return {"sync/seconds": seconds, "sync/gb_per_s": nbytes / 1e9 / max(seconds, 1e-9)}

    def _send_stage(self, spec: StageSyncSpec, rank0_host: str, buckets, version: int):
        """Stream this stage's buckets through its sender; returns (bytes, error or None)."""
        if self._sender is None or self._sender.spec != spec:
            if self._sender is not None:
                self._sender.close()
            # the servers reach this rank's store: rank 0's address on its node, else our own
            address = os.environ.get("GVPO_SYNC_ADDRESS") or (
                spec.master_address
                if socket.gethostname() == rank0_host
                else socket.gethostbyname(socket.gethostname())
            )
            stage = parallel_state.get_pipeline_model_parallel_rank()
            self._sender = StageWeightSender(spec, stage, address)
        nbytes = 0

        def counted():
            nonlocal nbytes
            for bucket in buckets:
                nbytes += bucket_nbytes(bucket)
                yield bucket

        try:
            self._sender.send(counted(), version)
        except Exception as e:  # reported after every rank has finished the stage
            return nbytes, e
        return nbytes, None


def _generate_with_progress(engine, requests, sampling, max_batch_size: int):
    """``engine.generate`` in chunks of about ``max_batch_size`` responses, with a rich progress
    bar when stdout is a terminal (nothing is drawn in logs or under CI)."""
    from rich.progress import Progress

    per = max(1, max_batch_size // max(1, requests[0].n)) if requests else 1
    chunks = [requests[i : i + per] for i in range(0, len(requests), per)]
    groups = []
    with Progress(transient=True) as progress:
        task = progress.add_task("rollout", total=sum(q.n for q in requests))
        for chunk in chunks:
            groups += engine.generate(chunk, sampling)
            progress.advance(task, sum(q.n for q in chunk))
    return groups


def _offsets(groups):
    start = 0
    for g in groups:
        yield start, g
        start += len(g)


def _reward_metrics(metrics: dict, groups) -> None:
    rewards = [x for g in groups for x in g[2]]
    lengths = [len(r) for g in groups for r in g[1]]
    if rewards:
        t = torch.tensor(rewards, dtype=torch.float64)
        metrics["reward/mean"] = t.mean().item()
        metrics["reward/std"] = t.std(correction=0).item()
        metrics["reward/accuracy"] = (t >= 1.0 - 1e-9).double().mean().item()
    by_domain: dict[str, list[float]] = {}
    for g in groups:
        by_domain.setdefault(str(g[0].domain), []).extend(g[2])
    if len(by_domain) > 1:
        for d, xs in by_domain.items():
            metrics[f"reward/mean/{d}"] = sum(xs) / len(xs)
            metrics[f"reward/accuracy/{d}"] = sum(x >= 1.0 - 1e-9 for x in xs) / len(xs)
    if lengths:
        metrics["response_length/mean"] = sum(lengths) / len(lengths)
        metrics["response_length/max"] = max(lengths)
    metrics["groups/size1"] = sum(1 for g in groups if len(g[1]) == 1)


def _logprob_mismatch(actor: list[torch.Tensor], engine: list[list[float]]) -> dict:
    """|engine logprob - actor theta' logprob| over the fresh samples' response tokens."""
    diffs = [
        (torch.tensor(e, dtype=torch.float32) - a).abs()
        for a, e in zip(actor, engine, strict=False)
        if len(e)
    ]
    if not diffs:
        return {}
    d = torch.cat(diffs)
    return {
        "rollout/logprob_abs_diff": d.mean().item(),
        "rollout/logprob_abs_diff/mean": d.mean().item(),
        "rollout/logprob_abs_diff/max": d.max().item(),
    }


# Loss metrics: summed over micro-batches and DP ranks as they are (each is a share of the step's
# value), or averaged with a weight (per-micro-batch means).
_ADDITIVE = ("loss", "pg_loss", "kl_loss", "sum_c_sq", "sum_centered_reward_sq", "num_samples")
_WEIGHTED = {
    "clip_fraction": "num_tokens",
    "ratio_mean": "num_tokens",
    "kl_mean": "num_tokens",
    "delta_mean": "num_samples",
    "c_mean": "samples_counted",
    "weighted_loss": "num_samples",
    "worst_group_loss": "num_samples",
}


def _loss_metrics(results: list[dict]) -> dict[str, float]:
    """Step-wide loss metrics on every rank from the last PP stage's per-micro-batch dicts."""
    weights = sorted(set(_WEIGHTED.values()) - set(_ADDITIVE))
    keys = [*_ADDITIVE, *_WEIGHTED, *weights, "__present__"]
    local = torch.zeros(len(keys), dtype=torch.float64)
    for r in results:
        for i, k in enumerate(keys):
            if k in _WEIGHTED and k in r:
                local[i] += float(r[k]) * float(r.get(_WEIGHTED[k], 1.0))
            elif k in r:
                local[i] += float(r[k])
    present = torch.tensor([float(any(k in r for r in results)) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.stack([local, present.double()]).to(device())
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            both.zero_()  # the TP ranks of the last stage hold copies
        dist.all_reduce(both)
        local, present = both.cpu()
    tot = dict(zip(keys, local.tolist(), strict=True))
    seen = {k for k, p in zip(keys, present.tolist(), strict=True) if p > 0}
    out = {k: tot[k] for k in _ADDITIVE if k in seen}
    for k, w in _WEIGHTED.items():
        if k in seen and tot.get(w, 0) > 0:
            out[k] = tot[k] / tot[w]
    if "sum_c_sq" in out and out.get("sum_centered_reward_sq", 0) > 0:
        out["reward_var_explained"] = 1 - out["sum_c_sq"] / out["sum_centered_reward_sq"]
    return out


def train(cfg: RunConfig) -> None:
    """Run (or resume) the job described by ``cfg``."""
    Trainer(cfg).fit()
