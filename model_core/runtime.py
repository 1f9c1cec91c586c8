"""Process-wide CPU runtime settings that the ``mondeq`` entry points apply.

A CPU solve allocates and frees tensors of a few MB at every step (spectra, iterates).
glibc's allocator serves such sizes with fresh ``mmap`` pages and hands them back on
``free``, so each step pays a page fault for every 4 KiB it touches again: 10,000–20,000
faults for one batch-64 inference of the CIFAR multi-tier model, about 9% of its time on
this project's 2-core VMs (median of 10 alternating process pairs). Keeping such blocks in
the heap, as jemalloc or tcmalloc would, removes the faults.

This is a property of the whole process, so the library never changes it on import: the
``mondeq`` command line, ``python -m training`` and the service call
:func:`tune_allocator`, and an embedding program may call it too. ``MONDEQ_TUNE_MALLOC=0``
turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20  # blocks up to this size come from the heap
TRIM_THRESHOLD = 512 << 20  # free heap top kept for reuse instead of returned
_GLIBC_MMAP_MAX = 32 << 20  # the cap older glibc releases put on the mmap threshold

_applied: bool | None = None


def tune_allocator() -> bool:
    """Keep blocks of up to 256 MiB in glibc's heap and up to 512 MiB of it free for reuse.

    Idempotent. Returns whether the settings are in force: ``False`` off Linux/glibc, or
    when the environment sets ``MONDEQ_TUNE_MALLOC=0``. The process's resident memory then
    stays near its peak instead of shrinking between requests.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MONDEQ_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_MAX)
    ):
        return False
    _applied = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
