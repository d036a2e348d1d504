"""Metrics that need only an SAE and activations: reconstruction, sparsity, density."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def evaluate_sae(sae, batches: list[torch.Tensor], sum_over_features=None) -> dict[str, float]:
    """MSE, FVU, L0, L1 and the features never seen firing, over batches of SAE inputs.

    FVU is the squared error over the total variance around the batches' own mean, so it is 1
    for the best constant reconstruction and 0 for a perfect one. `sum_over_features` sums the
    per-feature tallies over the ranks that each hold a slice of the features (feature
    sharding); with whole SAEs there is nothing to sum.
    """
    was_training = sae.training
    sae.eval()  # BatchTopK selects per batch in training and by its learned threshold in use
    try:
        return _evaluate(sae, batches, sum_over_features)
    finally:
        sae.train(was_training)


def in_activation_units(metrics: dict[str, float], input_scale: float) -> dict[str, float]:
    """`evaluate_sae`'s metrics of an SAE that sees x * input_scale, with the MSE in the
    activations' own units: so it does not depend on train.normalize_activations, training's
    held-out MSE and `sae eval`'s agree, and an SAE scores the same after `sae export` (which
    folds the scale into the weights) and a re-import through eval.sae_path. The rest is
    scale-free (FVU, L0) or in the SAE's own units (L1)."""
    return {**metrics, "mse": metrics["mse"] / input_scale**2}


def _evaluate(sae, batches: list[torch.Tensor], sum_over_features) -> dict[str, float]:
    sq_err = total_var = 0.0
    tallies = torch.zeros(3, dtype=torch.float64, device=batches[0].device)  # active, Σ|f|, never fired
    fired = None
    mean = torch.cat(batches).float().mean(0)
    for x in batches:
        out = sae(x)
        sq_err += (out.reconstruction.float() - x.float()).pow(2).sum().item()
        total_var += (x.float() - mean).pow(2).sum().item()
        active = out.features > 0
        tallies[0] += active.sum()
        tallies[1] += out.features.float().abs().sum()
        fired = active.any(0) if fired is None else fired | active.any(0)
    tallies[2] = (~fired).sum()
    if sum_over_features is not None:
        tallies = sum_over_features(tallies)
    rows = sum(x.shape[0] for x in batches)
    return {
        "mse": sq_err / (rows * batches[0].shape[1]),
        "fvu": sq_err / max(total_var, 1e-12),
        "l0": tallies[0].item() / rows,
        "l1": tallies[1].item() / rows,
        "dead_fraction_heldout": tallies[2].item() / sae.n_features,
    }


class DensityCounter:
    """Per-feature firing counts over a stream of feature activations, memory O(n_features)."""

    def __init__(self, n_features: int):
        self.fires = torch.zeros(n_features, dtype=torch.float64)
        self.rows = 0

    def update(self, features: torch.Tensor) -> None:
        self.fires += (features > 0).sum(0).double().cpu()
        self.rows += features.shape[0]

    def density(self) -> torch.Tensor:
        return self.fires / max(self.rows, 1)


def density_summary(density: torch.Tensor) -> dict[str, float]:
    """Dead / ultralow / dense fractions of features, from per-feature firing fractions.

    Thresholds follow the paper's plots: the "ultralow density cluster" sits near 1e-6..1e-5
    of tokens; features on more than 10% of tokens are dense.
    """
    alive = density[density > 0]
    return {
        "dead_fraction": (density == 0).float().mean().item(),
        "ultralow_fraction": ((density > 0) & (density < 1e-5)).float().mean().item(),
        "dense_fraction": (density > 0.1).float().mean().item(),
        "median_log10_density": torch.log10(alive).median().item() if len(alive) else -math.inf,
    }
