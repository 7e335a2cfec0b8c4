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
import pickle
import random
import re
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator
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
from megatron_gvpo.trainer.guards import any_rank, check_finite_params, check_resume_config
from megatron_gvpo.trainer.secrets import redact

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's complete checkpoint folders, newest first: published (``.tmp`` staging folders
    are skipped) with a readable ``trainer_state.json`` (one cut short by a crash or a full
    disk is skipped too)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return [p for p in reversed(_step_dirs(root)) if _state_or_none(p) is not None]


def _state_or_none(ckpt: Path) -> dict | None:
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "step" in state else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = complete_checkpoints(run_dir)
    return found[0] if found else None


def resume_point(run_dir: str | Path) -> tuple[Path, int] | None:
    """(folder, step) of the checkpoint a run would resume from, or None. Fails here, before any
    model is built, when that checkpoint is from a newer megatron-core than the running one."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    state = _state_or_none(ckpt) or {}
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
        the step it holds, 0 when there is none. A checkpoint whose files are cut short or
        missing (a crash or a full disk mid-copy, a partial deletion) is passed over for the
        previous complete one, in one line; a refused (crafted) file stops the run."""
        found = complete_checkpoints(run_dir)
        if not found:
            return 0
        for i, ckpt in enumerate(found):
            check_resume_config(ckpt, config, allow_change)
            state, error = None, None
            try:
                state = load_checkpoint(ckpt, model, optimizer)
            except (Exception, CheckpointException) as e:  # torch's is a BaseException
                if not _unreadable(e):
                    raise
                error = e
            if not any_rank(error is not None):
                break
            why = _first_line(error) if error is not None else "unreadable on another rank"
            if i + 1 == len(found):
                raise RuntimeError(
                    f"{ckpt}: unreadable checkpoint ({why}), and no earlier complete checkpoint "
                    f"in {checkpoint_root(run_dir)}"
                ) from error
            if is_rank0():
                print(
                    f"warning: checkpoint {ckpt} is unreadable ({why}); resuming from {found[i + 1]}",
                    file=sys.stderr,
                    flush=True,
                )
        self.scheduler.load_state_dict(state["scheduler"])
        for name, part in self.parts.items():
            if name in state:  # a part added since the checkpoint was written keeps its start
                part.load_state_dict(state[name])
        self.objective.load_state_dict(state)
        if is_rank0():
            print(f"resumed from {ckpt} at step {state['step']}", flush=True)
        return state["step"]

    def save(self, run_dir: str | Path, step: int, config: dict, model, optimizer, keep_last: int,
             part_states: dict[str, Any] | None = None, export_hf=None, best=None) -> Path:
        """Collective: check the weights are finite, then write ``step`` (``config`` is stored
        redacted). ``part_states`` replaces a part's ``state_dict()`` (async rounds in flight).
        ``best`` (an ``EvalSchedule``): its best step survives pruning and ``best.json`` names it."""
        check_finite_params(model)  # a checkpoint never holds non-finite weights
        states = {name: part.state_dict() for name, part in self.parts.items()}
        states.update(part_states or {})
        state = {
            "scheduler": self.scheduler.state_dict(),
            **states,
            **self.objective.state_dict(),
            "config": redact(config),  # no credentials in checkpoints
        }
        keep = best.protected_steps() if best is not None else set()
        final = save_checkpoint(run_dir, step, model, optimizer, state, keep_last, export_hf, keep)
        if best is not None and is_rank0():
            best.write_best(checkpoint_root(run_dir))
        return final


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
    export_hf: Callable[[Path], None] | None = None,
    keep: set[int] = frozenset(),
) -> Path:
    """Collectively write the checkpoint of ``step``; returns its folder. Rank 0 writes JSON.
    Pruning keeps the newest ``keep_last`` checkpoints and those of the steps in ``keep``."""
    final = checkpoint_root(run_dir) / f"step_{step:06d}"
    tmp = staging_dir(final)
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model_optim").mkdir(parents=True)
    barrier()
    try:
        _write(tmp, step, model, optimizer, trainer_state, export_hf)
    except (Exception, CheckpointException) as e:  # torch's is a BaseException
        if not _disk_full(e, tmp):
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
        _prune(checkpoint_root(run_dir), keep_last, keep)
    barrier()
    return final


# How megatron's DistributedOptimizer lays out its state in a checkpoint (ignored by the other
# optimizers): each rank's own buffers, written in parallel, reshardable over DP (Megatron-LM's
# default). Its own default, "fully_sharded_model_space", writes flattened-range ShardedTensors,
# which megatron-core 0.16's torch_dist format refuses ("ShardedTensor.flattened_range is not
# supported").
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _write(tmp: Path, step: int, model, optimizer, trainer_state: dict, export_hf) -> None:
    model_sd = model.sharded_state_dict()
    optim_sd = optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)
    state = {"model": model_sd, "optimizer": optim_sd}
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


# torch's zip writer (torch.save to a path: megatron's common.pt) reports a short write as
# "PytorchStreamWriter failed writing file ...: file write failed" / "unexpected pos A vs B",
# without an errno: taken as a full disk when the filesystem has (almost) no space left.
_SHORT_WRITE = ("unexpected pos", "file write failed")
_NEARLY_FULL_BYTES = 64 << 20


def _disk_full(e: BaseException, where: Path | None = None) -> bool:
    """ENOSPC anywhere in ``e``'s chain (megatron wraps writer errors in its own exceptions), or
    a short write by torch's zip writer while the filesystem of ``where`` is (nearly) full."""
    for x in _error_chain(e):
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(x):
            return True
        if where is not None and any(m in str(x) for m in _SHORT_WRITE):
            return _free_bytes(where) < _NEARLY_FULL_BYTES
    return False


def _error_chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception behind it, once each: causes, contexts and torch's per-rank
    ``CheckpointException.failures`` (megatron and torch wrap writer and reader errors)."""
    seen: set[int] = set()
    todo: list = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen or not isinstance(x, BaseException):
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)  # torch's CheckpointException: rank -> error
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def _free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent)."""
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 1 << 62


# What a checkpoint cut short or partly deleted raises while loading (torch, megatron, ours);
# a refused global (pickle.UnpicklingError) or a model or optimizer mismatch is not among them.
_UNREADABLE = (EOFError, OSError, zipfile.BadZipFile, safe_metadata.UnreadableCheckpointError)
_UNREADABLE_TEXT = ("PytorchStreamReader failed", "does not exist", "truncated")


def _unreadable(e: BaseException) -> bool:
    """Whether ``e`` says the checkpoint's files are cut short or missing (searched through
    causes, contexts and torch's per-rank failures) and nothing was refused."""
    found = False
    for x in _error_chain(e):
        if isinstance(x, pickle.UnpicklingError) or "refusing to load" in str(x):
            return False  # a refusal (or a garbled pickle): never passed over
        if isinstance(x, _UNREADABLE) or any(t in str(x) for t in _UNREADABLE_TEXT):
            found = True
    return found


def _first_line(e: BaseException) -> str:
    """A one-line description of ``e`` (torch's per-rank failures: the first rank's error)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _prune(root: Path, keep_last: int, keep: set[int] = frozenset()) -> None:
    names = {f"step_{s:06d}" for s in keep}
    for p in _step_dirs(root)[:-keep_last]:
        if p.name not in names:
            shutil.rmtree(p, ignore_errors=True)


def _init_distributed_optimizer_state(optimizer) -> None:
    """A DistributedOptimizer that has not stepped yet holds no Adam state, and its
    ``state_dict()`` (called while building what to load into) needs each parameter's ``step``
    without TE or Apex: give it zero-gradient placeholder state first, as Megatron-LM does before
    loading; the checkpoint then overwrites it, and the model's weights are loaded after."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_distributed_adam_steps(optimizer) -> None:
    """Without TE or Apex, the DistributedOptimizer saves torch Adam's step count in each param
    group (``param_group["step"]``) but does not put it back into the per-parameter state that
    torch's Adam reads for its bias correction: copy it there, so the first step after a resume
    is the one an uninterrupted run takes."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                state = opt.optimizer.state.get(p)
                if state and isinstance(state.get("step"), torch.Tensor):
                    state["step"].fill_(float(group["step"]))


def load_checkpoint(ckpt: str | Path, model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from ``ckpt``; return the trainer state."""
    ckpt = Path(ckpt)
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    check_mcore_version(trainer_state.get("megatron_core"), ckpt / "trainer_state.json")
    model_sd = model.sharded_state_dict()
    _init_distributed_optimizer_state(optimizer)
    # is_loading: the optimizer creates its (empty) state first, so there is something to fill.
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIMIZER_METADATA
        ),
    }
    with safe_metadata.restricted_loads(ckpt / "model_optim"):  # no pickle in it may run code
        state = dist_checkpointing.load(sharded, str(ckpt / "model_optim"))
    result = torch.nn.Module.load_state_dict(model, state["model"], strict=False)
    missing = [k for k in result.missing_keys if not is_checkpoint_only(k)]
    if missing:
        raise KeyError(f"{ckpt}/model_optim: no weights for {', '.join(missing[:8])}")
    try:
        with torch.no_grad():  # the distributed optimizer copies into leaf parameters in place
            optimizer.load_state_dict(state["optimizer"])
            _restore_distributed_adam_steps(optimizer)
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
