"""Logit effects: the tokens a unit's direction promotes and suppresses, read through the weights.

In the paper's one-layer model everything after the MLP is linear except the final LayerNorm,
so a feature's decoder direction d (neuron space) reaches the logits as d @ W_out @ W_U -- the
"bless / forbid / damn" table of the God feature. Units read from the residual stream or the
MLP's output are already in model space and skip W_out; `mlp.hook_pre` sits before the
nonlinearity, has no linear path, and gets no table.

The final norm: every model's `unembed_weight()` (lm/builtin.py, lm/hf.py) folds the norm's
gain (and a LayerNorm's centring) into W_U exactly and drops the per-token scale, which is
positive and so leaves the ranking of tokens unchanged. In deeper models this is the direct
path only: later layers also read the direction, and feature ablation (ablation.py) measures
the full effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.lm.base import BaseLM, parse_hook

CHUNK = 1024  # units per matmul: (chunk, vocab) floats at a time, not (n_units, vocab)


@dataclass
class LogitEffects:
    top_ids: torch.Tensor  # (n_units, k) token ids, largest effect first
    top_values: torch.Tensor  # (n_units, k)
    bottom_ids: torch.Tensor  # (n_units, k) most negative first
    bottom_values: torch.Tensor  # (n_units, k)


def readout(model: BaseLM, hook: str) -> torch.Tensor | None:
    """(d_in, vocab): how a direction at `hook` moves the logits directly; None before a nonlinearity."""
    layer, kind = parse_hook(hook)
    if kind == "mlp.hook_pre":
        return None
    W_U = model.unembed_weight().detach().float()  # (d_model, vocab)
    return model.mlp_out_weight(layer).detach().float() @ W_U if kind == "mlp.hook_post" else W_U


@torch.no_grad()
def logit_effects(directions: torch.Tensor, readout_matrix: torch.Tensor, k: int) -> LogitEffects:
    """Top and bottom k tokens of directions (n_units, d_in) @ readout_matrix (d_in, vocab)."""
    k = min(k, readout_matrix.shape[1])
    parts = []
    for chunk in directions.float().split(CHUNK):
        logits = chunk.to(readout_matrix.device) @ readout_matrix  # (chunk, vocab)
        top = torch.topk(logits, k, dim=1)
        bottom = torch.topk(logits, k, dim=1, largest=False)
        parts.append((top.indices, top.values, bottom.indices, bottom.values))
    return LogitEffects(*(torch.cat(p).cpu() for p in zip(*parts)))
