"""Host memory: optionally keep freed allocations for the next step, as a GPU's caching
allocator does.

torch takes CPU tensors from glibc's malloc, which serves every allocation above its mmap
threshold (dynamic, at most 32 MiB) with fresh pages from the kernel and unmaps them when freed.
A training step's new (batch, n_features) codes, (n_features, d) gradients and weight casts
then fault every page in again, each step: on the 2-core planning machine a 64 MiB tensor took
16,385 page faults and 16 ms to allocate and fill, 2 ms once its memory is reused.

`SAE_KEEP_FREED_MEMORY=1` makes `sae` serve large allocations from malloc's heap and never trim
it, so each step reuses the last one's memory: steps 4-10% faster on that machine (TopK, paper
dense and paper sparse). The price is resident memory: freed chunks of other sizes stay resident
and the heap fragments, so a step's peak RSS rose by up to 2.2× (the paper SAE's sparse path at
16,384 features in bf16: 1.5 GiB against 0.7), and the process never returns its peak heap.
Hence opt-in (docs/training.md, "Host memory").
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


def keep_freed_memory(force: bool = False) -> bool:
    """If SAE_KEEP_FREED_MEMORY=1 (or `force`), ask glibc's malloc to serve large allocations
    from its heap and keep what is freed (process-wide). True if that is now in effect; False
    where it is not wanted or not possible (not Linux with glibc)."""
    if not (force or os.environ.get("SAE_KEEP_FREED_MEMORY") == "1") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    if not any(mallopt(_M_MMAP_THRESHOLD, threshold) for threshold in _MMAP_THRESHOLDS):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
