"""Megatron-Core ``dist_checkpointing`` of the actor, loadable under any TP x PP layout.

A converted checkpoint folder holds::

    megatron_gvpo.json   what is needed to rebuild the model (padded vocab, precision, HF arch)
    hf/                  HF config.json, generation config and tokenizer files (to convert back)
    model/               the dist_checkpointing weights

Both this folder and the trainer's checkpoints record the megatron-core version that wrote them:
0.19 changed the ``dist_checkpointing`` layout (no ``common.pt``) and 0.16-0.18 cannot read it,
so a checkpoint from a newer megatron-core than the running one is refused before any loading.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from packaging.version import Version

from megatron_gvpo.bridge import safe_metadata
from megatron_gvpo.bridge.dist_save import InProcessSave
from megatron_gvpo.bridge.hf_io import copy_side_files, publish_dir, staging_dir
from megatron_gvpo.bridge.mapping import is_checkpoint_only
from megatron_gvpo.models.hf_config import HFArch, read_hf_config
from megatron_gvpo.parallel.launch import barrier, is_rank0

META_FILE = "megatron_gvpo.json"
FORMAT_VERSION = 1
MCORE_VERSION = version("megatron-core")


def check_mcore_version(written_by: str | None, where: str | Path) -> None:
    """Refuse a checkpoint written by a newer megatron-core release (major.minor) than ours.

    ``written_by`` None: a checkpoint from before versions were recorded (0.16), always readable.
    """
    if not written_by:
        return
    theirs, ours = Version(written_by), Version(MCORE_VERSION)
    if theirs.release[:2] <= ours.release[:2]:
        return
    raise RuntimeError(
        f"{where}: written by megatron-core {written_by}, but this environment runs "
        f"megatron-core {MCORE_VERSION}, which cannot read checkpoints of newer releases "
        f"(0.19 changed the dist_checkpointing layout). Load it with megatron-core>={theirs.major}."
        f"{theirs.minor} (Python >= 3.12: pip install 'megatron-core>={theirs.major}.{theirs.minor}"
        f",<0.20'), or convert it to HF there (tools/convert_mcore_to_hf.py) and back here."
    )


@dataclass
class CheckpointMeta:
    padded_vocab_size: int
    precision: str
    source: str = ""
    format_version: int = FORMAT_VERSION
    # megatron-core that wrote model/ ("" when read from a checkpoint that did not record it)
    megatron_core: str = MCORE_VERSION


def read_meta(ckpt_dir: str | Path) -> tuple[CheckpointMeta, HFArch]:
    """Metadata and HF architecture of a converted checkpoint; clear error when it is not one."""
    ckpt_dir = Path(ckpt_dir)
    meta_file = ckpt_dir / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{ckpt_dir}: not a megatron_gvpo checkpoint ({META_FILE} missing); "
            "create one with tools/convert_hf_to_mcore.py"
        )
    raw = json.loads(meta_file.read_text())
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_file}: format_version {raw.get('format_version')} != {FORMAT_VERSION}"
        )
    check_mcore_version(raw.get("megatron_core"), meta_file)
    raw.setdefault("megatron_core", "")
    meta = CheckpointMeta(**{k: raw[k] for k in CheckpointMeta.__dataclass_fields__})
    if not (ckpt_dir / "model").is_dir():
        raise FileNotFoundError(f"{ckpt_dir}/model: dist_checkpointing weights missing")
    return meta, read_hf_config(ckpt_dir / "hf")


def save_model(
    model: torch.nn.Module, out_dir: str | Path, meta: CheckpointMeta, hf_dir: str | Path
) -> None:
    """Collectively save ``model`` into ``out_dir`` (written to a temporary folder, then renamed).

    A crash mid-write leaves any previous ``out_dir`` untouched.
    """
    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        copy_side_files(hf_dir, tmp / "hf")
        (tmp / META_FILE).write_text(json.dumps(meta.__dict__, indent=2) + "\n")
    barrier()
    dist_checkpointing.save(
        model.sharded_state_dict(), str(tmp / "model"), sharded_strategy=InProcessSave()
    )
    barrier()
    if is_rank0():
        publish_dir(out_dir)
    barrier()


def load_model(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load weights saved by :func:`save_model` into this rank's stage/shard (any TP x PP)."""
    sharded = model.sharded_state_dict()
    folder = Path(ckpt_dir) / "model"
    with safe_metadata.restricted_loads(folder):  # no pickle in it may run code
        state, missing, _unexpected = dist_checkpointing.load(
            sharded, str(folder), strict=StrictHandling.RETURN_ALL
        )
    missing = [k for k in missing if not is_checkpoint_only(k)]
    if missing:
        raise KeyError(f"{ckpt_dir}/model: checkpoint lacks {', '.join(sorted(missing)[:8])}")
    result = model.load_state_dict(state, strict=False)
    not_loaded = [k for k in result.missing_keys if not is_checkpoint_only(k)]
    if not_loaded:
        raise KeyError(f"{ckpt_dir}/model: no weights loaded for {', '.join(not_loaded[:8])}")
