"""Every variant recovers a known sparse dictionary from synthetic data.

Ground truth: 512 random unit directions in 64 dimensions; each sample combines 3 to 5 of them
with exponential(1) magnitudes and is scaled to norm 2 (as activations are normalised before
training; with heavy-tailed sample norms BatchTopK spends its budget on the largest rows).
A direction counts as recovered when some decoder row has cosine ≥ 0.9 with it.
"""

from __future__ import annotations

import pytest
import torch

from framework.config import SAEConfig
from framework.sae import build_sae

N_TRUE, D_IN, N_FEATURES, BATCH, STEPS = 512, 64, 1024, 512, 200

RECIPES = {
    "paper": dict(l1_coefficient=1e-2),
    "april2024": dict(l1_coefficient=1e-2),
    "topk": dict(k=4),
    "batchtopk": dict(k=4),
    "jumprelu": dict(l0_coefficient=1e-2, jumprelu_threshold=0.1, jumprelu_bandwidth=0.05),
    "gated": dict(l1_coefficient=1e-2),
}


def _dictionary(g: torch.Generator) -> torch.Tensor:
    directions = torch.randn(N_TRUE, D_IN, generator=g)
    return directions / directions.norm(dim=1, keepdim=True)  # (N_TRUE, D_IN)


def _samples(directions: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(N_TRUE, (size, 5), generator=g)  # (size, 5)
    magnitudes = torch.empty(size, 5).exponential_(generator=g)
    magnitudes[:, 3:] *= torch.rand(size, 2, generator=g) < 0.5  # 3 to 5 active
    x = torch.nn.functional.embedding_bag(idx, directions, per_sample_weights=magnitudes, mode="sum")
    return 2 * x / x.norm(dim=1, keepdim=True)  # (size, D_IN)


def _recovered_fraction(W_dec: torch.Tensor, directions: torch.Tensor) -> float:
    rows = W_dec / W_dec.norm(dim=1, keepdim=True)
    return ((directions @ rows.T).max(1).values >= 0.9).float().mean().item()


@pytest.mark.parametrize("variant", list(RECIPES))
def test_variant_recovers_ground_truth_directions(variant):
    g = torch.Generator().manual_seed(12345)  # not the SAE's seed: its draws must not coincide
    directions = _dictionary(g)
    cfg = SAEConfig(variant=variant, n_features=N_FEATURES, init="data", init_target_l0=4, **RECIPES[variant])
    sae = build_sae(D_IN, cfg)
    sae.initialize_from_data(_samples(directions, 8192, g))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(STEPS):
        sae(_samples(directions, BATCH, g), step).loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
    assert _recovered_fraction(sae.W_dec.detach(), directions) >= 0.9
