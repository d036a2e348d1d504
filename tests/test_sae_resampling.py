"""The paper's dead-feature resampling and the Adam state reset that goes with it."""

from __future__ import annotations

import torch

from framework.config import SAEConfig
from framework.sae import FEATURE_DIM, build_sae, resample_dead_features, reset_adam_state

D_IN, N_FEATURES = 16, 64


def _sae_with_adam_state():
    g = torch.Generator().manual_seed(0)
    sae = build_sae(D_IN, SAEConfig(variant="paper", n_features=N_FEATURES))
    sae.initialize_from_data(torch.randn(256, D_IN, generator=g))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        sae(torch.randn(128, D_IN, generator=g)).loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
        optimizer.zero_grad()
    return sae, optimizer


def _dead_mask() -> torch.Tensor:
    dead = torch.zeros(N_FEATURES, dtype=torch.bool)
    dead[[1, 5, 6, 40]] = True
    return dead


def _resample(sae, dead, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(500, D_IN, generator=g) * 3
    losses = torch.rand(500, generator=g)
    return resample_dead_features(sae, dead, inputs, losses, torch.Generator().manual_seed(seed)), inputs


def test_resampling_changes_only_dead_features():
    sae, _ = _sae_with_adam_state()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    dead = _dead_mask()
    _resample(sae, dead)
    after = sae.state_dict()
    assert torch.equal(after["W_dec"][~dead], before["W_dec"][~dead])
    assert torch.equal(after["W_enc"][:, ~dead], before["W_enc"][:, ~dead])
    assert torch.equal(after["b_enc"][~dead], before["b_enc"][~dead])
    assert torch.equal(after["b_dec"], before["b_dec"])
    assert not torch.equal(after["W_dec"][dead], before["W_dec"][dead])
    assert torch.all(after["b_enc"][dead] == 0)


def test_resampled_decoder_rows_are_chosen_inputs_at_unit_norm():
    sae, _ = _sae_with_adam_state()
    dead = _dead_mask()
    _, inputs = _resample(sae, dead)
    rows = sae.W_dec.detach()[dead]
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(4))
    cosine = rows @ (inputs / inputs.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cosine.max(1).values, torch.ones(4))


def test_resampled_encoder_columns_have_a_fifth_of_the_mean_alive_norm():
    sae, _ = _sae_with_adam_state()
    dead = _dead_mask()
    alive_norm = sae.W_enc.detach()[:, ~dead].norm(dim=0).mean()
    _resample(sae, dead)
    columns = sae.W_enc.detach()[:, dead]
    torch.testing.assert_close(columns.norm(dim=0), torch.full((4,), 0.2 * alive_norm.item()))
    torch.testing.assert_close(columns / columns.norm(dim=0), sae.W_dec.detach()[dead].T)


def test_resampling_resets_adam_state_of_modified_indices_only():
    sae, optimizer = _sae_with_adam_state()
    before = {
        name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in sae.named_parameters()
    }
    dead = _dead_mask()
    modified, _ = _resample(sae, dead)
    for name, index in modified.items():
        reset_adam_state(optimizer, getattr(sae, name), index, FEATURE_DIM[name])
    for name, p in sae.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            state, old = optimizer.state[p][key], before[name][key]
            if name not in modified:
                assert torch.equal(state, old)
                continue
            dim = FEATURE_DIM[name]
            assert torch.all(state.index_select(dim, dead.nonzero().squeeze(1)) == 0)
            kept = (~dead).nonzero().squeeze(1)
            assert torch.equal(state.index_select(dim, kept), old.index_select(dim, kept))


def test_resampling_draws_inputs_with_probability_proportional_to_squared_loss():
    sae = build_sae(4, SAEConfig(variant="paper", n_features=4000))
    inputs = torch.eye(4)  # input i is recognisable from the decoder row it becomes
    losses = torch.tensor([1.0, 2.0, 3.0, 0.0])
    resample_dead_features(
        sae, torch.ones(4000, dtype=torch.bool), inputs, losses, torch.Generator().manual_seed(0)
    )
    counts = torch.bincount(sae.W_dec.detach().argmax(1), minlength=4).float()
    expected = 4000 * torch.tensor([1.0, 4.0, 9.0, 0.0]) / 14
    assert counts[3] == 0
    assert torch.all((counts - expected).abs() < 4 * expected.clamp_min(1).sqrt())  # within 4 sigma


def test_resampling_with_no_dead_features_changes_nothing():
    sae, _ = _sae_with_adam_state()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    modified, _ = _resample(sae, torch.zeros(N_FEATURES, dtype=torch.bool))
    assert modified == {}
    assert all(torch.equal(v, before[k]) for k, v in sae.state_dict().items())


def test_an_all_zero_input_is_never_drawn_and_no_loss_anywhere_resamples_nothing():
    """An all-zero input (every neuron silent on a token) has a loss (the reconstruction's) but no
    direction: drawn, its decoder row became 0, the next renormalisation 0/0, and the run stopped
    on non-finite weights naming a step, not resampling."""
    sae = build_sae(4, SAEConfig(variant="paper", n_features=400))
    inputs = torch.cat([torch.zeros(1, 4), torch.eye(4)[:1]])
    resample_dead_features(sae, torch.ones(400, dtype=torch.bool), inputs, torch.tensor([100.0, 1.0]),
                           torch.Generator().manual_seed(0))
    assert torch.equal(sae.W_dec.detach(), torch.eye(4)[:1].expand(400, 4))
    sae.after_optimizer_step()
    assert torch.isfinite(sae.W_dec).all()

    before = {k: v.clone() for k, v in sae.state_dict().items()}
    assert resample_dead_features(sae, torch.ones(400, dtype=torch.bool), inputs, torch.zeros(2)) == {}
    assert all(torch.equal(v, before[k]) for k, v in sae.state_dict().items())
