"""Host memory: keep freed allocations for the next step, as a GPU's caching allocator does.

torch takes CPU tensors from glibc's malloc, which serves every allocation above its mmap
threshold (dynamic, at most 32 MiB) with fresh pages from the kernel and unmaps them when freed.
A training step's new (batch, n_features) codes, (n_features, d) gradients and weight casts
then fault every page in again, each step: on the 2-core planning machine a 64 MiB tensor took
16,385 page faults and 16 ms to allocate and fill, 2 ms once its memory is reused. Serving large
allocations from the heap and never trimming it lets each step reuse the last one's memory
(steps 5-10% faster on that machine: TopK, paper dense and paper sparse alike). The process then
keeps its peak heap until it exits, which a training run reaches in its first steps anyway.

`SAE_KEEP_FREED_MEMORY=0` leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Some glibc builds refuse an mmap threshold above half their largest arena heap (32 MiB on
# 64-bit); 2.36 (Debian 12) takes 1 GiB. The first value taken wins.
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve large allocations from its heap and keep what is freed
    (process-wide). False where that is not possible (not Linux with glibc) or not wanted."""
    if os.environ.get("SAE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    if not any(mallopt(_M_MMAP_THRESHOLD, threshold) for threshold in _MMAP_THRESHOLDS):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
