"""Anthropic's April 2024 update ("Circuits Updates — April 2024", Conerly et al.).

    f = ReLU((x - b_dec) W_enc + b_enc),   x̂ = f W_dec + b_dec          (as the paper)
    L = mean((x - x̂)²) + λ(step) · mean_batch Σ_j f_j ‖W_dec,j‖₂

The decoder is unconstrained: weighting each feature's L1 by its decoder row norm makes shrinking
f while growing W_dec useless, which is what the unit-norm constraint was for. λ ramps linearly
from 0 over `l1_warmup_steps`. No resampling. Decoder rows start as random directions of norm 0.1
with W_enc = W_decᵀ: use `init: transpose` (or `data`) in the recipe; `kaiming` keeps the paper's
untied start, only rescaled to 0.1.

One deliberate difference from the update: "mse" here is the mean over elements, as for every
variant, where the update sums the squared error over d. The two losses differ by a factor d_in,
so the update's λ carries over as λ / d_in. (The update also normalises activations to
E‖x‖² = d_in; `train.normalize_activations: norm` brings rows to a mean norm of sqrt(d_in),
the peers' convention: inputs c = sqrt(E‖x‖² / (E‖x‖)²) ≥ 1 times the update's, equal where
row norms vary little. Scaling inputs by c scales the squared error by c² and the L1 by c, so
the update's λ matches as λ · c.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from framework.sae.paper import ReLUSAE


class April2024SAE(ReLUSAE):
    variant = "april2024"
    decoder_init_norm = 0.1

    def l1_weight(self) -> Tensor:
        return torch.linalg.vector_norm(self.W_dec, dim=1)  # (n,), differentiable

    def l1_coefficient(self, step: int) -> float:
        warmup = self.cfg.l1_warmup_steps
        return self.cfg.l1_coefficient * (min(1.0, step / warmup) if warmup > 0 else 1.0)
