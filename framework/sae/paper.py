"""The paper's SAE ("Towards Monosemanticity", Bricken et al. 2023), and the ReLU SAE it shares
with the April 2024 update.

    x̄ = x - b_dec                      (batch, d)
    f = ReLU(x̄ W_enc + b_enc)           (batch, n)
    x̂ = f W_dec + b_dec                 (batch, d)
    L = mean((x - x̂)²) + λ · mean_batch Σ_j f_j·w_j

"mse" averages over every element (batch and d), as the paper's "mean over the batch of the
squared error averaged over elements"; the L1 term sums over features and averages over the
batch. The paper's weights w_j are 1 and its decoder rows stay unit norm: the gradient component
along each row is removed before the optimizer step and the rows are renormalised after.

`forward` takes the fast path (kernels.py): the dense fused Function while codes are dense, the
sparse one once the previous step's density fell below `sparse_density_threshold`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framework.config import SAEConfig
from framework.memory import HostCopy
from framework.sae.base import SAE, SAEOutput
from framework.sae.init import initialize_weights
from framework.sae.kernels import (
    DENSE_PATH_BUFFERS,
    SPARSE_PATH_BUFFERS,
    Workspace,
    compute_dtype,
    dense_pre_activations,
    normalize_rows_,
    order_keys,
    relu_autoencoder,
    remove_parallel_component_,
)

# Below this fraction of nonzero codes the sparse path beats the dense one, by device and by the
# dtype the GEMMs run in. CPU (2 cores, d_in 576, batch 4096; docs/sae-variants.md): float32 about
# 7% at n 4,096; bfloat16, whose GEMMs are ~4x faster while the sparse products are not, about 1.1%
# at n 4,096 and 0.8% at 16,384. CUDA (an H200, 2026-11-28, `bench/train_step.py --paths` at L0
# ~35): float32 dense faster at 0.85% density (n 4,096), sparse at 0.21% (16,384) and 0.055%
# (65,536, 2.5x); bfloat16 dense faster at all three, so only dictionaries larger than those
# measured take the sparse path (at L0 35, from about 175,000 features), which also spares them
# the dense path's (batch, n) tensors. Other accelerators use the CUDA table (unmeasured).
SPARSE_DENSITY_THRESHOLD = {
    "cpu": {torch.float64: 0.05, torch.float32: 0.05, torch.bfloat16: 0.01, torch.float16: 0.02},
    "cuda": {torch.float64: 0.004, torch.float32: 0.004, torch.bfloat16: 0.0002, torch.float16: 0.0002},
}


def density_threshold(device: torch.device, dtype: torch.dtype,
                      table: dict[str, dict[torch.dtype, float]] = SPARSE_DENSITY_THRESHOLD) -> float:
    """The density below which a ReLU SAE's step on `device`, with GEMMs in `dtype`, takes the
    sparse path."""
    return table["cpu" if device.type == "cpu" else "cuda"][dtype]


class ReLUSAE(SAE):
    """ReLU encoder, linear decoder, weighted L1 penalty; subclasses say how L1 is weighted."""

    sparse_density_threshold: dict[str, dict[torch.dtype, float]] = SPARSE_DENSITY_THRESHOLD

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__(d_in, cfg)
        initialize_weights(self)
        self._workspace = Workspace()
        # Which fast path the next forward takes (`sparse_codes`): None until the first forward,
        # which looks at its pre-activations before choosing; then from each forward's count of
        # nonzero codes, read at the next forward (_pending_density).
        self._sparse_codes: bool | None = None
        self._pending_density: tuple[HostCopy, float] | None = None

    def l1_weight(self) -> Tensor:
        """(n,) weight of each feature's activation in the L1 penalty."""
        raise NotImplementedError

    def l1_coefficient(self, step: int) -> float:
        return self.cfg.l1_coefficient

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activations(x))  # (batch, n)

    @property
    def sparse_codes(self) -> bool | None:
        """Whether the next forward takes the sparse path: the last forward's codes were sparser
        than `sparse_density_threshold` (None before the first forward)."""
        if self._pending_density is not None:
            (nnz,), bound = self._pending_density[0].values(), self._pending_density[1]
            self._pending_density = None
            self._sparse_codes = nnz < bound
            self._workspace.release(*(DENSE_PATH_BUFFERS if self._sparse_codes else SPARSE_PATH_BUFFERS))
        return self._sparse_codes

    @sparse_codes.setter
    def sparse_codes(self, sparse: bool | None) -> None:
        self._sparse_codes, self._pending_density = sparse, None

    def __getstate__(self) -> dict:
        _ = self.sparse_codes  # read a count still on its way: its CUDA event cannot be copied or pickled
        return super().__getstate__()

    def forward(self, x: Tensor, step: int = 0) -> SAEOutput:
        threshold = density_threshold(x.device, compute_dtype(x, self.W_enc), self.sparse_density_threshold)
        sparse = self.sparse_codes
        if sparse is None:
            sparse = self.sparse_codes = self._density(x) < threshold
        x_hat, l1_sum, features, fire_counts = relu_autoencoder(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.l1_weight(),
            sparse=sparse, ws=self._workspace if self.training else None,
        )  # fmt: skip
        batch, nnz = x.shape[0], fire_counts.sum()
        # The next forward's path, read there: reading it now (.item()) would make the host wait
        # for this forward's kernels before it can queue the backward (on a GPU, a stall per step).
        self._pending_density = (HostCopy(nnz), threshold * batch * self.n_features)
        losses = self._losses(x, x_hat, l1_sum / batch, nnz / batch, step)
        if isinstance(features, Tensor):
            return SAEOutput(x_hat, features, losses, fire_counts=fire_counts)
        return SAEOutput(x_hat, losses=losses, sparse_features=features, fire_counts=fire_counts)

    @torch.no_grad()
    def _density(self, x: Tensor) -> float:
        """The fraction of x's codes that are nonzero, for the first forward's choice of path:
        a dense step at 131,072 features and batch 4,096 would hold three (batch, n) tensors
        (6 GiB in float32) that the sparse path never needs."""
        pre = dense_pre_activations(x, self.W_enc, self.b_enc, self.b_dec, compute_dtype(x, self.W_enc), None)
        return torch.gt(order_keys(pre), 0).sum().item() / pre.numel()

    def forward_reference(self, x: Tensor, step: int = 0) -> SAEOutput:
        f = self.encode(x)  # (batch, n)
        x_hat = self.decode(f)  # (batch, d)
        l1 = (f.float() * self.l1_weight()).sum(-1).mean()
        l0 = (f > 0).sum(-1).float().mean()
        return SAEOutput(x_hat, f, self._losses(x, x_hat, l1, l0, step))

    def _losses(self, x: Tensor, x_hat: Tensor, l1: Tensor, l0: Tensor, step: int) -> dict[str, Tensor]:
        mse = (x_hat.float() - x.float()).pow(2).mean()
        loss = mse + self.l1_coefficient(step) * l1
        return {"loss": loss, "mse": mse, "l1": l1, "l0": l0.detach().float()}


class PaperSAE(ReLUSAE):
    variant = "paper"
    # forward_static exists. (The April 2024 update's L1 coefficient warms up with the step, a
    # host number that a recorded graph would freeze.)
    graph_safe = True

    def forward_static(self, x: Tensor, with_auxk: bool = False) -> tuple[Tensor, dict, Tensor]:
        """The dense path of `forward` (the sparse one has a data-dependent number of codes) with
        no workspace buffer, as a recorded graph must own all its memory; no AuxK here."""
        x_hat, l1_sum, _, fire_counts = relu_autoencoder(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.l1_weight(), sparse=False, ws=None)
        batch = x.shape[0]
        return x_hat, self._losses(x, x_hat, l1_sum / batch, fire_counts.sum() / batch, 0), fire_counts

    def l1_weight(self) -> Tensor:
        return self.b_enc.new_ones(self.n_features).detach()

    def before_optimizer_step(self) -> None:
        if self.W_dec.grad is not None:
            remove_parallel_component_(self.W_dec.grad, self.W_dec, self._workspace)

    def after_optimizer_step(self) -> None:
        normalize_rows_(self.W_dec)
