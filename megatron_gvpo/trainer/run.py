"""The run skeleton every driver shares.

    driver.__init__: cheap checks and data first -> Actor -> the driver's own parts
                     -> Run.resume(parts) (checkpoint, eval state, logger)
    Run.fit():       start() -> [step-0 eval] -> per step: round() -> eval when due -> log
                     -> checkpoint (interval, last step, new best, stop signal) -> plot
                     -> close()

A driver subclasses :class:`Run` and supplies ``round()`` (one step's metrics), ``evaluate()``
and, when it has them, ``start()``, ``close()`` and part states to save. Saving, resuming, the
stop signal, the eval schedule and logging are the same for all drivers.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from megatron_gvpo.parallel.initialize import destroy
from megatron_gvpo.parallel.launch import is_rank0
from megatron_gvpo.trainer.actor import Actor
from megatron_gvpo.trainer.checkpoint import RunState
from megatron_gvpo.trainer.config import RunConfig
from megatron_gvpo.trainer.evaluate import EvalSchedule
from megatron_gvpo.trainer.guards import StopSignal
from megatron_gvpo.trainer.logger import MetricsLogger


class Run:
    """Fit, save, resume, stop signals, the eval schedule and logging around a driver's step."""

    plot_key = "reward/mean"
    """The training metric ``reward_curve.png`` draws (eval accuracy is drawn over it)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        t = cfg.trainer
        self.run_dir = Path(t.run_dir)
        self.eval_schedule = EvalSchedule(
            t.eval_interval, t.eval_at_start, t.max_steps, t.save_best, t.save_best_mode
        )
        self.step = 0
        self.actor: Actor
        self.objective = None

    # ---------------------------------------------------------------- what a driver supplies

    def round(self) -> dict:
        """One step; its metrics."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """The eval sets' metrics (``eval/...``) on every rank; empty without one."""
        return {}

    @property
    def has_eval(self) -> bool:
        return False

    def start(self) -> None:
        """Before the first step of this process (the RL driver syncs the engine here)."""

    def part_states(self) -> dict | None:
        """States to save in place of the parts' own (the RL driver's prompt sampler as of the
        last trained round, not of the rounds generated ahead)."""
        return None

    # ----------------------------------------------------------------------- the skeleton

    def resume(self, parts: dict) -> None:
        """Load the newest complete checkpoint of the run dir into the actor, the objective and
        ``parts`` (each with ``state_dict``/``load_state_dict``); then open the logger."""
        t = self.cfg.trainer
        parts = {**parts, "eval": self.eval_schedule}
        self.state = RunState(self.actor.scheduler, self.objective, parts)
        self.step = self.state.resume(
            self.run_dir, asdict(self.cfg), t.allow_config_change, self.actor.ddp,
            self.actor.optimizer,
        )
        self.logger = MetricsLogger(self.run_dir, is_rank0(), resume_step=self.step)

    def fit(self) -> None:
        """Steps until ``trainer.max_steps``, or until SIGUSR1/SIGTERM (Slurm's warning before
        a time limit or preemption): then the current step finishes, is saved, and we exit."""
        t = self.cfg.trainer
        stop = StopSignal(t.stop_grace_s)
        self.start()
        if self.step == 0 and self.has_eval and self.eval_schedule.due(0):
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
                self.logger.plot(self.plot_key)
            if stopping:
                if is_rank0():
                    print(f"stop signal: saved step {self.step}, exiting to be resumed", flush=True)
                break
        self.close()

    def save(self) -> None:
        t = self.cfg.trainer
        self.state.save(
            self.run_dir, self.step, asdict(self.cfg), self.actor.ddp, self.actor.optimizer,
            t.keep_last, part_states=self.part_states(),
            export_hf=self.actor.export_hf if t.export_hf else None,
            best=self.eval_schedule,
        )

    def close(self) -> None:
        self.logger.close()
        destroy()
