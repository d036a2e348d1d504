"""Fingerprints of weights, recorded in every activation manifest.

Shards harvested from one model must never be mixed with another's, and an SAE must be traced
to the exact weights it read. A hash of the weight files names them whatever their path; a model
built in memory (from a config) is named by a hash of its parameters instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from torch import nn


def files_sha256(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def parameters_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
