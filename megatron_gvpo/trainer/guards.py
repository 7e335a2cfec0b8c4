"""What keeps a bad step out of the weights and a stuck step from holding the job.

``StepGuard``: an optimizer step whose loss or gradients are not finite is skipped (megatron's
FP32 and BF16 optimizers would apply it: only the FP16 grad scaler checks for inf/nan), counted,
and ``max_consecutive_skips`` in a row stop the run; a round that leaves no group to train on
(all rewards failed, all responses filtered) is skipped and counted the same way. ``check_finite_params`` runs before every
save, so a checkpoint never holds non-finite weights. ``StopSignal``: SIGTERM/SIGUSR1 (Slurm's
warning before a time limit or preemption) let the running step finish within a grace period;
past it the process exits without saving that step, so the last checkpoint stands.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist


class NonFiniteStepError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NoTrainableRoundsError(RuntimeError):
    """Too many rounds in a row left no group with two responses to compare."""


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    from megatron_gvpo.parallel.initialize import device

    t = torch.tensor([float(flag)], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _local_nonfinite(tensors) -> bool:
    for t in tensors:
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            return True
    return False


def _grads(model: torch.nn.Module):
    buffers = getattr(model, "buffers", None)
    if isinstance(buffers, list):  # megatron DDP: every main_grad is a view of these flat buffers
        for b in buffers + list(getattr(model, "expert_parallel_buffers", [])):
            yield b.grad_data
        return
    for p in model.parameters():
        yield getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad


class StepGuard:
    """Decides, on every rank alike, whether an optimizer step may touch the weights."""

    def __init__(self, max_consecutive_skips: int) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive = 0
        self.skipped = 0  # since the last pop_skipped()
        self.consecutive_rounds = 0  # rounds with nothing to train on, in a row

    def skip(self, model: torch.nn.Module, optimizer, loss_metrics: dict) -> bool:
        """Collective. True (grads zeroed, nothing stepped) when the step's loss or any gradient
        is non-finite on any rank; raises after ``max_consecutive_skips`` such steps in a row."""
        loss = loss_metrics.get("loss", 0.0)
        bad = any_rank(not math.isfinite(loss) or _local_nonfinite(_grads(model)))
        if not bad:
            return False
        model.zero_grad_buffer()
        optimizer.zero_grad()
        return self._count_skip(f"loss {loss}, non-finite gradients")

    def stepped(self, update_successful: bool, grad_norm) -> bool:
        """After ``optimizer.step()``: False when megatron itself skipped (FP16 overflow)."""
        if not update_successful:
            self._count_skip("the optimizer found inf/nan gradients")
            return False
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            # Unreachable after skip(); if it happens the weights are no longer trustworthy.
            raise NonFiniteStepError(f"optimizer stepped with grad norm {grad_norm}")
        self.consecutive = 0
        return True

    def _count_skip(self, why: str) -> bool:
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive_skips:
            raise NonFiniteStepError(
                f"{self.consecutive} optimizer steps in a row skipped ({why}); stopping "
                f"(trainer.max_consecutive_skips={self.max_consecutive_skips}). Check the rewards "
                "(reward/*/errors), the learning rate and trainer.clip_grad"
            )
        return True

    def round_trainable(self, trainable: bool, why: str) -> bool:
        """Count a round that left nothing to train on (every reward failed and was dropped,
        every response too short...): it is skipped, and ``max_consecutive_skips`` such rounds
        in a row stop the run naming ``why``. Returns ``trainable``."""
        if trainable:
            self.consecutive_rounds = 0
            return True
        self.consecutive_rounds += 1
        if self.consecutive_rounds >= self.max_consecutive_skips:
            raise NoTrainableRoundsError(
                f"{self.consecutive_rounds} rounds in a row left no group with two responses to "
                f"train on ({why}); stopping (trainer.max_consecutive_skips="
                f"{self.max_consecutive_skips}). Check the reward (reward_fn/*/errors, a dead "
                "reward server), trainer.min_response_tokens and rollout.max_new_tokens"
            )
        return False

    def pop_skipped(self) -> int:
        """Steps skipped since the last call (for ``train/skipped_steps``)."""
        n, self.skipped = self.skipped, 0
        return n


def check_finite_params(model: torch.nn.Module) -> None:
    """Collective: raise before saving when any rank holds a non-finite weight."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if any_rank(bool(bad)):
        where = f": {', '.join(bad[:4])}" if bad else " on another rank"
        raise NonFiniteStepError(f"refusing to save non-finite weights{where}")


class StopSignal:
    """Records SIGUSR1/SIGTERM; ``agreed()`` is True on every rank once any rank got one.

    From the first signal a watchdog gives the running step ``grace_s`` seconds: if it has not
    reached ``agreed()`` by then, the process exits (status 143, like an unhandled SIGTERM)
    without saving, so a requeued job resumes from the last complete checkpoint.
    """

    EXIT_CODE = 128 + signal.SIGTERM

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.received = False
        self._step_done = threading.Event()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received:
            return
        self.received = True
        threading.Thread(target=self._watchdog, daemon=True, name="stop-grace").start()

    def _watchdog(self) -> None:
        if self._step_done.wait(self.grace_s):
            return
        print(
            f"stop signal: the step did not end within trainer.stop_grace_s={self.grace_s:g} s; "
            "exiting without saving it (the last checkpoint stands)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(self.EXIT_CODE)  # threads stuck in I/O cannot be joined; children get SIGKILL

    def agreed(self) -> bool:
        """Collective at the end of a step: True on every rank once any rank got a signal."""
        stop = any_rank(self.received)
        if stop:
            self._step_done.set()  # the step ended: it is saved, however long that takes
        return stop


# What a resumed run may not silently change: the objective, its optimisation, its groups and
# what scores them.
RESUME_KEYS = (
    "algorithm",
    "trainer.lr",
    "trainer.min_lr",
    "trainer.lr_decay_style",
    "trainer.lr_warmup_steps",
    "trainer.weight_decay",
    "trainer.clip_grad",
    "trainer.updates_per_round",
    "trainer.prompts_per_step",
    "rollout.n_samples_per_prompt",
    "rollout.temperature",
    "rollout.env",  # another environment is another task
    "model.precision",
    "reward.rewards",  # compared as saved: secrets redacted on both sides
    "reward.on_error",
    "eval",  # what an eval metric means, and which checkpoint is the best
    "trainer.save_best",
    "trainer.save_best_mode",
)


def _flat(section: str, value) -> dict[str, object]:
    if isinstance(value, dict):
        return {f"{section}.{k}": v for k, v in value.items()}
    return {section: value}


def config_changes(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for each ``RESUME_KEYS`` entry that differs."""
    out = []
    for key in RESUME_KEYS:

        def get(cfg: dict, key: str = key):
            for part in key.split("."):
                cfg = cfg.get(part, {}) if isinstance(cfg, dict) else {}
            return cfg

        old, new = _flat(key, get(saved)), _flat(key, get(current))
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                out.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
    return out


def check_resume_config(ckpt: Path, current: dict, allow: bool) -> None:
    """Refuse to resume ``ckpt`` under a different algorithm, learning rate, group size, ...
    unless ``trainer.allow_config_change``; the differences are listed either way."""
    saved = json.loads((ckpt / "trainer_state.json").read_text()).get("config")
    if not saved:
        return
    from megatron_gvpo.trainer.secrets import redact

    # as saved: redacted (secrets are ***), tuples as lists
    changes = config_changes(saved, json.loads(json.dumps(redact(current))))
    if not changes:
        return
    listing = "\n  ".join(changes)
    if not allow:
        raise ValueError(
            f"resuming {ckpt} with a different config:\n  {listing}\n"
            "set trainer.allow_config_change=true to resume anyway, or use a new trainer.run_dir"
        )
    print(f"resuming {ckpt} with config changes (allowed):\n  {listing}", flush=True)
