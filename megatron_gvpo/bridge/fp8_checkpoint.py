"""Write a blockwise-FP8 copy of an HF checkpoint, in the format HF FP8 models ship.

Linear projections of the decoder layers become ``float8_e4m3fn`` with a float32
``weight_scale_inv`` per 128x128 block (``bridge/fp8.py``); ``config.json`` gets the
``quantization_config`` transformers reads as ``FineGrainedFP8Config`` (``quant_method: fp8``,
``fmt: e4m3``, ``activation_scheme: dynamic``, ``weight_block_size: [128, 128]``). SGLang started
from such a folder holds ``weight_scale_inv`` parameters, so blockwise-FP8 weight updates land;
``--quantization fp8`` on a BF16 checkpoint quantizes online and has none.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from megatron_gvpo.bridge.fp8 import DEFAULT_BLOCK, fp8_quantization_config, quantize_named
from megatron_gvpo.bridge.hf_io import (
    SafetensorsReader,
    copy_side_files,
    publish_dir,
    staging_dir,
    write_bucket_shards,
)

SOURCE_MARKER = "fp8_source.json"  # which source (and block) a converted folder came from


def _buckets(reader: SafetensorsReader, block: tuple[int, int],
             bucket_bytes: int) -> Iterator[list]:
    bucket, size = [], 0
    for name in sorted(reader.names()):
        for pair in quantize_named(name, reader.get(name), block):
            bucket.append(pair)
            size += pair[1].numel() * pair[1].element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def convert_hf_to_fp8(src: str | Path, dst: str | Path, block: tuple[int, int] = DEFAULT_BLOCK,
                      *, reuse: bool = False, shard_bytes: int = 2 << 30) -> Path:
    """Quantize ``src`` (an HF safetensors folder) into ``dst``; returns ``dst``.

    With ``reuse``, a ``dst`` already converted from the same source and block size is kept.
    The folder is written beside ``dst`` and renamed into place when complete.
    """
    src, dst = Path(src), Path(dst)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected an HF model folder)")
    config = json.loads(cfg_path.read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{cfg_path}: already quantized ({config['quantization_config']})")
    marker = {"source": str(src.resolve()), "weight_block_size": list(block)}
    if reuse and (dst / SOURCE_MARKER).is_file():
        if json.loads((dst / SOURCE_MARKER).read_text()) == marker:
            return dst
    reader = SafetensorsReader(src)  # validates every shard before writing anything
    stage = staging_dir(dst)
    shutil.rmtree(stage, ignore_errors=True)
    write_bucket_shards(_buckets(reader, block, shard_bytes), stage)
    copy_side_files(src, stage)
    config["quantization_config"] = fp8_quantization_config(block)
    (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (stage / SOURCE_MARKER).write_text(json.dumps(marker) + "\n")
    dst.parent.mkdir(parents=True, exist_ok=True)
    publish_dir(dst)
    return dst
