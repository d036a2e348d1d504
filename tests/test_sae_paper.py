"""The paper's SAE mechanics: unit-norm decoder rows kept by gradient projection and renorm."""

from __future__ import annotations

import torch

from framework.config import SAEConfig
from framework.sae import build_sae
from framework.sae.kernels import remove_parallel_component_


def _trained_paper_sae(steps: int):
    g = torch.Generator().manual_seed(0)
    sae = build_sae(32, SAEConfig(variant="paper", n_features=128, l1_coefficient=1e-2))
    sae.initialize_from_data(torch.randn(512, 32, generator=g))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(steps):
        sae(torch.randn(256, 32, generator=g), step).loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
        optimizer.zero_grad()
    return sae


def test_paper_decoder_rows_have_unit_norm_after_optimizer_steps():
    sae = _trained_paper_sae(steps=5)
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_paper_decoder_rows_start_at_unit_norm():
    sae = build_sae(32, SAEConfig(variant="paper", n_features=128))
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_before_optimizer_step_removes_gradient_component_parallel_to_decoder_rows():
    sae = build_sae(32, SAEConfig(variant="paper", n_features=128))
    sae(torch.randn(256, 32)).loss.backward()
    grad = sae.W_dec.grad.clone()
    sae.before_optimizer_step()
    W = sae.W_dec.detach()
    parallel = (grad * W).sum(1, keepdim=True) * W  # rows are unit norm
    torch.testing.assert_close(sae.W_dec.grad, grad - parallel)
    torch.testing.assert_close((sae.W_dec.grad * W).sum(1), torch.zeros(128), atol=1e-6, rtol=0)


def test_parallel_component_removal_holds_for_rows_that_are_not_unit_norm():
    W = torch.randn(16, 8) * 3
    grad = torch.randn(16, 8)
    remove_parallel_component_(grad, W)
    torch.testing.assert_close((grad * W).sum(1), torch.zeros(16), atol=1e-5, rtol=0)


def test_paper_loss_is_mse_over_elements_plus_l1_summed_over_features():
    sae = build_sae(8, SAEConfig(variant="paper", n_features=16, l1_coefficient=0.5))
    x = torch.randn(4, 8)
    out = sae.forward_reference(x)
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    mse = ((f @ sae.W_dec + sae.b_dec - x) ** 2).mean()
    l1 = f.abs().sum(1).mean()
    torch.testing.assert_close(out.losses["mse"], mse)
    torch.testing.assert_close(out.losses["l1"], l1)
    torch.testing.assert_close(out.loss, mse + 0.5 * l1)
    torch.testing.assert_close(out.losses["l0"], (f > 0).sum(1).float().mean())
