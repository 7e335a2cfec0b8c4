"""Weight sync through a shared folder: an HF safetensors checkpoint, then a reload by path.

``POST /update_weights_from_disk`` {model_path, weight_version, ...} needs no weight-update
session (0.5.23 ``managers/scheduler_components/weight_updater.py`` ``update_weights_from_disk``
does not check one), so the same calls work on every release read.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from megatron_gvpo.bridge.hf_io import (
    copy_side_files,
    publish_dir,
    staging_dir,
    write_bucket_shards,
)
from megatron_gvpo.rollout.base import NamedTensors
from megatron_gvpo.rollout.sglang.client import Endpoint, HTTPClient


def write_sync_folder(sync_dir: str, buckets: Iterable[NamedTensors],
                      model_path: str | None) -> tuple[str, int]:
    """Write the buckets as ``<sync_dir>/weights`` (staged, then published); (path, count)."""
    final = Path(sync_dir) / "weights"
    stage = staging_dir(final)
    shutil.rmtree(stage, ignore_errors=True)
    count = write_bucket_shards(buckets, stage)
    if count and model_path and Path(model_path).is_dir():
        copy_side_files(model_path, stage)
    if count:
        publish_dir(final)
    return str(final), count


def load_from_disk(client: HTTPClient, servers: Sequence[Endpoint], folder: str,
                   version: int) -> None:
    """Every server reloads its weights from ``folder`` and takes ``version``."""
    client.each(servers, lambda s: client.call(
        s, "POST", "/update_weights_from_disk",
        {"model_path": folder, "weight_version": str(version), "flush_cache": False},
        timeout=client.cfg.sync_timeout_s,
    ))
