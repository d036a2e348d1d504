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
