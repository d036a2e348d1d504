"""framework.memory: with SAE_KEEP_FREED_MEMORY=1 large CPU tensors reuse freed memory instead of
faulting fresh pages in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# In a fresh process (malloc's settings are process-wide): allocate and fill a 64 MiB tensor
# again and again, as training steps do, and print the minor page faults each one took once the
# heap has settled (its first few rounds grow it: aligned allocations split the freed chunks).
PROBE = """
import resource, torch
from framework.memory import keep_freed_memory
print(keep_freed_memory())
for _ in range(8):
    torch.empty(16 << 20).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(16):
    torch.empty(16 << 20).fill_(1)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 16)
"""


def _probe(**env: str) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", PROBE], env=os.environ | env, capture_output=True, text=True,
                         timeout=120, check=True)
    kept, faults = run.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensors_are_reused_without_page_faults_when_turned_on():
    kept, faults = _probe(SAE_KEEP_FREED_MEMORY="1")
    assert kept == "True"
    # 64 MiB is 16,384 pages: mostly reused, not faulted in again (glibc's aligned allocations
    # split freed chunks, so now and then a part of one is fresh: 0-4,096 pages measured)
    assert faults < 16384 // 4
    kept, faults = _probe(SAE_KEEP_FREED_MEMORY="")  # the default
    assert kept == "False"
    assert faults >= 16384  # glibc's default: unmapped on free, every page faulted in again


# The same, for one stage: memory kept inside freed_memory_kept(), glibc's behaviour after it.
SCOPED_PROBE = """
import resource, torch
from framework.memory import freed_memory_kept

def faults_per_tensor(rounds=16, floats=16 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.empty(floats).fill_(1)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // rounds

with freed_memory_kept() as kept:
    faults_per_tensor(8)
    inside = faults_per_tensor()
# After: 256 MiB tensors, larger than any free block the scope can have left in the heap, so only
# the restored mmap threshold decides where they come from.
print(kept, inside, faults_per_tensor(4, 64 << 20))
"""


def _scoped_probe(**env: str) -> tuple[str, int, int]:
    run = subprocess.run([sys.executable, "-c", SCOPED_PROBE], env=os.environ | env, capture_output=True, text=True,
                         timeout=120, check=True)
    kept, inside, after = run.stdout.split()
    return kept, int(inside), int(after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_stage_keeps_freed_memory_inside_its_scope_only():
    kept, inside, after = _scoped_probe(SAE_KEEP_FREED_MEMORY="")
    assert kept == "True"
    assert inside < 16384 // 4  # reused (pretraining's logits)
    assert after >= 65536  # the scope ended: unmapped on free and faulted in again, as by default
    kept, inside, after = _scoped_probe(SAE_KEEP_FREED_MEMORY="0")  # asked for glibc's behaviour throughout
    assert kept == "False"
    assert inside >= 16384 and after >= 65536
    kept, inside, after = _scoped_probe(SAE_KEEP_FREED_MEMORY="1")  # asked for it for the whole process
    assert kept == "True"
    assert inside < 16384 // 4 and after < 65536  # still kept after the scope (the default: >= 65,536)
