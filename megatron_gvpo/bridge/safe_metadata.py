"""Checkpoint metadata read without running code from the file.

torch's distributed-checkpoint reader (``FileSystemReader.read_metadata``, used by megatron's
``dist_checkpointing.load`` and by every load path here: ``model.path``, ``algorithm.ref_model``,
``trainer.run_dir`` checkpoints, the tools) unpickles ``<dir>/.metadata`` with ``pickle.load``,
so a crafted file runs any command it likes. :func:`install` makes that reader use
:class:`MetadataUnpickler`, which admits only the classes such metadata holds: torch's checkpoint
metadata and plan types, ``torch.Size``, dtypes, layouts and a few builtins. Anything else fails,
naming the file. (The weights themselves are read with ``torch.load(weights_only=True)`` by torch,
and megatron's ``common.pt`` likewise; our own state is JSON and safetensors.)
"""

from __future__ import annotations

import pickle
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
        raise UnsafeCheckpointError(f"{source}: unreadable checkpoint metadata ({e!r})") from e


def read_metadata_file(path: str | Path) -> Any:
    """The metadata in ``path`` (a ``.metadata`` file), read with :class:`MetadataUnpickler`."""
    with open(path, "rb") as f:
        return load_metadata(f, str(path))


def install() -> None:
    """Route torch's ``FileSystemReader.read_metadata`` through :class:`MetadataUnpickler`.

    Idempotent. Same result as torch's own method (torch 2.13,
    ``torch/distributed/checkpoint/filesystem.py``: read, default ``storage_meta``, set
    ``load_id``), with the restricted unpickler in place of ``pickle.load``.
    """
    from torch.distributed.checkpoint import filesystem
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

    read_metadata._megatron_gvpo_safe = True  # type: ignore[attr-defined]
    reader.read_metadata = read_metadata


install()
