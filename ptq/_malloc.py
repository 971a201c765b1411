"""Serve large CPU tensors from the process heap instead of fresh mmap()ed pages (glibc only).

glibc serves an allocation above `M_MMAP_THRESHOLD` (at most 32 MB by its own adjustment) with fresh pages from the
OS, so every new activation-sized tensor of a CNN at 224² pays a page fault per 4 KiB page; with the threshold raised,
freed blocks are reused (elementwise passes over a large tensor measured more than twice as fast on 2 cores). glibc
also gives the free top of the heap back to the OS once it exceeds the trim threshold (128 KiB), and the next large
tensor faults those pages in again: a forward+backward of lite0 at batch 32 paid tens of thousands of page faults
that way and ran 10–17% slower than with the trim threshold at 512 MiB, at the same peak resident set
(`benchmarks/recon_memory.py` measures the peak). The threshold bounds what the process keeps without using. The
command line turns both on; `PTQ_MALLOC_TUNING=0` leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_LARGE = 1 << 30
_KEEP_FREE = 512 << 20


def keep_freed_memory() -> bool:
    """Raise glibc's mmap threshold to 1 GiB and its trim threshold to 512 MiB; True when applied."""
    if os.environ.get("PTQ_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = libc.mallopt(M_MMAP_THRESHOLD, _LARGE) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _KEEP_FREE) == 1
    except (OSError, AttributeError):  # not glibc (musl, for example)
        return False
    log.debug("malloc tuning %s", "applied" if applied else "refused")
    return applied
