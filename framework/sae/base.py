"""The one SAE interface every variant implements (plain torch: no Lightning, no I/O).

Weights use SAELens's layout so export is a rename, not a transpose:
    W_enc (d_in, n_features)   b_enc (n_features,)
    W_dec (n_features, d_in)   b_dec (d_in,)
A "decoder column" in the paper's words is a row of W_dec here. Every variant encodes
x - b_dec (SAELens's `apply_b_dec_to_input=True`).

The training loop only ever calls:
    sae.initialize_from_data(sample)   # once, before training: b_dec, decoder from data, biases
    out = sae(x, step)                 # SAEOutput: reconstruction, features, losses["loss"]
    out.loss.backward()
    sae.before_optimizer_step()        # e.g. the paper's removal of the parallel gradient
    optimizer.step()
    sae.after_optimizer_step()         # e.g. the paper's decoder renormalisation
so strategies and callbacks never ask which variant they hold.

`forward` takes each variant's fast path where it has one (see kernels.py); `forward_reference`
is the same math written plainly with autograd, which the tests hold the fast path to.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from framework.config import SAEConfig
from framework.sae import init


class SparseFeatures(NamedTuple):
    """A batch's nonzero feature activations, batch-major (rows ascending)."""

    rows: torch.Tensor  # (nnz,) integer
    cols: torch.Tensor  # (nnz,) integer
    values: torch.Tensor  # (nnz,)
    shape: tuple[int, int]  # (batch, n_features)

    def to_dense(self) -> torch.Tensor:
        dense = self.values.new_zeros(self.shape)  # (batch, n_features)
        dense[self.rows, self.cols] = self.values
        return dense


class SAEOutput:
    """What a forward pass returns. Fast paths keep features sparse and detached; `features`
    densifies on first use, so a training step that never looks at it never pays for it."""

    def __init__(
        self,
        reconstruction: torch.Tensor,  # (batch, d_in)
        features: torch.Tensor | None = None,  # (batch, n_features), post-nonlinearity
        losses: dict[str, torch.Tensor] | None = None,  # "loss" is the total
        *,
        sparse_features: SparseFeatures | None = None,
        fire_counts: torch.Tensor | None = None,  # (n_features,), when the forward had them
    ):
        if features is not None and sparse_features is not None:
            raise ValueError("give at most one of features and sparse_features")
        if features is None and sparse_features is None and fire_counts is None:
            raise ValueError("an output without features needs fire_counts")
        self.reconstruction = reconstruction
        self.losses = losses if losses is not None else {}
        self.sparse_features = sparse_features
        self._features = features
        self._fire_counts = fire_counts

    @property
    def features(self) -> torch.Tensor:
        if self._features is None:
            if self.sparse_features is None:
                raise RuntimeError("this output kept no features (a CUDA-graphed training step keeps "
                                   "only the losses and firing counts); run the SAE eagerly to see them")
            self._features = self.sparse_features.to_dense()
        return self._features

    @property
    def loss(self) -> torch.Tensor:
        return self.losses["loss"]

    def fire_counts(self) -> torch.Tensor:
        """(n_features,) int64: on how many rows of the batch each feature is nonzero."""
        if self._fire_counts is not None:
            return self._fire_counts
        if self.sparse_features is not None:
            s = self.sparse_features
            return torch.bincount(s.cols[s.values != 0], minlength=s.shape[1])
        return torch.count_nonzero(self._features.detach(), dim=0)


class SAE(nn.Module):
    variant: str = "base"
    graph_safe: bool = False  # has forward_static, for CUDA graphs (train.cuda_graphs)
    decoder_init_norm: float = 1.0  # norm of each W_dec row at initialisation

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.d_in = d_in
        self.n_features = cfg.n_features
        self.W_enc = nn.Parameter(torch.empty(d_in, cfg.n_features))
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_features))
        self.W_dec = nn.Parameter(torch.empty(cfg.n_features, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        # (x - b_dec) @ W_enc + b_enc: (batch, d) @ (d, n) -> (batch, n). One addmm, so that
        # under autocast it rounds exactly as the fast paths' GEMM and both select the same codes.
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.W_dec + self.b_dec  # (batch, n) @ (n, d) -> (batch, d)

    def forward(self, x: torch.Tensor, step: int = 0) -> SAEOutput:
        return self.forward_reference(x, step)

    def forward_reference(self, x: torch.Tensor, step: int = 0) -> SAEOutput:
        raise NotImplementedError

    # -- for CUDA graphs (train.cuda_graphs), where graph_safe ---------------------------------

    def forward_static(self, x: torch.Tensor, with_auxk: bool) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """`forward` in training with no host synchronisation and no tensor whose shape depends on
        the data, so that it can be recorded as a CUDA graph: (x_hat, losses as `forward`'s,
        fire_counts). `with_auxk`: what `auxk_needed` answered before the step."""
        raise NotImplementedError(f"a {self.variant} SAE has no static forward")

    def auxk_needed(self) -> bool:
        """Whether the next training step has an AuxK term (dead latents, for the variants with
        AuxK): asked once before each recorded step, which needs one graph per answer."""
        return False

    def firing_threshold(self) -> torch.Tensor | float:
        """The pre-activation above which a feature counts as firing (for bias calibration)."""
        return 0.0

    def before_optimizer_step(self) -> None:
        """Adjust gradients after backward (default: nothing)."""

    def after_optimizer_step(self) -> None:
        """Re-impose weight constraints after the optimizer step (default: nothing)."""

    @torch.no_grad()
    def initialize_from_data(self, sample: torch.Tensor, first: int = 0, total: int | None = None) -> None:
        """Data-dependent initialisation from a sample of activations (rows, d_in), as the
        recipe's `init`, `decoder_bias_init` and `init_target_l0` say (see init.py); `first` and
        `total` when this SAE is a slice of a larger dictionary's features."""
        init.initialize_from_data(self, sample, first, total)
