"""Checkpoint files read without running code from them.

torch's distributed-checkpoint reader (used by megatron's ``dist_checkpointing.load`` and by
every load path here: ``model.path``, ``algorithm.ref_model``, ``trainer.run_dir`` checkpoints,
``tools/convert_mcore_to_hf.py``) unpickles two kinds of data a crafted checkpoint controls:

- ``<dir>/.metadata`` with ``pickle.load`` (``FileSystemReader.read_metadata``). :func:`install`
  makes that reader use :class:`MetadataUnpickler`, which admits only the classes such metadata
  holds: torch's checkpoint metadata and plan types, ``torch.Size``, dtypes, layouts and a few
  builtins.
- every bytes record of the ``.distcp`` files (``_extra_state`` items, megatron's sharded
  objects) with ``torch.load(weights_only=False)`` (``DefaultLoadPlanner.load_bytes``, inherited
  by megatron's planner). :func:`install` replaces it with a ``weights_only=True`` load that also
  admits ``io.BytesIO`` (Transformer Engine's extra state).

Tensors are read by torch with ``torch.load(weights_only=True)``; megatron-core 0.16's
``common.pt`` (optimizer parameter groups) and sharded-object files are ``torch.load``-ed without
an explicit ``weights_only``, which an environment variable (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``)
could turn off: :func:`restricted_loads` forces ``weights_only`` for every load inside it. Anything
else fails, naming the file. Our own state is JSON and safetensors.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

_TORCH_DCP_MODULES = {
    # module -> class names admitted (all dataclasses/enums of plain data)
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "ChunkStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {
        "SavePlan",
        "WriteItem",
        "WriteItemType",
        "TensorWriteData",
        "BytesIOWriteData",
        "LoadItemType",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # rebuilds a torch.layout from its name
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint metadata file references something other than plain metadata."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint metadata file is truncated or garbled (not a refused global)."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch distributed-checkpoint metadata and refuses every other global."""

    def __init__(self, file, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _TORCH_DCP_MODULES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to load {module}.{name} from checkpoint metadata (only "
            "torch distributed-checkpoint metadata types are allowed; the file may be crafted)"
        )


def load_metadata(stream, source: str) -> Any:
    """Unpickle checkpoint metadata from an open binary ``stream`` (``source`` names it)."""
    try:
        return MetadataUnpickler(stream, source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbled: name the file
        raise UnreadableCheckpointError(
            f"{source}: unreadable checkpoint metadata ({e!r})"
        ) from None


def read_metadata_file(path: str | Path) -> Any:
    """The metadata in ``path`` (a ``.metadata`` file), read with :class:`MetadataUnpickler`."""
    with open(path, "rb") as f:
        return load_metadata(f, str(path))


def load_bytes_record(stream: io.BytesIO, source: str) -> Any:
    """A ``.distcp`` bytes record, unpickled by ``torch.load(weights_only=True)`` (tensors and
    plain containers; ``io.BytesIO`` besides). A refused global fails naming ``source``."""
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            return torch.load(stream, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{source}: refusing to load {_refused_global(e)} from a bytes record (only tensors "
            "and plain data are allowed; the file may be crafted)"
        ) from None


def _refused_global(e: BaseException) -> str:
    """The global torch's weights-only unpickler refused, as ``module.name`` where it says so."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    return m.group(1) if m else f"an object ({str(e).splitlines()[0][:200]})"


_FORCE, _NO_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def restricted_loads(source: str | Path) -> Iterator[None]:
    """Load a checkpoint under ``source`` with every pickle restricted (see the module docstring).

    Inside, every ``torch.load`` is ``weights_only`` whatever its caller or the environment says
    (megatron's ``common.pt``); a refusal anywhere, however torch or megatron wrap it, is raised
    as one :class:`UnsafeCheckpointError` naming the file.
    """
    install()
    saved = {k: os.environ.get(k) for k in (_FORCE, _NO_FORCE)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_NO_FORCE, None)
    try:
        yield
    except BaseException as e:  # torch's CheckpointException is a BaseException
        refusal = _find_refusal(e)
        if refusal is None or refusal is e and isinstance(e, UnsafeCheckpointError):
            raise
        if isinstance(refusal, UnsafeCheckpointError):  # ours, wrapped by torch or megatron
            raise UnsafeCheckpointError(str(refusal)) from None
        raise UnsafeCheckpointError(
            f"{source}: refusing to load {_refused_global(refusal)} from a checkpoint file (only "
            "tensors and plain data are allowed; the file may be crafted)"
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _find_refusal(e: BaseException) -> pickle.UnpicklingError | None:
    """The first unpickling refusal in ``e``'s causes, contexts and torch's per-rank failures."""
    seen: set[int] = set()
    todo: list[Any] = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen or not isinstance(x, BaseException):
            continue
        seen.add(id(x))
        if isinstance(x, pickle.UnpicklingError):
            return x
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)  # torch's CheckpointException: rank -> error
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def install() -> None:
    """Route torch's ``FileSystemReader.read_metadata`` through :class:`MetadataUnpickler` and
    ``DefaultLoadPlanner.load_bytes`` through :func:`load_bytes_record`.

    Idempotent. Same results as torch's own methods (torch 2.13,
    ``torch/distributed/checkpoint/filesystem.py``: read, default ``storage_meta``, set
    ``load_id``; ``default_planner.py``: store the object at its flattened or plain key), with the
    restricted unpicklers in place of ``pickle.load`` and ``torch.load(weights_only=False)``.
    """
    from torch.distributed.checkpoint import default_planner, filesystem
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    reader = filesystem.FileSystemReader
    if getattr(reader.read_metadata, "_megatron_gvpo_safe", False):
        return

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    read_data = reader.read_data

    def read_data_naming_the_folder(self, plan, planner):
        planner._megatron_gvpo_dir = str(self.path)  # for load_bytes' messages
        return read_data(self, plan, planner)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        where = getattr(self, "_megatron_gvpo_dir", "checkpoint")
        info = getattr(self, "metadata", None)
        info = info.storage_data.get(read_item.storage_index) if info is not None else None
        if info is not None:
            where = os.path.join(where, info.relative_path)
        obj = load_bytes_record(value, f"{where} ({fqn})")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    read_metadata._megatron_gvpo_safe = True  # type: ignore[attr-defined]
    reader.read_metadata = read_metadata
    reader.read_data = read_data_naming_the_folder
    default_planner.DefaultLoadPlanner.load_bytes = load_bytes
    _check_no_override()


def _check_no_override() -> None:
    """megatron's load planner must inherit ``load_bytes`` (0.16-0.19 do), else it bypasses ours."""
    try:
        from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    if MCoreLoadPlanner.load_bytes is not DefaultLoadPlanner.load_bytes:
        raise RuntimeError(
            "megatron-core's MCoreLoadPlanner overrides load_bytes: checkpoint bytes records "
            "would be unpickled unrestricted; megatron_gvpo.bridge.safe_metadata needs updating"
        )


install()
