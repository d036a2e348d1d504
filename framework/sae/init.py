"""Initialisation: on a small budget, where the weights start decides what the features become.

A CPU run sees about a million activations where the paper's saw billions (DESIGN.md, "Learning
on a small budget"). With the paper's Kaiming init and zero encoder bias about half the features
fire on every token at step 0, and the L1 penalty spends the run shrinking them; with decoder rows
drawn from the data, the encoder tied to them, and each encoder bias set so its feature fires on
about init_target_l0 / n_features of the tokens, the run starts at its target sparsity and the
features move within minutes.

Recipe fields (SAEConfig):
  init               "kaiming": PyTorch's default Kaiming-uniform, encoder and decoder untied (the
                     paper); "transpose": random decoder directions, W_enc = W_decᵀ; "data": decoder
                     rows = sample rows - b_dec, W_enc = W_decᵀ (random directions until
                     `initialize_from_data` sees data). Decoder rows then have the variant's
                     `decoder_init_norm` (1, or 0.1 for april2024).
  decoder_bias_init  "geometric_median" (Weiszfeld, as the paper), "mean" or "zeros".
  init_target_l0     > 0: calibrate encoder biases to this L0 at step 0. The sample should hold at
                     least a few times n_features / init_target_l0 rows for the quantiles to be
                     meaningful.
  seed               every random draw uses a local generator seeded from it, so two SAEs built
                     from the same recipe start bit-identical.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from framework.sae.base import SAE


def _generator(seed: int, purpose: int) -> torch.Generator:
    # One stream per purpose, so adding a draw to one never shifts another.
    return torch.Generator().manual_seed(seed * 1_000_003 + purpose)


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def initialize_weights(sae: SAE) -> None:
    """Data-independent weights, from cfg.init and cfg.seed (called at construction)."""
    cfg, n, d = sae.cfg, sae.n_features, sae.d_in
    g = _generator(cfg.seed, 0)
    if cfg.init == "kaiming":
        # nn.Linear(d, n) and nn.Linear(n, d) weights, transposed into SAELens's layout.
        W_enc = torch.nn.init.kaiming_uniform_(torch.empty(n, d), a=math.sqrt(5), generator=g).T
        W_dec = torch.nn.init.kaiming_uniform_(torch.empty(d, n), a=math.sqrt(5), generator=g).T
        W_dec = _unit_rows(W_dec) * sae.decoder_init_norm
    elif cfg.init in ("transpose", "data"):
        W_dec = _unit_rows(torch.randn(n, d, generator=g)) * sae.decoder_init_norm  # (n, d)
        W_enc = W_dec.T
    else:
        raise ValueError(f"sae.init={cfg.init!r} is not one of kaiming, transpose, data")
    sae.W_enc.copy_(W_enc)
    sae.W_dec.copy_(W_dec)


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """argmin_y Σ_i ‖points_i - y‖ by Weiszfeld's iteration, started at the mean. (m, d) -> (d,)"""
    points = points.double()
    y = points.mean(0)
    for _ in range(max_iter):
        # Clamping the distance keeps the step defined when y lands on a data point.
        weights = 1 / torch.linalg.vector_norm(points - y, dim=1).clamp_min(1e-12)  # (m,)
        y_next = weights @ points / weights.sum()
        moved = torch.linalg.vector_norm(y_next - y)
        y = y_next
        if moved <= tol * (1 + torch.linalg.vector_norm(y)):
            break
    return y


def decoder_bias_from(sample: torch.Tensor, how: str) -> torch.Tensor:
    if how == "geometric_median":
        return geometric_median(sample)
    if how == "mean":
        return sample.double().mean(0)
    if how == "zeros":
        return sample.new_zeros(sample.shape[1])
    raise ValueError(f"sae.decoder_bias_init={how!r} is not one of geometric_median, mean, zeros")


@torch.no_grad()
def calibrate_encoder_bias(sae: SAE, sample: torch.Tensor, target_l0: float) -> None:
    """Set b_enc so each feature fires on about target_l0 / n_features of the sample's rows.

    For feature j, with its pre-activations (without bias) sorted descending v_1 ≥ v_2 ≥ …, the
    bias puts the firing threshold at rank r + ½, r = rows·target_l0/n_features (between v_r and
    v_{r+1} for whole r): r rows fire on the sample, and about that fraction on fresh data.
    """
    z = (sample - sae.b_dec) @ sae.W_enc  # (m, n)
    m = z.shape[0]
    position = min(max(m * target_l0 / sae.n_features + 0.5, 1.0), float(m))  # 1-indexed rank
    lower = int(position)
    top = z.topk(min(lower + 1, m), dim=0).values  # (lower + 1, n), descending
    above, below = top[lower - 1], top[min(lower, m - 1)]
    cut = above + (position - lower) * (below - above)  # (n,)
    sae.b_enc.copy_(sae.firing_threshold() - cut)


@torch.no_grad()
def initialize_from_data(sae: SAE, sample: torch.Tensor) -> None:
    """b_dec from the sample, then (init="data") decoder rows from it, then bias calibration."""
    cfg = sae.cfg
    sample = sample.to(device=sae.W_dec.device, dtype=torch.float32)
    sae.b_dec.copy_(decoder_bias_from(sample, cfg.decoder_bias_init))
    if cfg.init == "data":
        g = _generator(cfg.seed, 1)
        m = sample.shape[0]
        # Without replacement while the sample is large enough, so no two features start equal.
        if m >= sae.n_features:
            chosen = torch.randperm(m, generator=g)[: sae.n_features]
        else:
            chosen = torch.randint(m, (sae.n_features,), generator=g)
        W_dec = _unit_rows(sample[chosen.to(sample.device)] - sae.b_dec) * sae.decoder_init_norm
        sae.W_dec.copy_(W_dec)  # (n, d)
        sae.W_enc.copy_(W_dec.T)
    if cfg.init_target_l0 > 0:
        calibrate_encoder_bias(sae, sample, cfg.init_target_l0)
