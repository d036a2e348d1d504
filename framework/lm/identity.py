"""Fingerprints of weights, recorded in every activation manifest.

Shards harvested from one model must never be mixed with another's, and an SAE must be traced
to the exact weights it read. A hash of the weight files names them whatever their path
(`framework.artifacts.files_sha256`, torch-free, shared with the trained SAEs' digests); a model
built in memory (from a config) is named by a hash of its parameters instead.
"""

from __future__ import annotations

import hashlib

from torch import nn


def parameters_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
