"""Neuron composition: which MLP neurons a feature's decoder direction is built from.

The paper's argument that features are not neurons in disguise: most features' decoder
directions spread over many neurons. Two views of one direction w (a row of W_dec, in neuron
space, normalised to unit length so weights are cosines with the neuron basis):

- the top neurons by |w_j|, signed, to read alongside the neuron baseline's own pages;
- how many neurons carry 50% and 90% of the squared norm, and the participation ratio
  (sum w^2)^2 / sum w^4 -- the "effective number" of neurons, 1 for a neuron-aligned feature
  and d_mlp for a direction spread evenly over all of them.

Only directions in neuron space (mlp.hook_pre / mlp.hook_post SAEs) have a composition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.lm.base import parse_hook


@dataclass
class Composition:
    top_neurons: torch.Tensor  # (n_units, top) neuron indices, largest |weight| first
    top_weights: torch.Tensor  # (n_units, top) signed weights of the unit-norm direction
    neurons_for_50: torch.Tensor  # (n_units,) fewest neurons carrying 50% of the squared norm
    neurons_for_90: torch.Tensor  # (n_units,)
    effective_neurons: torch.Tensor  # (n_units,) participation ratio


def has_composition(hook: str) -> bool:
    return parse_hook(hook)[1] in ("mlp.hook_pre", "mlp.hook_post")


@torch.no_grad()
def neuron_composition(directions: torch.Tensor, top: int) -> Composition:
    """Composition of each row of directions (n_units, d_mlp)."""
    w = directions.float().cpu()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    squares = w.pow(2)  # (n_units, d_mlp), rows sum to 1
    sorted_squares = squares.sort(dim=1, descending=True).values
    carried = sorted_squares.cumsum(dim=1)  # (n_units, d_mlp)
    top_neurons = torch.topk(w.abs(), min(top, w.shape[1]), dim=1).indices
    return Composition(
        top_neurons=top_neurons,
        top_weights=w.gather(1, top_neurons),
        neurons_for_50=_neurons_needed(carried, 0.5),
        neurons_for_90=_neurons_needed(carried, 0.9),
        effective_neurons=1.0 / squares.pow(2).sum(dim=1).clamp_min(1e-12),
    )


def _neurons_needed(carried: torch.Tensor, fraction: float) -> torch.Tensor:
    """How many of the largest squares it takes for the running sum to reach `fraction`."""
    return (carried < fraction - 1e-6).sum(dim=1) + 1
