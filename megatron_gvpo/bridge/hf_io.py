"""Read and write HF checkpoints through safetensors only (never pickle), one tensor at a time."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
# Files copied alongside the weights so a converted model loads in transformers and SGLang.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


class SafetensorsReader:
    """Lazy reader over a folder of ``*.safetensors`` (with or without an index).

    All shard headers are validated up front (missing shard, truncated file, unreadable header),
    so bad input fails before any model is built; tensors are then read one at a time.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{self.dir}: no *.safetensors files (pickled .bin checkpoints are not loaded; "
                    "convert them to safetensors first)"
                )
            weight_map = None
        self.name_to_file: dict[str, str] = {}
        for f in files:
            names = _validated_header(self.dir / f)
            for n in names:
                self.name_to_file[n] = f
        if weight_map is not None:
            for n, f in weight_map.items():
                if self.name_to_file.get(n) != f:
                    raise ValueError(f"{index}: tensor {n!r} is listed in {f} but not stored there")
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.name_to_file

    def names(self) -> list[str]:
        return list(self.name_to_file)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.name_to_file:
            raise KeyError(f"{self.dir}: tensor {name!r} not found in the safetensors files")
        f = self.name_to_file[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(self.dir / f), framework="pt", device="cpu")
        return self._handles[f].get_tensor(name)


def _validated_header(path: Path) -> list[str]:
    """Tensor names in a safetensors file; ValueError when the file is missing or truncated."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: safetensors shard is missing")
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw_len)
        if 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file (header says {n} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(
            f"{path}: truncated safetensors file: {size} bytes, tensors need {8 + n + end}"
        )
    return [k for k in header if k != "__metadata__"]


def write_safetensors_shard(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write one shard atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def staging_dir(final: str | Path) -> Path:
    """The temporary sibling a folder is written into before :func:`publish_dir` renames it."""
    final = Path(final)
    return final.with_name(final.name + ".tmp")


def publish_dir(final: str | Path) -> None:
    """Swap the finished staging folder in for ``final``; a crash before this leaves ``final`` whole."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(staging_dir(final), final)
    shutil.rmtree(old, ignore_errors=True)


def write_index(out_dir: str | Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write ``model.safetensors.index.json`` for a sharded checkpoint."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    Path(out_dir, INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_bucket_shards(buckets, out_dir: str | Path) -> int:
    """Write HF-named tensor buckets as ``model-0000k.safetensors`` shards (one per non-empty
    bucket) plus the index into ``out_dir``; returns the number of tensors. A name seen twice is
    an error."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for k, bucket in enumerate(b for b in buckets if b):
        shard = f"model-{k + 1:05d}.safetensors"
        tensors = {}
        for name, t in bucket:
            if name in weight_map or name in tensors:
                raise ValueError(f"tensor {name!r} appears twice in the exported buckets")
            tensors[name] = t.detach().cpu()
            total += t.numel() * t.element_size()
        write_safetensors_shard(tensors, out_dir / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    write_index(out_dir, weight_map, total)
    return len(weight_map)


def copy_side_files(src: str | Path, dst: str | Path) -> None:
    """Copy config, generation config and tokenizer files (whichever exist) from src to dst."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in HF_SIDE_FILES:
        if Path(src, name).is_file():
            shutil.copy2(Path(src, name), Path(dst, name))
