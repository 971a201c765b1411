"""Serve large CPU tensors from the process heap instead of fresh mmap()ed pages (glibc only).

glibc serves an allocation above `M_MMAP_THRESHOLD` (at most 32 MB by its own adjustment) with fresh pages from the
OS, so every new activation-sized tensor of a CNN at 224² pays a page fault per 4 KiB page. Measured on 2 cores,
three elementwise passes over a 77 MB tensor: 61 ms that way, 26 ms with the threshold raised so that freed blocks
are reused. glibc still gives the top of the heap back to the OS (the trim threshold stays as it is): raising that as
well was a little faster (20 ms) but cost 1.2 GB more peak memory in `benchmarks/recon_memory.py`, against 0.65 GB
for this setting. The command line turns it on; `PTQ_MALLOC_TUNING=0` leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3
_LARGE = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap threshold to 1 GiB; True when applied."""
    if os.environ.get("PTQ_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = libc.mallopt(M_MMAP_THRESHOLD, _LARGE) == 1
    except (OSError, AttributeError):  # not glibc (musl, for example)
        return False
    log.debug("malloc tuning %s", "applied" if applied else "refused")
    return applied
