"""The one SAE interface every variant implements (plain torch: no Lightning, no I/O).

Weights use SAELens's layout so export is a rename, not a transpose:
    W_enc (d_in, n_features)   b_enc (n_features,)
    W_dec (n_features, d_in)   b_dec (d_in,)
A "decoder column" in the paper's words is a row of W_dec here.

The training loop only ever calls:
    out = sae(x, step)                 # SAEOutput: reconstruction, features, losses["loss"]
    sae.before_optimizer_step()        # e.g. the paper's removal of the parallel gradient
    sae.after_optimizer_step()         # e.g. the paper's decoder renormalisation
    sae.initialize_from_data(sample)   # data-dependent init (b_dec, decoder from data, biases)
so strategies and callbacks never ask which variant they hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from framework.config import SAEConfig


@dataclass
class SAEOutput:
    reconstruction: torch.Tensor  # (batch, d_in)
    features: torch.Tensor  # (batch, n_features), post-nonlinearity activations
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # "loss" is the total

    @property
    def loss(self) -> torch.Tensor:
        return self.losses["loss"]


class SAE(nn.Module):
    variant: str = "base"

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.d_in = d_in
        self.n_features = cfg.n_features
        self.W_enc = nn.Parameter(torch.empty(d_in, cfg.n_features))
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_features))
        self.W_dec = nn.Parameter(torch.empty(cfg.n_features, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.W_dec + self.b_dec  # (batch, n) @ (n, d) -> (batch, d)

    def forward(self, x: torch.Tensor, step: int = 0) -> SAEOutput:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Adjust gradients after backward (default: nothing)."""

    def after_optimizer_step(self) -> None:
        """Re-impose weight constraints after the optimizer step (default: nothing)."""

    @torch.no_grad()
    def initialize_from_data(self, sample: torch.Tensor) -> None:
        """Data-dependent initialisation from a sample of activations (batch, d_in)."""
