"""Initialisation: on a small budget, where the weights start decides what the features become.

A CPU run sees about a million activations where the paper's saw billions (docs/training.md,
"Initialisation that learns on a small budget"). With the paper's Kaiming init and zero encoder
bias about half the features fire on every token at step 0, and the L1 penalty spends the run
shrinking them; with decoder rows drawn from the data, the encoder tied to them, and each encoder
bias set so its feature fires on about init_target_l0 / n_features of the tokens, the run starts
at its target sparsity and the features move within minutes.

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

Random weights are drawn in blocks of INIT_BLOCK features, each from its own generator, so a rank
that holds features [first, first + n) of a larger dictionary (train.strategy=feature_sharded)
draws only the blocks it overlaps and gets exactly the rows the whole dictionary would have,
whatever the number of shards. Block 0's generator is the one every SAE of up to INIT_BLOCK
features has always used, so those start as they always did.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from framework.sae.base import SAE


INIT_BLOCK = 16_384  # features per independently seeded block of random weights


CALIBRATION_ROWS = 16_384  # sample rows for b_dec and the encoder-bias calibration


def _generator(seed: int, purpose: int, block: int = 0) -> torch.Generator:
    # One stream per purpose, so adding a draw to one never shifts another.
    if block == 0:
        return torch.Generator().manual_seed(seed * 1_000_003 + purpose)
    digest = hashlib.sha256(f"sae-init/{seed}/{purpose}/{block}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _kaiming_bound(fan_in: int) -> float:
    # nn.init.kaiming_uniform_(a=sqrt(5)), the nn.Linear default, computed the same way.
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def initialize_weights(sae: SAE, first: int = 0, total: int | None = None) -> None:
    """Data-independent weights, from cfg.init and cfg.seed (called at construction).

    `sae` holds features [first, first + sae.n_features) of a dictionary of `total` features
    (default: all of them); it gets exactly those rows of the whole dictionary's init."""
    if sae.W_enc.is_meta:  # built without storage; its owner initialises the real slices
        return
    cfg, n, d = sae.cfg, sae.n_features, sae.d_in
    total = n if total is None else total
    if cfg.init not in ("kaiming", "transpose", "data"):
        raise ValueError(f"sae.init={cfg.init!r} is not one of kaiming, transpose, data")
    for block in range(first // INIT_BLOCK, (first + n - 1) // INIT_BLOCK + 1):
        start = block * INIT_BLOCK
        size = min(INIT_BLOCK, total - start)
        W_enc, W_dec = _draw_block(cfg.init, size, d, total, _generator(cfg.seed, 0, block))
        W_dec = _unit_rows(W_dec) * sae.decoder_init_norm
        W_enc = W_dec if W_enc is None else W_enc
        lo, hi = max(first, start), min(first + n, start + size)  # the part of the block held
        sae.W_enc[:, lo - first : hi - first] = W_enc[lo - start : hi - start].T
        sae.W_dec[lo - first : hi - first] = W_dec[lo - start : hi - start]


def _draw_block(init: str, size: int, d: int, total: int, g: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One block's (size, d) encoder rows (None: tied to the decoder's) and (size, d) decoder
    rows before their normalisation."""
    if init == "kaiming":
        # nn.Linear(d, total) and nn.Linear(total, d) weights, one block of features of each.
        W_enc = torch.empty(size, d).uniform_(-_kaiming_bound(d), _kaiming_bound(d), generator=g)
        W_dec = torch.empty(d, size).uniform_(-_kaiming_bound(total), _kaiming_bound(total), generator=g).T
        return W_enc, W_dec
    return None, torch.randn(size, d, generator=g)  # transpose / data: W_enc = W_decᵀ


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
def calibrate_encoder_bias(sae: SAE, sample: torch.Tensor, target_l0: float, total: int | None = None) -> None:
    """Set b_enc so each feature fires on about target_l0 / total of the sample's rows (`total`:
    the whole dictionary's features, of which `sae` may hold a slice; each bias depends only on
    its own feature's column).

    For feature j, with its pre-activations (without bias) sorted descending v_1 ≥ v_2 ≥ …, the
    bias puts the firing threshold at rank r + ½, r = rows·target_l0/n_features (between v_r and
    v_{r+1} for whole r): r rows fire on the sample, and about that fraction on fresh data.
    """
    z = (sample - sae.b_dec) @ sae.W_enc  # (m, n)
    m = z.shape[0]
    total = sae.n_features if total is None else total
    position = min(max(m * target_l0 / total + 0.5, 1.0), float(m))  # 1-indexed rank
    lower = int(position)
    top = z.topk(min(lower + 1, m), dim=0).values  # (lower + 1, n), descending
    above, below = top[lower - 1], top[min(lower, m - 1)]
    cut = above + (position - lower) * (below - above)  # (n,)
    sae.b_enc.copy_(sae.firing_threshold() - cut)


@torch.no_grad()
def initialize_from_data(sae: SAE, sample: torch.Tensor, first: int = 0, total: int | None = None) -> None:
    """b_dec from the sample, then (init="data") decoder rows from it, then bias calibration.

    As in initialize_weights, `sae` may hold features [first, first + n) of `total`: it draws the
    whole dictionary's choice of rows (an index per feature) and keeps its own. Each row is drawn
    at most once: features past the sample's rows keep their random directions from construction
    (drawn with replacement, features given the same row started identical and, with identical
    gradients and Adam states, stayed identical for the whole run). b_dec and the calibration
    read the first CALIBRATION_ROWS rows (the calibration's pre-activations are rows x features);
    a larger sample only serves to give every feature a row of its own."""
    cfg, n = sae.cfg, sae.n_features
    total = n if total is None else total
    sample = sample.to(device=sae.W_dec.device, dtype=torch.float32)
    calibration = sample[:CALIBRATION_ROWS]
    sae.b_dec.copy_(decoder_bias_from(calibration, cfg.decoder_bias_init))
    if cfg.init == "data":
        # From the sample's first max(CALIBRATION_ROWS, total) rows: an SAE's start depends on its
        # own size only, not on the largest dictionary of the bank that sized the sample.
        pool = min(sample.shape[0], max(CALIBRATION_ROWS, total))
        chosen = torch.randperm(pool, generator=_generator(cfg.seed, 1))[:total]
        held = chosen[first : first + n]  # this slice's features that get a row: the first len(held)
        W_dec = _unit_rows(sample[held.to(sample.device)] - sae.b_dec) * sae.decoder_init_norm
        sae.W_dec[: len(held)] = W_dec  # (len(held), d)
        sae.W_enc[:, : len(held)] = W_dec.T
    if cfg.init_target_l0 > 0:
        calibrate_encoder_bias(sae, calibration, cfg.init_target_l0, total)
