"""What a run shows on the console: a start-up banner, one line per step, the warnings worth
acting on. Everything else (library INFO lines, known-harmless library warnings) goes to
``<run_dir>/train.log``.

Python warnings and every logger (transformers' own handler included) are routed through the
root logger: a file handler takes INFO and above, a stderr handler WARNING and above minus the
``HARMLESS`` messages below. Errors are never filtered.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

# Library warnings that say nothing a user of this trainer can act on. Each is matched as a
# substring of the message; they still land in train.log.
HARMLESS = (
    # megatron-core on a machine without TE/apex (the CPU demo; GPU boxes without the gpu extra):
    # it falls back to torch implementations, which is what we select anyway.
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    # matplotlib builds its font cache on first use (INFO, so file-only anyway; listed for clarity).
    "generated new fontManager",
    # megatron-core 0.19: its own deprecations and experiments, nothing our users can change
    # (GPTModel -> HybridModel and the NVRx async checkpoint writer are for us to adopt).
    "GPTModel IS DEPRECATED",
    "MimoModelConfig is experimental",
    "MCore's async save is deprecated",
    # PyPI's CUDA torch on a machine without a GPU (Python 3.12 CPU runs): we run on CPU anyway.
    "No CUDA runtime is found",
    # Every resume: megatron-core 0.16's torch_dist loader calls torch's deprecated
    # load_state_dict and ShardedTensor (FutureWarnings about their code, not ours or a user's).
    "`load_state_dict` is deprecated and will be removed in future versions",
    "Please use DTensor instead and we are deprecating ShardedTensor",
)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        msg = record.getMessage()
        return not any(h in msg for h in HARMLESS)


def log_file(run_dir: str | Path, rank: int) -> Path:
    """``train.log`` for rank 0, ``train.rank<r>.log`` for the others."""
    return Path(run_dir) / ("train.log" if rank == 0 else f"train.rank{rank}.log")


def setup_logging(run_dir: str | Path, rank: int | None = None) -> Path:
    """Route warnings and library logs: all to the run's log file, actionable ones to stderr.

    Replaces any root handlers (Hydra installs its own). Ranks other than 0 show only errors on
    the console; their warnings are in their own log file. Returns the log file's path.
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    path = log_file(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    to_file.setLevel(logging.INFO)
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    to_console.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    to_console.addFilter(_DropHarmless())
    root.addHandler(to_file)
    root.addHandler(to_console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> both handlers
    _route_transformers()
    _route_torch(to_file)
    return path


def _route_transformers() -> None:
    """transformers logs through its own stderr handler; send it through ours instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if not sys.stderr.isatty():  # "Loading weights" bars are carriage-return noise in a log
        hf_logging.disable_progress_bar()


def _route_torch(to_file: logging.Handler) -> None:
    """torch's loggers print through their own stderr handler (``TORCH_LOGS`` keeps working):
    filter the harmless lines out of it and copy everything to the log file."""
    import torch  # noqa: F401  (installs torch's handlers, so there is something to adjust)

    torch_logger = logging.getLogger("torch")
    if torch_logger.propagate:
        return
    for h in torch_logger.handlers:
        h.addFilter(_DropHarmless())
    torch_logger.addHandler(to_file)


def banner(lines: dict[str, str]) -> str:
    """The start-up summary: one ``key  value`` line each, between two rules."""
    width = max(len(k) for k in lines)
    rule = "-" * 72
    body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines.items())
    return f"{rule}\n{body}\n{rule}"


def run_summary(cfg, log_path: Path, resume: tuple[Path, int] | None) -> dict[str, str]:
    """What is being run: model, layout, algorithm, engine, run dir, resume point."""
    import torch

    m, p, a, r, t = cfg.model, cfg.parallel, cfg.algorithm, cfg.rollout, cfg.trainer
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = m.path or f"demo model (cached in {m.demo_cache_dir})"
    fields = {k: v for k, v in dataclasses.asdict(a).items() if k != "name" and v is not None}
    algo = a.name + " (" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"
    if a.needs_reference:
        algo += f", frozen reference {a.reference_path}"
    engine = r.backend + (f" (transformers on {r.local.device})" if r.backend == "local" else "")
    return {
        "model": f"{model}, {m.precision}",
        "layout": f"TP{p.tp} x PP{p.pp} x DP{world // (p.tp * p.pp)} on {dev}, {world} "
        + ("ranks" if world > 1 else "rank"),
        "algorithm": algo,
        "engine": engine,
        "batch": f"{t.prompts_per_step} prompts x {r.n_samples_per_prompt} samples per step, "
        f"{t.max_steps} steps",
        "run dir": f"{t.run_dir} (log: {log_path.name})",
        "resume": f"step {resume[1]} from {resume[0]}" if resume else "none (fresh start)",
    }
