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
    """One sha256 over the files' bytes, in path order. Within a process a file unchanged since
    (same inode, size and modification times) is not read again: one `sae run` asks for the same LM's
    hash at every stage that loads or checks the LM (about 100 MB to read for SmolLM2)."""
    paths = sorted(paths)
    key = tuple((str(p.resolve()), *_version(p.stat())) for p in paths)
    if key not in _HASHED:
        digest = hashlib.sha256()
        for path in paths:
            with path.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


_HASHED: dict[tuple, str] = {}  # files_sha256's results, by the files' paths and _version


def _version(stat) -> tuple[int, ...]:
    """What changes when a file is rewritten: a new file renamed over it (another inode), or
    bytes written in place (its size or modification time)."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def parameters_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
