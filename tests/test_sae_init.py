"""Initialisation recipes: kaiming, transpose, data; decoder bias; encoder bias calibration."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from framework.config import SAEConfig
from framework.sae import build_sae
from framework.sae.init import INIT_BLOCK, geometric_median, initialize_weights


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


@pytest.mark.parametrize("first", [None, 0, 32, 48])
def test_data_init_with_fewer_rows_than_features_gives_each_row_once_and_the_rest_random_directions(first):
    """Drawn with replacement, features given the same row started identical (and the bias
    calibration too) and stayed identical: same gradients, same Adam states, and alive, so never
    resampled. Now each row serves one feature; the others keep their random directions. A slice
    (feature sharding) gets the whole dictionary's rows."""
    cfg = SAEConfig(n_features=64, init="data", decoder_bias_init="mean", init_target_l0=4)
    sample = _sample(rows=16)
    whole = build_sae(32, cfg)
    whole.initialize_from_data(sample)
    if first is None:
        centred = sample - sample.mean(0)
        from_data = (whole.W_dec.detach() @ (centred / centred.norm(dim=1, keepdim=True)).T).max(1).values
        torch.testing.assert_close(from_data[:16], torch.ones(16))  # the first 16 features: each a row
        assert (from_data[16:] < 0.99).all()  # the rest: random directions
        assert len({tuple(row.tolist()) for row in whole.W_dec.detach()}) == 64
        assert len({tuple(col.tolist()) for col in whole.W_enc.detach().T}) == 64
        torch.testing.assert_close(whole.W_enc, whole.W_dec.T)
        return
    part = build_sae(32, dataclasses.replace(cfg, n_features=16))
    initialize_weights(part, first, cfg.n_features)
    part.initialize_from_data(sample, first, cfg.n_features)
    for name in ("W_enc", "W_dec", "b_enc"):
        whole_part = getattr(whole, name)[..., first : first + 16] if name == "W_enc" else getattr(whole, name)[first : first + 16]
        assert torch.equal(getattr(part, name), whole_part), name


def test_a_sample_larger_than_the_calibration_rows_calibrates_on_its_first_rows(monkeypatch):
    """A sample with a row per feature can be larger than the calibration needs (its
    pre-activations are rows x features): b_dec and the biases read its first CALIBRATION_ROWS."""
    import framework.sae.init as init

    monkeypatch.setattr(init, "CALIBRATION_ROWS", 256)
    cfg = SAEConfig(n_features=512, init="data", init_target_l0=8)
    sample = _sample(rows=1024)
    sae, reference = build_sae(32, cfg), build_sae(32, cfg)
    sae.initialize_from_data(sample)
    reference.initialize_from_data(sample[:256])
    torch.testing.assert_close(sae.b_dec, reference.b_dec)
    assert len({tuple(row.tolist()) for row in sae.W_dec.detach()}) == 512  # 512 rows of the 1,024
    with torch.no_grad():
        reference.W_dec.copy_(sae.W_dec)
        reference.W_enc.copy_(sae.W_enc)
    init.calibrate_encoder_bias(reference, sample[:256], 8, 512)
    torch.testing.assert_close(sae.b_enc, reference.b_enc)


def test_an_sae_starts_the_same_whatever_else_its_bank_holds():
    """The init sample holds a row per feature of the bank's largest dictionary: a small SAE
    chose its rows from all of it, and so started otherwise beside a large one (a bank sweep
    against the same point run alone)."""
    cfg = SAEConfig(n_features=512, init="data", init_target_l0=8)
    big_sample = _sample(rows=20_000)
    alone, in_bank = build_sae(32, cfg), build_sae(32, cfg)
    alone.initialize_from_data(big_sample[:16_384])
    in_bank.initialize_from_data(big_sample)
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), in_bank.state_dict().values()))


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


# ---- slices of a dictionary (feature sharding draws only the features a rank holds) -----------


def _whole_and_slice(cfg: SAEConfig, d: int, first: int, n: int):
    whole = build_sae(d, cfg)
    part = build_sae(d, dataclasses.replace(cfg, n_features=n))
    initialize_weights(part, first, cfg.n_features)
    return whole, part


@pytest.mark.parametrize("init", ["kaiming", "transpose"])
@pytest.mark.parametrize("variant", ["paper", "april2024"])
def test_a_slice_draws_exactly_the_whole_dictionarys_rows_across_init_blocks(variant, init):
    # 3 blocks (the last one short); slices that start mid-block, straddle a boundary, end the dictionary.
    cfg = SAEConfig(variant=variant, n_features=2 * INIT_BLOCK + 1000, init=init, seed=11)
    for first, n in [(0, 1000), (INIT_BLOCK - 300, 600), (5000, 2 * INIT_BLOCK - 4000), (2 * INIT_BLOCK, 1000)]:
        whole, part = _whole_and_slice(cfg, 8, first, n)
        assert torch.equal(part.W_enc, whole.W_enc[:, first : first + n]), (first, n)
        assert torch.equal(part.W_dec, whole.W_dec[first : first + n]), (first, n)
    # Blocks are independent draws, not one stream cut in three.
    assert not torch.allclose(whole.W_dec[:1000], whole.W_dec[INIT_BLOCK : INIT_BLOCK + 1000])


@pytest.mark.parametrize("init", ["kaiming", "transpose"])
def test_a_dictionary_of_one_block_keeps_the_init_it_always_had(init):
    # Before blocks existed: one generator, nn.Linear's Kaiming-uniform for both matrices (kaiming),
    # or unit-norm Gaussian decoder rows with the encoder tied (transpose).
    n, d, seed = 3000, 24, 4
    g = torch.Generator().manual_seed(seed * 1_000_003)
    if init == "kaiming":
        W_enc = torch.nn.init.kaiming_uniform_(torch.empty(n, d), a=math.sqrt(5), generator=g).T
        W_dec = torch.nn.init.kaiming_uniform_(torch.empty(d, n), a=math.sqrt(5), generator=g).T
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    else:
        W_dec = torch.randn(n, d, generator=g)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.T
    sae = build_sae(d, SAEConfig(variant="paper", n_features=n, init=init, seed=seed))
    assert torch.equal(sae.W_enc, W_enc) and torch.equal(sae.W_dec, W_dec)


@pytest.mark.parametrize("variant", ["paper", "topk"])
def test_a_slice_gets_the_whole_dictionarys_data_init_and_bias_calibration(variant):
    cfg = SAEConfig(variant=variant, n_features=512, init="data", init_target_l0=20, k=32, seed=2)
    sample = _sample(rows=2048)  # more rows than features: decoder rows drawn without replacement
    whole = build_sae(32, cfg)
    whole.initialize_from_data(sample)
    for first in (0, 128, 384):
        part = build_sae(32, dataclasses.replace(cfg, n_features=128))
        initialize_weights(part, first, cfg.n_features)
        part.initialize_from_data(sample, first, cfg.n_features)
        for name in ("W_enc", "W_dec", "b_enc"):
            whole_part = getattr(whole, name)[..., first : first + 128] if name == "W_enc" else getattr(whole, name)[first : first + 128]
            assert torch.equal(getattr(part, name), whole_part), (first, name)
        assert torch.equal(part.b_dec, whole.b_dec)


def test_an_sae_built_on_the_meta_device_holds_no_storage_and_skips_its_init():
    with torch.device("meta"):
        sae = build_sae(4096, SAEConfig(variant="topk", n_features=1_048_576, k=32))
    assert all(p.is_meta for p in sae.parameters())
