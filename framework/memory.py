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
Hence opt-in for a whole process (docs/training.md, "Host memory"). `freed_memory_kept()` does the
same for one stage only and returns the heap afterwards: pretraining the built-in LM uses it by
default, since its steps allocate 64 MiB logits and their gradients afresh (46% more tokens/s
on 2 cores for 10% more peak RSS).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Some glibc builds refuse an mmap threshold above half their largest arena heap (32 MiB on
# 64-bit); 2.36 (Debian 12) takes 1 GiB. The first value taken wins.
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
# What glibc's dynamic thresholds settle at in a process that has freed large blocks (the mmap
# threshold rises to the largest freed block, at most 32 MiB on 64-bit; trim follows at twice
# that): restored when a stage that kept freed memory ends.
_SETTLED_MMAP_THRESHOLD, _SETTLED_TRIM_THRESHOLD = 32 << 20, 64 << 20
_kept_for_process = False
_open_scopes = 0  # freed_memory_kept() scopes entered and not yet left


def keep_freed_memory(force: bool = False) -> bool:
    """If SAE_KEEP_FREED_MEMORY=1 (or `force`), ask glibc's malloc to serve large allocations
    from its heap and keep what is freed (process-wide). True if that is now in effect; False
    where it is not wanted or not possible (not Linux with glibc)."""
    if not (force or os.environ.get("SAE_KEEP_FREED_MEMORY") == "1") or not sys.platform.startswith("linux"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    global _kept_for_process
    _kept_for_process = _keep_freed(libc.mallopt)
    return _kept_for_process


def _glibc():
    """glibc through ctypes, or None (musl and other C libraries)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _keep_freed(mallopt) -> bool:
    """Serve large allocations from the heap and never trim it; True if both settings took."""
    if not any(mallopt(_M_MMAP_THRESHOLD, threshold) for threshold in _MMAP_THRESHOLDS):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


@contextlib.contextmanager
def freed_memory_kept():
    """Within: malloc keeps freed memory for reuse, as keep_freed_memory() does for a process.
    After: fixed thresholds at the values glibc's dynamic ones settle at once large blocks have
    been freed (a process that never freed one would have had lower ones), and the heap's free
    memory returned to the kernel (malloc_trim), so later stages hold about what they would
    have. SAE_KEEP_FREED_MEMORY=1 makes it keep freed memory for the rest of the process instead
    (as `sae` does at its start); =0 asks for glibc's own behaviour throughout; off glibc nothing
    changes. A scope inside another leaves the settings to the outer one. Yields whether memory
    is kept inside."""
    global _open_scopes
    setting = os.environ.get("SAE_KEEP_FREED_MEMORY")
    if setting == "1":
        yield keep_freed_memory()
        return
    if _kept_for_process or _open_scopes or setting == "0" or not sys.platform.startswith("linux"):
        yield _kept_for_process or bool(_open_scopes)
        return
    libc = _glibc()
    if libc is None:
        yield False
        return
    kept = _keep_freed(libc.mallopt)
    _open_scopes += 1
    try:
        yield kept
    finally:
        _open_scopes -= 1
        libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD)
        libc.malloc_trim(0)


class HostCopy:
    """A tensor's values on their way to the host, read later instead of at once.

    On a GPU, `.item()` or `.tolist()` waits until every kernel queued so far has run: the host
    stops queueing the step's next kernels, and the GPU then idles while it catches up. Here
    the values are copied into page-locked memory without blocking, behind an event that
    `values()` waits on, by when the kernels that made them have long finished. Elsewhere the
    tensor itself, read when asked (the same order of events, so CPU tests cover it)."""

    def __init__(self, values):
        import torch

        self._on_the_way = values.device.type == "cuda"
        if self._on_the_way:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            with torch.cuda.device(values.device):  # the copy and its event on the values' GPU's stream
                self._host.copy_(values, non_blocking=True)
                self._copied = torch.cuda.Event()
                self._copied.record()
        else:
            self._host = values.detach()

    def values(self) -> list:
        if self._on_the_way:
            self._copied.synchronize()
        return self._host.reshape(-1).tolist()
