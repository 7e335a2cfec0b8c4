"""Training checkpoints in the run directory: atomic, resumable, the last K kept.

    <run_dir>/checkpoints/step_000040/
        model_optim/          megatron-core dist_checkpointing: model and optimizer, any layout
        trainer_state.json    step, scheduler, sampler position, replay buffer, robust alpha,
                              the megatron-core version that wrote model_optim/, ...
        rng_rank<r>.safetensors  + rng_rank<r>.json   torch / python / numpy RNG of every rank
        hf/                   (trainer.export_hf) an HF checkpoint of the actor

Each checkpoint is written into ``step_N.tmp`` and renamed when complete, so a crash or a kill
during a write leaves the previous checkpoints whole; ``.tmp`` folders are never loaded. Our own
state is JSON and safetensors; megatron's ``model_optim/`` holds pickles (``.metadata``, bytes
records in ``.distcp`` files, ``common.pt``), all read through ``bridge.safe_metadata``'s
restricted unpicklers.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from megatron_gvpo.bridge import safe_metadata
from megatron_gvpo.bridge.checkpoint import MCORE_VERSION, check_mcore_version
from megatron_gvpo.bridge.dist_save import InProcessSave
from megatron_gvpo.bridge.hf_io import publish_dir, staging_dir
from megatron_gvpo.bridge.mapping import is_checkpoint_only
from megatron_gvpo.parallel.launch import barrier, is_rank0
from megatron_gvpo.trainer.guards import check_finite_params, check_resume_config
from megatron_gvpo.trainer.secrets import redact

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None (unfinished ``.tmp`` are skipped)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    steps = [p for p in _step_dirs(root) if (p / "trainer_state.json").is_file()]
    return steps[-1] if steps else None


def resume_point(run_dir: str | Path) -> tuple[Path, int] | None:
    """(folder, step) of the checkpoint a run would resume from, or None. Fails here, before any
    model is built, when that checkpoint is from a newer megatron-core than the running one."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    check_mcore_version(state.get("megatron_core"), ckpt / "trainer_state.json")
    return ckpt, int(state["step"])


def _step_dirs(root: Path) -> list[Path]:
    """Published ``step_N`` folders of ``root``, oldest first (``.tmp`` staging folders excluded)."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, *rest = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


@dataclass
class RunState:
    """What a driver checkpoints besides the model and optimizer: the LR scheduler, the
    objective (its ``state_dict`` keys sit at the top level) and named stateful parts (the
    prompt sampler, the replay buffer, the pair sampler...)."""

    scheduler: Any
    objective: Any
    parts: dict[str, Any] = field(default_factory=dict)

    def resume(self, run_dir: str | Path, config: dict, allow_change: bool, model, optimizer) -> int:
        """Load the newest checkpoint under ``run_dir`` (config changes refused unless allowed);
        the step it holds, 0 when there is none."""
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            return 0
        check_resume_config(ckpt, config, allow_change)
        state = load_checkpoint(ckpt, model, optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        self.objective.load_state_dict(state)
        if is_rank0():
            print(f"resumed from {ckpt} at step {state['step']}", flush=True)
        return state["step"]

    def save(self, run_dir: str | Path, step: int, config: dict, model, optimizer, keep_last: int,
             part_states: dict[str, Any] | None = None, export_hf=None) -> Path:
        """Collective: check the weights are finite, then write ``step`` (``config`` is stored
        redacted). ``part_states`` replaces a part's ``state_dict()`` (async rounds in flight)."""
        check_finite_params(model)  # a checkpoint never holds non-finite weights
        states = {name: part.state_dict() for name, part in self.parts.items()}
        states.update(part_states or {})
        state = {
            "scheduler": self.scheduler.state_dict(),
            **states,
            **self.objective.state_dict(),
            "config": redact(config),  # no credentials in checkpoints
        }
        return save_checkpoint(run_dir, step, model, optimizer, state, keep_last, export_hf)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
    export_hf: Callable[[Path], None] | None = None,
) -> Path:
    """Collectively write the checkpoint of ``step``; returns its folder. Rank 0 writes JSON."""
    final = checkpoint_root(run_dir) / f"step_{step:06d}"
    tmp = staging_dir(final)
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model_optim").mkdir(parents=True)
    barrier()
    try:
        _write(tmp, step, model, optimizer, trainer_state, export_hf)
    except (Exception, CheckpointException) as e:  # torch's is a BaseException
        if not _disk_full(e):
            raise
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)  # free what the partial write took
        raise OSError(
            errno.ENOSPC,
            f"no space left on device while writing checkpoint {tmp} "
            f"(the previous checkpoints in {checkpoint_root(run_dir)} are intact)",
        ) from e
    if is_rank0():
        publish_dir(final)
        _prune(checkpoint_root(run_dir), keep_last)
    barrier()
    return final


def _write(tmp: Path, step: int, model, optimizer, trainer_state: dict, export_hf) -> None:
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}
    dist_checkpointing.save(state, str(tmp / "model_optim"), sharded_strategy=InProcessSave())
    tensors, meta = _rng_state()
    save_file(tensors, str(tmp / f"rng_rank{_rank()}.safetensors"))
    (tmp / f"rng_rank{_rank()}.json").write_text(json.dumps(meta))
    if export_hf is not None:
        export_hf(tmp / "hf")
    barrier()
    if is_rank0():
        record = {"step": step, "megatron_core": MCORE_VERSION, **trainer_state}
        (tmp / "trainer_state.json").write_text(json.dumps(record))


def _disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in ``e``'s chain (megatron wraps writer errors in its own exceptions)."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(x):
            return True
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)  # torch's CheckpointException: rank -> error
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


def _prune(root: Path, keep_last: int) -> None:
    for p in _step_dirs(root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ckpt: str | Path, model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from ``ckpt``; return the trainer state."""
    ckpt = Path(ckpt)
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    check_mcore_version(trainer_state.get("megatron_core"), ckpt / "trainer_state.json")
    model_sd = model.sharded_state_dict()
    # is_loading: the optimizer creates its (empty) state first, so there is something to fill.
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True),
    }
    with safe_metadata.restricted_loads(ckpt / "model_optim"):  # no pickle in it may run code
        state = dist_checkpointing.load(sharded, str(ckpt / "model_optim"))
    result = torch.nn.Module.load_state_dict(model, state["model"], strict=False)
    missing = [k for k in result.missing_keys if not is_checkpoint_only(k)]
    if missing:
        raise KeyError(f"{ckpt}/model_optim: no weights for {', '.join(missing[:8])}")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:
        if "parameter group" not in str(e):
            raise
        # megatron-core 0.19 matches optimizer parameter groups by their max_lr/min_lr/wd.
        raise ValueError(
            f"{ckpt}: its optimizer state was saved with other optimizer settings "
            f"(trainer.lr, trainer.min_lr, trainer.weight_decay); megatron-core {MCORE_VERSION} "
            "cannot load it into the changed ones. Keep the checkpoint's values to resume, or "
            "start a new run from an exported HF checkpoint (trainer.export_hf=true)"
        ) from e
    rng = ckpt / f"rng_rank{_rank()}.safetensors"
    if rng.is_file():
        _set_rng_state(load_file(str(rng)), json.loads(rng.with_suffix(".json").read_text()))
    return trainer_state
