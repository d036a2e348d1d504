"""Initialisation recipes: kaiming, transpose, data; decoder bias; encoder bias calibration."""

from __future__ import annotations

import math

import pytest
import torch

from framework.config import SAEConfig
from framework.sae import build_sae
from framework.sae.init import geometric_median


def _sample(rows: int = 4096, d: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g) * torch.linspace(0.5, 2, d) + 1.0


@pytest.mark.parametrize("init", ["kaiming", "transpose", "data"])
@pytest.mark.parametrize("variant", ["paper", "topk", "jumprelu", "gated"])
def test_init_target_l0_calibration_gives_target_l0_at_step_zero(variant, init):
    cfg = SAEConfig(variant=variant, n_features=512, init=init, init_target_l0=20, k=512)
    sae = build_sae(32, cfg)
    sae.initialize_from_data(_sample(seed=0))
    with torch.no_grad():
        l0 = (sae.encode(_sample(seed=1)) > 0).sum(1).float().mean().item()  # fresh rows
    assert 16 <= l0 <= 24


def test_zero_encoder_bias_fires_about_half_the_features_at_step_zero():
    sae = build_sae(32, SAEConfig(variant="paper", n_features=512, init="transpose"))
    sae.initialize_from_data(_sample())
    l0 = (sae.encode(_sample(seed=1)) > 0).sum(1).float().mean().item()
    assert 150 <= l0 <= 360


@pytest.mark.parametrize("init", ["kaiming", "transpose", "data"])
def test_initialisation_is_deterministic_given_seed(init):
    def build(seed):
        sae = build_sae(32, SAEConfig(n_features=64, init=init, init_target_l0=4, seed=seed))
        sae.initialize_from_data(_sample())
        return sae.state_dict()

    first, again, other = build(3), build(3), build(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["W_dec"], other["W_dec"])


def test_kaiming_init_is_untied_pytorch_default_with_unit_decoder_rows():
    sae = build_sae(32, SAEConfig(n_features=64, init="kaiming"))
    assert sae.W_enc.abs().max() <= 1 / math.sqrt(32)  # nn.Linear(32, 64)'s bound
    assert not torch.allclose(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.all(sae.b_enc == 0)


def test_transpose_init_ties_encoder_to_unit_decoder_rows():
    sae = build_sae(32, SAEConfig(n_features=64, init="transpose"))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_data_init_uses_sample_rows_minus_decoder_bias_at_unit_norm():
    sample = _sample(rows=256)
    sae = build_sae(32, SAEConfig(n_features=64, init="data", decoder_bias_init="mean"))
    sae.initialize_from_data(sample)
    centred = sample - sample.mean(0)
    centred = centred / centred.norm(dim=1, keepdim=True)
    best = (sae.W_dec.detach() @ centred.T).max(1).values  # each row is one of the sample rows
    torch.testing.assert_close(best, torch.ones(64))
    assert len({tuple(row.tolist()) for row in sae.W_dec.detach()}) == 64  # drawn without replacement
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


def test_april2024_decoder_rows_start_at_norm_one_tenth_with_tied_encoder():
    sae = build_sae(32, SAEConfig(variant="april2024", n_features=64, init="transpose"))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((64,), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


@pytest.mark.parametrize("how", ["mean", "zeros", "geometric_median"])
def test_decoder_bias_init(how):
    sample = _sample()
    sae = build_sae(32, SAEConfig(n_features=64, decoder_bias_init=how))
    sae.initialize_from_data(sample)
    expected = {
        "mean": sample.mean(0),
        "zeros": torch.zeros(32),
        "geometric_median": geometric_median(sample),
    }
    torch.testing.assert_close(sae.b_dec.detach(), expected[how].float(), atol=1e-5, rtol=1e-5)


def test_geometric_median_matches_brute_force_minimum():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(40, 2, generator=g), torch.tensor([[30.0, 30.0], [25.0, -20.0]])])
    median = geometric_median(points)

    def total_distance(y):
        return (points.double() - y).norm(dim=-1).sum(-1)

    axis = torch.linspace(-1, 1, 401, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).view(-1, 1, 2)  # (401², 1, 2)
    best = grid[total_distance(grid).argmin()].view(2)
    assert (median - best).norm() < 0.01
    assert total_distance(median) <= total_distance(grid).min() + 1e-9


def test_geometric_median_ignores_outliers_that_move_the_mean():
    points = torch.cat([torch.zeros(99, 3), torch.full((1, 3), 1000.0)])
    assert geometric_median(points).norm() < 1e-3
