"""megatron ``dist_checkpointing`` saves written by the saving process itself, no helper processes.

megatron-core 0.16's default ``torch_dist`` save strategy writes through ``FileSystemWriterAsync``
even when saving synchronously: it starts a ``spawn`` multiprocessing Manager for its result
queue (a fresh Python interpreter, ~280 MB, once per process, which outlives a killed trainer
with its resource tracker) and forks one writer process per file on every save
(``strategies/filesystem_async.py``: ``_get_write_results_queue``,
``write_preloaded_data_multiproc``). Our saves are synchronous anyway, so :class:`InProcessSave`
keeps the same file format and planning (megatron's ``MCoreSavePlanner``, ``.distcp`` files,
``.metadata``) and writes the files from threads of this process: nothing survives a kill -9,
and no interpreter starts per save. Write errors keep their ``OSError`` (ENOSPC included).
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.state_dict_saver import (
    save_state_dict_async_finalize,
    save_state_dict_async_plan,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)


class _InProcessWriter(FileSystemWriterAsync):
    """``FileSystemWriterAsync`` whose result queue and writers live in this process."""

    def prepare_write_data(self, plan, planner) -> None:
        # The parent asks megatron's module-level queue getter, which spawns a Manager on first
        # use; hand it an in-process queue for this call instead.
        saved, filesystem_async._results_queue = filesystem_async._results_queue, queue.Queue()
        try:
            super().prepare_write_data(plan, planner)
        finally:
            filesystem_async._results_queue = saved

    def get_save_function_and_args(self):
        fn, preload, args = super().get_save_function_and_args()
        if fn is None:
            return fn, preload, args
        transforms = [self.transforms] if hasattr(self, "transforms") else []
        # megatron's execute_sync swaps args[1] (the buckets) for their preloaded CPU copies
        return partial(_write_buckets, transforms), preload, args


def _write_buckets(transforms, rank: int, buckets, results: queue.Queue) -> None:
    """Write each bucket (one file) in its own thread; put {index: results} or the first error."""

    def one(i: int):
        local, count = queue.Queue(), queue.Queue()
        count.put(i)  # megatron's writer acknowledges its slot through this queue
        FileSystemWriterAsync.write_preloaded_data(transforms, i, buckets[i], local, count, True)
        return local.get()

    with ThreadPoolExecutor(max(1, len(buckets)), thread_name_prefix="ckpt-write") as pool:
        outcomes = list(pool.map(one, range(len(buckets))))
    errors = [r for _, r in outcomes if isinstance(r, Exception)]
    results.put(errors[0] if errors else dict(outcomes))


class InProcessSave(TorchDistSaveShardedStrategy):
    """megatron's ``torch_dist`` save strategy (same files), written without helper processes."""

    def __init__(self, thread_count: int = 2) -> None:
        super().__init__("torch_dist", 1, thread_count=thread_count)

    def async_save(
        self, sharded_state_dict, checkpoint_dir: Path, async_strategy: str = "mcore"
    ) -> AsyncRequest:
        # The same steps as the parent's async_save without its cached-plan options; megatron-core
        # 0.19's ``save`` passes ``async_strategy="mcore"`` (its own writer, which this replaces).
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        writer = _InProcessWriter(checkpoint_dir, thread_count=self.thread_count)
        planner = MCoreSavePlanner(
            dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
        )
        plan = save_state_dict_async_plan(pyt_state_dict, writer, None, 0, planner=planner)[0]
        save_fn, preload_fn, save_args = writer.get_save_function_and_args()
        return AsyncRequest(
            save_fn,
            save_args,
            [lambda: save_state_dict_async_finalize(*plan)],
            preload_fn=preload_fn,
        )
