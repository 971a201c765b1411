"""Serve large CPU tensors from the process heap instead of fresh mmap()ed pages (glibc only).

glibc serves an allocation above `M_MMAP_THRESHOLD` (at most 32 MB by its own adjustment) with fresh pages from the
OS, so every new activation-sized tensor of a CNN at 224² pays a page fault per 4 KiB page. Measured on 2 cores,
three elementwise passes over a 77 MB tensor: 61 ms that way, 26 ms with the threshold raised so that freed blocks
are reused. glibc also gives the free top of the heap back to the OS once it exceeds the trim threshold (128 KiB),
and the next large tensor faults those pages in again: a forward+backward of lite0 at batch 32 on 2 cores paid
~90,000 page faults and took 1.03–1.10 s that way, 0.93–0.94 s with the trim threshold at 512 MiB (no faults), at
the same peak resident set and no higher peak in `benchmarks/recon_memory.py`. The threshold bounds what the
process keeps without using (an earlier setting, its value not recorded, cost 1.2 GB more peak memory there). The
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
