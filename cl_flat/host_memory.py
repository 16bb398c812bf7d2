"""The host heap: memory freed by one update stays with the process for the next one.

glibc's malloc hands the top of its heap back to the kernel whenever more than M_TRIM_THRESHOLD
of it is free (by default twice the largest block it has served with mmap, at most 64 MiB), and
the kernel zeroes and faults those pages in again when they are next touched. An update frees
its activations in backward and allocates them again in the next forward, so wherever an
update's free top of heap crosses that threshold, its whole working set is paid again as page
faults, every update (RWP `one_pass` did; the figures are in results/README.md).
`keep_freed_heap` fixes the trim threshold at 2 GiB and the mmap threshold at 32 MiB (the
largest value glibc's own adaptive threshold takes, which it reaches after the first large
tensor anyway), so the heap keeps its peak: the resident memory stays at the peak the run
reaches regardless, and the peak itself does not change.

A no-op off glibc, and where the user chose the policy (a MALLOC_* variable, or another
allocator in LD_PRELOAD such as jemalloc or tcmalloc).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
MMAP_THRESHOLD = 32 * 2**20
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX",
                 "GLIBC_TUNABLES")
_done = False


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_heap() -> bool:
    """Set the policy (once per process); whether this call set it."""
    global _done
    if _done or any(name in os.environ for name in USER_SETTINGS) or os.environ.get("LD_PRELOAD"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    _done = all([libc.mallopt(option, value) == 1 for option, value in settings])
    return _done
