"""Host memory: how glibc's allocator treats the memory a CPU run frees, and how much memory
this process holds. No tether imports, so any module (fsdp.py included) can use it."""

from __future__ import annotations

import ctypes
import os
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """On Linux/glibc, keep freed memory in the process instead of handing it back to the OS.

    By default glibc serves every large block (a logits tensor, an activation) with a fresh mmap
    and unmaps it on free, so each training step page-faults its activations in again and the
    kernel zeroes them: thousands of faults per step. A caching allocator (PyTorch's own on a
    GPU, jemalloc or tcmalloc on a CPU) avoids that; this gets the same from glibc itself by
    serving blocks up to 256 MiB from the heap and trimming the heap only past 1 GiB of free top.
    On the PPO benchmark model that is 21,000 page faults and 60 ms of system time per
    iteration, down to 470 faults and 5 ms. The cost: the process keeps its peak memory.
    Set TETHER_CPU_MALLOC=0 to leave glibc's defaults alone. Returns whether it was applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if os.environ.get("TETHER_CPU_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, or no libc.so.6)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _MALLOC_TUNED = bool(mallopt(_M_MMAP_THRESHOLD, 256 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _MALLOC_TUNED


def release_freed_memory() -> bool:
    """On Linux/glibc, hand the heap's free memory back to the OS now (malloc_trim). For a
    one-off drop that `keep_freed_memory` would otherwise keep for good: the whole models each
    process loads before --fsdp shards them. Returns whether it ran."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def resident_mb() -> float:
    """This process's resident memory now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20
