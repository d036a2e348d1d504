"""TopK SAEs with the AuxK loss (Gao et al. 2024, OpenAI) and BatchTopK (Bussmann et al. 2024).

    z = (x - b_dec) W_enc + b_enc                          (batch, n)
    f = ReLU(TopK_k(z))            topk: the k largest of each row
    f = ReLU(TopK_{k·batch}(z))    batchtopk: the k·batch largest of the whole batch
    x̂ = f W_dec + b_dec
    L = mean((x - x̂)²) + aux_k_coefficient · AuxK

AuxK keeps latents from dying: a latent is dead once it has not fired for `dead_steps_threshold`
training steps; the residual e = x - x̂ (no gradient) is reconstructed from the `aux_k` largest
dead pre-activations of each row, ê = ReLU(TopK_aux_k(z_dead)) W_dec, and
AuxK = Σ‖e - ê‖² / Σ‖e‖² (0 while no latent is dead). The steps-since-fired count is the
`steps_since_fired` buffer, advanced by every forward in training mode with gradients on.

BatchTopK lets the number of active latents vary per token; at inference (eval mode) it uses a
global threshold instead, f = z·1[z > θ], with θ the running mean of each training batch's
smallest kept positive activation (a plain mean over the first 100 batches, then an
exponential moving average with rate 1/100): the `threshold` buffer.

Decoder rows are kept unit norm with the paper's gradient projection, as OpenAI does. `forward`
is always sparse after the encoder GEMM (kernels.py): O(batch·k·d) beyond it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framework.config import SAEConfig
from framework.sae.base import SAE, SAEOutput
from framework.sae.init import initialize_weights
from framework.sae.kernels import (
    ActivePattern,
    Workspace,
    batch_topk_flat,
    compute_dtype,
    decode_at,
    dense_pre_activations,
    encode_at,
    normalize_rows_,
    remove_parallel_component_,
    row_topk_indices,
    topk_pattern,
)


def normalized_mse(estimate: Tensor, target: Tensor) -> Tensor:
    return (estimate.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


class TopKSAE(SAE):
    variant = "topk"

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__(d_in, cfg)
        self.register_buffer("steps_since_fired", torch.zeros(cfg.n_features, dtype=torch.long))
        initialize_weights(self)
        self._workspace = Workspace()
        # A host-side upper bound on steps_since_fired.max() (dead_latents); None: unknown. Code
        # that writes the counts other than by training forwards calls silent_counts_changed().
        self._silent_bound: int | None = None

    # -- selection: which pre-activations are kept (overridden by BatchTopK) -------------------

    def select(self, pre: Tensor, ws: Workspace | None) -> tuple[ActivePattern, Tensor]:
        """The kept positions of pre (batch, n) and their values, batch-major."""
        return topk_pattern(pre, self.cfg.k, self.n_features)

    def select_reference(self, pre: Tensor) -> Tensor:
        """pre with everything not kept set to 0, before the ReLU. (batch, n)"""
        values, idx = pre.topk(self.cfg.k, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, values)

    def record_selection(self, kept_values: Tensor) -> None:
        """Hook for statistics of the kept values (BatchTopK's threshold)."""

    # -- the two paths -------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.select_reference(self.pre_activations(x)))  # (batch, n)

    def forward(self, x: Tensor, step: int = 0) -> SAEOutput:
        ws = self._workspace if self.training else None
        pre = dense_pre_activations(x, self.W_enc, self.b_enc, self.b_dec, compute_dtype(x, self.W_enc), ws)
        pattern, pre_values = self.select(pre, ws)
        values = torch.relu(encode_at(x, self.W_enc, self.b_enc, self.b_dec, pre_values, pattern, ws))  # (nnz,)
        x_hat = decode_at(values, self.W_dec, pattern, ws) + self.b_dec  # (batch, d)
        auxk = self._auxk_fast(x, x_hat, pre)
        self.record_selection(values.detach())
        fire_counts, active = self._count_fires(pattern, values)
        l0 = active.sum() / x.shape[0]
        return SAEOutput(x_hat, losses=self._losses(x, x_hat, auxk, l0), sparse_features=pattern.features(values),
                         fire_counts=fire_counts)

    def forward_reference(self, x: Tensor, step: int = 0) -> SAEOutput:
        pre = self.pre_activations(x)  # (batch, n)
        f = torch.relu(self.select_reference(pre))  # (batch, n)
        x_hat = self.decode(f)  # (batch, d)
        auxk = self._auxk_reference(x, x_hat, pre)
        self.record_selection(f.detach()[f.detach() > 0])
        self._track_firing((f > 0).any(0).nonzero().squeeze(1))
        l0 = (f > 0).sum(-1).float().mean()
        return SAEOutput(x_hat, f, self._losses(x, x_hat, auxk, l0))

    def _losses(self, x: Tensor, x_hat: Tensor, auxk: Tensor, l0: Tensor) -> dict[str, Tensor]:
        mse = (x_hat.float() - x.float()).pow(2).mean()
        loss = mse + self.cfg.aux_k_coefficient * auxk
        return {"loss": loss, "mse": mse, "auxk": auxk.detach(), "l0": l0.detach().float()}

    # -- dead latents and AuxK -----------------------------------------------------------------

    def _counting(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def dead_mask(self) -> Tensor:
        return self.steps_since_fired >= self.cfg.dead_steps_threshold  # (n,) bool

    def dead_latents(self) -> Tensor | None:
        """The dead latents' indices (ascending), or None when there are none, reading the device
        only when a latent may be dead. Called once before each training forward (AuxK's work
        depends on the answer).

        On a GPU a read is a host sync: the host waits for the queued kernels instead of queueing
        the next step's. But a silent-step count grows by at most 1 per training step (this SAE's
        own count and the data-parallel one SAEModule copies over it alike; both restart at 0 on
        firing), so one read of the largest count M rules out a dead latent for the next
        dead_steps_threshold - M - 1 steps without reading: with latents firing every few steps,
        one read per ~dead_steps_threshold steps instead of one per step. While latents are dead,
        one read per step, as the indices need anyway."""
        if self._silent_bound is not None:
            self._silent_bound += 1  # the training forward since the last call
            if self._silent_bound < self.cfg.dead_steps_threshold:
                return None
        self._silent_bound, dead = self._read_silent_counts()
        return dead if dead.numel() else None

    def _read_silent_counts(self) -> tuple[int, Tensor]:
        """The largest silent-step count and the dead latents' indices: one host sync on a GPU
        (the max is queued before the nonzero, so reading it after the nonzero's sync waits for
        nothing more)."""
        largest = self.steps_since_fired.max()
        dead = self.dead_mask().nonzero().squeeze(1)
        return int(largest), dead

    def silent_counts_changed(self) -> None:
        """Say that steps_since_fired was written other than by training forwards (a resumed
        state, a test): dead_latents reads it afresh next time."""
        self._silent_bound = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.silent_counts_changed()  # loaded counts (a resumed run) may be anything
        super()._load_from_state_dict(*args, **kwargs)

    def _count_fires(self, pattern: ActivePattern, values: Tensor) -> tuple[Tensor, Tensor]:
        """(n,) int64: on how many rows each feature fired, and the (nnz,) mask of the codes that
        did; the silent-step counts advance. With index_add, no boolean index: a host sync less
        on a GPU (two with the bincount SAEOutput.fire_counts would do), none at all when recorded."""
        active = values.detach() > 0
        counts = torch.zeros(self.n_features, dtype=torch.long, device=values.device)
        counts.index_add_(0, pattern.cols, active.long())
        if self._counting():
            self.steps_since_fired.add_(1).masked_fill_(counts > 0, 0)
        return counts, active

    def _track_firing(self, fired: Tensor) -> None:
        """Advance the silent-step counts; `fired` lists the features that fired (repeats allowed)."""
        if self._counting():
            self.steps_since_fired.add_(1).index_fill_(0, fired.long(), 0)
            self.silent_counts_changed()  # a step dead_latents did not see

    def _auxk_fast(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor:
        dead = self.dead_latents() if self._counting() else None
        if dead is None:
            return x_hat.new_zeros((), dtype=torch.float32)
        k_aux = min(self.cfg.aux_k, dead.numel())
        residual = (x.float() - x_hat.float()).detach()
        if self._auxk_dense_pays(k_aux, dead.numel()):
            return normalized_mse(self._auxk_dense(x, pre, dead, k_aux), residual)
        pattern, pre_values = topk_pattern(pre.index_select(1, dead), k_aux, self.n_features, dead)
        values = torch.relu(encode_at(x, self.W_enc, self.b_enc, self.b_dec, pre_values, pattern))
        e_hat = decode_at(values, self.W_dec, pattern)  # (batch, d)
        return normalized_mse(e_hat, residual)

    # The AuxK codes (batch, n_dead) hold k_aux of each row's n_dead dead latents. With aux_k
    # 256 against k 32 their sparse products carry 8x the main path's nonzeros, in float32 (CPU
    # sparse kernels have no bfloat16). Dense GEMMs over the dead columns alone cost
    # batch x d x n_dead each, so they pay while the dead latents are few. A/B at 16,384
    # features on 2 CPU cores, whole training step: 5% dead (codes 31% dense) bf16 590 -> 363 ms,
    # fp32 885 -> 692 ms (232 / 496 ms with none dead); 1% dead bf16 465 -> 300 ms; 30% dead (5%
    # dense) dense was slower than sparse (bf16 834 against 722 ms), so the sparse path stays there.
    _AUXK_DENSE_FROM = 1 / 8

    @staticmethod
    def _auxk_dense_pays(k_aux: int, n_dead: int) -> bool:
        return k_aux / n_dead >= TopKSAE._AUXK_DENSE_FROM

    def _auxk_dense(self, x: Tensor, pre: Tensor, dead: Tensor, k_aux: int) -> Tensor:
        """ê = ReLU(TopK_k_aux(z_dead)) W_dec[dead] with dense products over the dead columns:
        the same selection (from the no-grad pre-activations) and the same gradients as the
        sparse path, for the dead latents' encoder columns, biases and decoder rows. (batch, d)"""
        with torch.no_grad():
            pre_dead = pre.index_select(1, dead)  # (batch, n_dead)
            keep = torch.zeros_like(pre_dead).scatter_(1, row_topk_indices(pre_dead, k_aux), 1)
        # addmm, so that under autocast the bias joins the 16-bit GEMM instead of promoting the
        # (batch, n_dead) result to float32
        z = torch.addmm(self.b_enc.index_select(0, dead), x - self.b_dec, self.W_enc.index_select(1, dead))
        f = torch.relu(z) * keep.to(z.dtype)  # (batch, n_dead)
        return f @ self.W_dec.index_select(0, dead)  # (batch, d)

    def _auxk_reference(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor:
        dead = self.dead_mask() if self._counting() else None
        if dead is None or not dead.any():
            return x_hat.new_zeros((), dtype=torch.float32)
        k_aux = min(self.cfg.aux_k, int(dead.sum()))
        values, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)  # (batch, k_aux)
        z = torch.zeros_like(pre).scatter(1, idx, torch.relu(values))  # (batch, n)
        e_hat = z @ self.W_dec  # (batch, d)
        return normalized_mse(e_hat, (x.float() - x_hat.float()).detach())

    # -- the same forward with static shapes, for CUDA graphs (train.cuda_graphs) --------------

    graph_safe = True  # forward_static exists (BatchTopK's selection size depends on the data)

    def auxk_needed(self) -> bool:
        return self.dead_latents() is not None  # reads the device only when a latent may be dead

    def forward_static(self, x: Tensor, with_auxk: bool) -> tuple[Tensor, dict, Tensor]:
        """`forward` in training, with no host synchronisation and no tensor whose shape depends
        on the data, so that it can be recorded as a CUDA graph and replayed: (x_hat, losses,
        fire_counts). `with_auxk`: whether any latent is dead, which the caller reads
        before the step (one graph per answer). The same codes, losses and gradients as `forward`
        (tests/test_sae_fast_paths.py); what differs is how the AuxK latents are picked: among all
        columns with the live ones masked. No workspace buffer: a recorded graph must own all its
        memory (an eager forward of another shape or dtype would replace a shared buffer under it)."""
        pre = dense_pre_activations(x, self.W_enc, self.b_enc, self.b_dec, compute_dtype(x, self.W_enc), None)
        pattern, pre_values = topk_pattern(pre, self.cfg.k, self.n_features)
        values = torch.relu(encode_at(x, self.W_enc, self.b_enc, self.b_dec, pre_values, pattern))  # (nnz,)
        x_hat = decode_at(values, self.W_dec, pattern) + self.b_dec  # (batch, d)
        auxk = self._auxk_static(x, x_hat, pre) if with_auxk else x_hat.new_zeros((), dtype=torch.float32)
        fire_counts, active = self._count_fires(pattern, values)
        return x_hat, self._losses(x, x_hat, auxk, active.sum() / x.shape[0]), fire_counts

    def _auxk_static(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor:
        """AuxK with shapes that do not depend on how many latents are dead: each row's aux_k
        largest pre-activations with the live latents' set to -inf. Where fewer than aux_k are
        dead the surplus picks are live latents, whose codes are multiplied by 0 (no value, no
        gradient): the selection of _auxk_reference."""
        dead = self.dead_mask()  # (n,) bool
        with torch.no_grad():
            masked = pre.masked_fill(~dead, float("-inf"))  # floats, not order_keys: see there
            idx = masked.topk(min(self.cfg.aux_k, self.n_features), dim=1, sorted=False).indices
            idx = idx.sort(dim=1).values  # (batch, aux_k), rows ascending as CSR wants
            pre_values = pre.gather(1, idx).reshape(-1)
            is_dead = dead[idx].reshape(-1).float()  # (batch·aux_k,)
            pattern = ActivePattern.from_topk(idx.int(), self.n_features)
        values = torch.relu(encode_at(x, self.W_enc, self.b_enc, self.b_dec, pre_values, pattern)) * is_dead
        e_hat = decode_at(values, self.W_dec, pattern)  # (batch, d)
        return normalized_mse(e_hat, (x.float() - x_hat.float()).detach())

    # -- decoder constraint (as the paper) -----------------------------------------------------

    def before_optimizer_step(self) -> None:
        if self.W_dec.grad is not None:
            remove_parallel_component_(self.W_dec.grad, self.W_dec, self._workspace)

    def after_optimizer_step(self) -> None:
        normalize_rows_(self.W_dec)


class BatchTopKSAE(TopKSAE):
    variant = "batchtopk"
    graph_safe = False
    threshold_warmup = 100  # batches averaged plainly before the moving average takes over

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__(d_in, cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def select(self, pre: Tensor, ws: Workspace | None) -> tuple[ActivePattern, Tensor]:
        if self.training:
            flat = batch_topk_flat(pre, self.cfg.k * pre.shape[0], ws)
        else:
            flat = (pre > self.threshold.clamp_min(0)).view(-1).nonzero().squeeze(1)
        return ActivePattern.from_flat(flat, tuple(pre.shape)), pre.view(-1)[flat]

    def select_reference(self, pre: Tensor) -> Tensor:
        if not self.training:
            return pre * (pre > self.threshold.clamp_min(0))
        values, idx = pre.flatten().topk(self.cfg.k * pre.shape[0])
        return torch.zeros_like(pre).flatten().scatter(0, idx, values).view_as(pre)

    def record_selection(self, kept_values: Tensor) -> None:
        positive = kept_values[kept_values > 0]
        if not self._counting() or positive.numel() == 0:
            return
        with torch.no_grad():
            self.threshold_updates += 1
            rate = 1 / min(int(self.threshold_updates), self.threshold_warmup)
            self.threshold += rate * (positive.min().float() - self.threshold)
