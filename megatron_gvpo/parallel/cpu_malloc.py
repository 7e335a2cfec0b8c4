"""glibc malloc settings for CPU training: keep freed activation memory instead of returning it.

With glibc's defaults a tensor above the (dynamic) mmap threshold gets fresh pages from the
kernel and gives them back when freed, and the top of the heap is trimmed whenever more than the
trim threshold is free there. A training step allocates and frees the same activation and
gradient buffers every step, so on CPU each step faulted its working set in again page by page:
about 7,400 minor page faults per GRPO step on the demo model at 32 prompts x 8 (one thread),
against about 260 with the settings below (``docs/benchmarks.md``).

``M_MMAP_THRESHOLD`` 32 MiB (glibc's largest; blocks below it come from the heap and are reused)
and ``M_TRIM_THRESHOLD`` 1 GiB (free memory at the heap's top is kept up to that). Setting either
turns off glibc's dynamic threshold, which is why both are set together. The cost is a resident
size that stays near its peak. Applied once per process, only without CUDA (on GPU the host side
allocates little), only with glibc, and never when the user chose their own (any
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` /
``MALLOC_MMAP_MAX_`` in the environment, or ``MEGATRON_GVPO_MALLOC=default``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024
USER_KEYS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; return whether they are in force."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MEGATRON_GVPO_MALLOC") == "default" or any(
        k in os.environ for k in USER_KEYS
    ):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: mallopt's parameters are glibc's
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = ok and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = ok
    if ok:
        logger.info(
            "CPU: malloc keeps freed memory (mmap threshold %d MiB, trim threshold %d MiB)",
            MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20,
        )
    return ok
