"""Host memory policy for engines that compute on the CPU.

Every step allocates and frees the same temporaries (gathered keys and values, expert
activations, logits). glibc serves allocations above its mmap threshold with fresh mappings
and unmaps them on free, and trims the heap's free top, so a step can pay a page fault for
each 4 KiB it touches again (on the VMs we measured, fresh memory is written at ~4 GB/s
against ~30 GB/s for reused memory). The threshold starts at 128 KiB and only creeps up as
chunks are freed; here it is pinned at glibc's maximum (32 MiB) and the heap keeps up to
256 MiB of free top. Larger allocations still get their own mappings and go back to the
OS on free: serving those from the heap as well was tried, and a workload with multi-GB
temporaries (transformers' eager attention at batch 64) then fragmented the heap until the
process was killed for memory. Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory up to 32 MiB a chunk for reuse (process-wide, idempotent).
    Returns whether the policy is in force (False off Linux or off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: its mallopt knobs differ
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the host memory policy; CPU steps may page-fault more")
    return ok
