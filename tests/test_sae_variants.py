"""Variant-specific behaviour: the losses, buffers and schedules each variant adds."""

from __future__ import annotations

import pytest
import torch

from framework.config import SAEConfig
from framework.sae import VARIANTS, SAEOutput, build_sae
from framework.sae.base import SparseFeatures


def test_build_sae_builds_every_variant_with_the_shared_weight_layout():
    for name, cls in VARIANTS.items():
        sae = build_sae(24, SAEConfig(variant=name, n_features=40))
        assert isinstance(sae, cls) and sae.variant == name
        assert sae.W_enc.shape == (24, 40) and sae.W_dec.shape == (40, 24)
        assert sae.b_enc.shape == (40,) and sae.b_dec.shape == (24,)


def test_build_sae_names_the_allowed_variants_for_an_unknown_one():
    with pytest.raises(ValueError, match="paper, april2024, topk"):
        build_sae(8, SAEConfig(variant="relu2"))


def test_sparse_output_densifies_features_on_demand_and_counts_firing():
    sparse = SparseFeatures(
        torch.tensor([0, 0, 2]), torch.tensor([1, 3, 1]), torch.tensor([1.0, 0.0, 2.0]), (3, 4)
    )
    out = SAEOutput(torch.zeros(3, 2), sparse_features=sparse)
    dense = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    assert torch.equal(out.features, dense)
    assert torch.equal(out.fire_counts(), torch.tensor([0, 2, 0, 0]))
    assert torch.equal(SAEOutput(torch.zeros(3, 2), dense).fire_counts(), torch.tensor([0, 2, 0, 0]))


# -- TopK / BatchTopK ----------------------------------------------------------------------------


def _topk(variant="topk", **overrides):
    cfg = SAEConfig(variant=variant, n_features=64, k=4, init="data", **overrides)
    sae = build_sae(16, cfg)
    sae.initialize_from_data(torch.randn(256, 16, generator=torch.Generator().manual_seed(0)))
    return sae


def test_topk_keeps_k_features_per_row():
    out = _topk()(torch.randn(32, 16))
    assert torch.all((out.features > 0).sum(1) <= 4)
    assert out.losses["l0"] == (out.features > 0).sum(1).float().mean()


def test_topk_counts_training_steps_since_each_latent_fired():
    sae = _topk()
    x = torch.randn(32, 16)
    for _ in range(3):
        out = sae(x)
    fired = out.fire_counts() > 0
    assert torch.all(sae.steps_since_fired[fired] == 0)
    assert torch.all(sae.steps_since_fired[~fired] >= 1)
    silent_throughout = sae.steps_since_fired == 3
    assert silent_throughout.any()


def test_topk_does_not_count_steps_in_eval_mode_or_without_gradients():
    sae = _topk()
    sae.eval()
    sae(torch.randn(32, 16))
    sae.train()
    with torch.no_grad():
        sae(torch.randn(32, 16))
    assert torch.all(sae.steps_since_fired == 0)


def test_auxk_loss_is_zero_until_latents_are_dead():
    sae = _topk(dead_steps_threshold=2, aux_k=8)
    x = torch.randn(32, 16)
    assert sae(x).losses["auxk"] == 0
    assert sae(x).losses["auxk"] == 0  # silent latents have now been silent for 2 steps
    out = sae(x)
    assert out.losses["auxk"] > 0
    torch.testing.assert_close(out.loss, out.losses["mse"] + out.losses["auxk"] / 32)


def test_auxk_loss_trains_dead_latents():
    sae = _topk(dead_steps_threshold=1, aux_k=8)
    x = torch.randn(32, 16)
    sae(x)
    dead = sae.dead_mask()
    out = sae(x)
    (out.loss - out.losses["mse"]).backward()
    assert sae.W_dec.grad[dead].abs().sum() > 0


def test_batchtopk_keeps_k_times_batch_activations_over_the_whole_batch():
    sae = _topk("batchtopk")
    x = torch.randn(32, 16) * torch.linspace(0.1, 3, 32).unsqueeze(1)  # rows of very different norms
    fired = sae(x).features > 0
    assert fired.sum() <= 4 * 32
    assert fired.sum(1).max() > 4  # large rows take more than k


def test_batchtopk_threshold_is_running_mean_of_smallest_kept_activation():
    sae = _topk("batchtopk")
    minima = []
    for seed in range(3):
        f = sae(torch.randn(32, 16, generator=torch.Generator().manual_seed(seed))).features
        minima.append(f[f > 0].min())
    torch.testing.assert_close(sae.threshold, torch.stack(minima).mean())


def test_batchtopk_uses_its_threshold_at_inference():
    sae = _topk("batchtopk")
    sae.threshold.fill_(0.3)
    sae.eval()
    x = torch.randn(32, 16)
    pre = sae.pre_activations(x)
    expected = torch.where(pre > 0.3, pre, torch.zeros_like(pre))
    torch.testing.assert_close(sae(x).features, expected.detach())


def test_topk_decoder_rows_stay_unit_norm():
    sae = _topk()
    optimizer = torch.optim.Adam(sae.parameters(), lr=0.1)
    sae(torch.randn(32, 16)).loss.backward()
    sae.before_optimizer_step()
    optimizer.step()
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


# -- April 2024 ------------------------------------------------------------------------------------


def test_april2024_l1_coefficient_ramps_linearly_over_warmup():
    sae = build_sae(8, SAEConfig(variant="april2024", n_features=16, l1_coefficient=0.4, l1_warmup_steps=100))
    assert [sae.l1_coefficient(s) for s in (0, 25, 100, 500)] == [0.0, 0.1, 0.4, 0.4]
    x = torch.randn(4, 8)
    out = sae(x, step=50)
    torch.testing.assert_close(out.loss, out.losses["mse"] + 0.2 * out.losses["l1"])


def test_april2024_l1_is_weighted_by_decoder_row_norms():
    sae = build_sae(8, SAEConfig(variant="april2024", n_features=16))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(1, 5, 16).unsqueeze(1))
    x = torch.randn(4, 8)
    f = sae.encode(x)
    expected = (f * sae.W_dec.norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(sae(x).losses["l1"], expected)


def test_april2024_decoder_is_unconstrained():
    sae = build_sae(8, SAEConfig(variant="april2024", n_features=16))
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae(torch.randn(4, 8)).loss.backward()
    grad = sae.W_dec.grad.clone()
    sae.before_optimizer_step()
    sae.after_optimizer_step()
    assert torch.equal(sae.W_dec.grad, grad)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((16,), 0.3))


# -- JumpReLU -------------------------------------------------------------------------------------


def _jumprelu(l0_coefficient: float):
    cfg = SAEConfig(variant="jumprelu", n_features=3, jumprelu_threshold=0.5, jumprelu_bandwidth=0.2,
                    l0_coefficient=l0_coefficient, decoder_bias_init="zeros")  # fmt: skip
    sae = build_sae(1, cfg)
    with torch.no_grad():
        sae.W_enc.fill_(1.0)  # z_j = x for every feature
        sae.W_dec.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
    return sae


def test_jumprelu_fires_above_threshold_only():
    sae = _jumprelu(0.0)
    f = sae(torch.tensor([[0.4], [0.6]])).features
    assert torch.equal(f, torch.tensor([[0.0, 0.0, 0.0], [0.6, 0.6, 0.6]]))


def test_jumprelu_l0_gradient_reaches_threshold_through_rectangle_kernel_only():
    sae = _jumprelu(l0_coefficient=1.0)
    with torch.no_grad():
        sae.W_dec.zero_()  # leave only the L0 term with a gradient
    sae(torch.tensor([[0.55], [0.7]])).loss.backward()  # 0.55 inside the window |z - θ| < 0.1
    # d(mean_batch L0)/dlogθ = θ · (1/batch) · Σ_i -(1/ε) K: one row of two in the window.
    torch.testing.assert_close(sae.log_threshold.grad, torch.full((3,), 0.5 * -(1 / 0.2) / 2))
    assert torch.all(sae.W_enc.grad == 0) and torch.all(sae.b_enc.grad == 0)


def test_jumprelu_reconstruction_gradient_reaches_threshold_through_the_jump():
    sae = _jumprelu(l0_coefficient=0.0)
    x = torch.tensor([[0.55]])
    out = sae(x)
    out.loss.backward()
    grad_f = 2 * (out.reconstruction - x) @ sae.W_dec.detach().T  # (1, 3), mse over one element
    expected = 0.5 * -(0.5 / 0.2) * grad_f.squeeze(0)  # θ · (-(θ/ε) K) · dL/df
    torch.testing.assert_close(sae.log_threshold.grad, expected)


# -- Gated ---------------------------------------------------------------------------------------


def _gated():
    sae = build_sae(16, SAEConfig(variant="gated", n_features=64, init="data", init_target_l0=8))
    sae.initialize_from_data(torch.randn(512, 16, generator=torch.Generator().manual_seed(0)))
    return sae


def test_gated_starts_as_the_relu_sae_of_its_gate():
    sae = _gated()
    x = torch.randn(32, 16)
    torch.testing.assert_close(sae.encode(x), torch.relu(sae.pre_activations(x)))


def test_gated_auxiliary_loss_does_not_train_the_decoder():
    sae = _gated()
    sae(torch.randn(32, 16)).losses["aux"].backward()
    assert sae.W_dec.grad is None
    assert sae.W_enc.grad.abs().sum() > 0


def test_gated_l1_penalty_acts_on_the_gate_path_only():
    sae = _gated()
    sae(torch.randn(32, 16)).losses["l1"].backward()
    assert sae.r_mag.grad is None and sae.b_mag.grad is None
    assert sae.b_enc.grad.abs().sum() > 0
