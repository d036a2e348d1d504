"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

    z = (x - b_dec) W_enc + b_enc            (batch, n)
    f = z · H(z - θ),   θ = exp(log_threshold)  per feature
    x̂ = f W_dec + b_dec
    L = mean((x - x̂)²) + l0_coefficient · mean_batch Σ_j H(z_j - θ_j)

H has no useful gradient, so θ learns through straight-through estimators with a rectangle
kernel K(u) = 1[|u| < ½] of bandwidth ε = `jumprelu_bandwidth`:
    ∂f/∂θ ≈ -(θ/ε) K((z - θ)/ε)        ∂H/∂θ ≈ -(1/ε) K((z - θ)/ε)
while z gets the exact ∂f/∂z = H(z - θ) and nothing from the L0 term. θ starts at
`jumprelu_threshold`. The decoder is unconstrained: an L0 penalty cannot be lowered by shrinking
f and growing W_dec, so there is nothing for a norm constraint to prevent.

The threshold comparison runs in float32 even under autocast: with ε = 1e-3 the window is finer
than bfloat16's resolution near 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from framework.config import SAEConfig
from framework.sae.base import SAE, SAEOutput
from framework.sae.init import initialize_weights


def _window(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return ((z - threshold).abs() < bandwidth / 2).to(z.dtype)  # K((z - θ)/ε), (batch, n)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.bandwidth = bandwidth
        ctx.save_for_backward(z, threshold)
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        grad_z = grad * (z > threshold)
        grad_threshold = -(threshold / ctx.bandwidth) * (_window(z, threshold, ctx.bandwidth) * grad).sum(0)
        return grad_z, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.bandwidth = bandwidth
        ctx.save_for_backward(z, threshold)
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        grad_threshold = -(1 / ctx.bandwidth) * (_window(z, threshold, ctx.bandwidth) * grad).sum(0)
        return None, grad_threshold, None


class JumpReLUSAE(SAE):
    variant = "jumprelu"

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__(d_in, cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.n_features,), math.log(cfg.jumprelu_threshold)))
        initialize_weights(self)

    def threshold(self) -> Tensor:
        return self.log_threshold.exp()  # (n,)

    def firing_threshold(self) -> Tensor:
        return self.threshold().detach()

    def encode(self, x: Tensor) -> Tensor:
        z = self.pre_activations(x).float()
        return _JumpReLU.apply(z, self.threshold(), self.cfg.jumprelu_bandwidth)  # (batch, n)

    def forward_reference(self, x: Tensor, step: int = 0) -> SAEOutput:
        z = self.pre_activations(x).float()  # (batch, n)
        theta = self.threshold()
        f = _JumpReLU.apply(z, theta, self.cfg.jumprelu_bandwidth)
        x_hat = self.decode(f)  # (batch, d)
        mse = (x_hat.float() - x.float()).pow(2).mean()
        l0 = _Step.apply(z, theta, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        loss = mse + self.cfg.l0_coefficient * l0
        return SAEOutput(x_hat, f, {"loss": loss, "mse": mse, "l0": l0.detach()})
