"""strategy=feature_sharded: each rank of a feature group owns a contiguous slice of every SAE's
features -- its encoder columns W_enc[:, slice], biases b_enc[slice], decoder rows W_dec[slice],
their Adam moments and firing statistics -- and nothing else of the dictionary.

Why shard features, not data: an SAE's weights grow with n_features × d (a 1,048,576-feature
dictionary at d 4,096 is 32 GiB of fp32 weights, 128 GiB with gradients and Adam), while its
activations per row are only d wide. FSDP and ZeRO split the stored state but gather every
weight for the forward; here no rank ever holds more than its slice, and what crosses the wire
per step is (batch × d)-sized, independent of n_features:

    encode    local: pre = (x - b_dec) W_enc[:, slice] + b_enc[slice]        no collective
    select    TopK: each rank's top k per row, all-gathered (batch × k × shards values); every
              rank picks the same global top k and keeps the entries it owns. BatchTopK the
              same over the whole batch. ReLU: nothing to select.
    decode    each rank's partial Σ_{j in slice} f_j W_dec_j, all-reduced (SUM) into x̂. The
              backward of that all-reduce is the identity: every rank computes the same loss
              from the same x̂, so the gradient each receives for x̂ is already the gradient
              for its own partial. b_dec is added on shard 0 only, so the sum counts it once.
    loss      MSE on x̂ (the same on every rank); the L1 term of a ReLU SAE is a sum over
              features, so each rank differentiates its own slice's part and all-reduces only
              the value (two scalars) for logging.
    step      b_dec is replicated: its gradient from the encoder path differs per rank, so it
              is all-reduced (SUM) over the feature group before the step. The paper's decoder
              projection and renormalisation are row-wise, so they run on each rank's rows.

With data parallelism on top (a 2-D mesh: data_parallel × feature shards, Lightning's
ModelParallelStrategy with its "tensor_parallel" dimension as the feature group), ranks of one
feature group read the same rows, and each gradient is averaged over the data-parallel group
before the step (one flat all-reduce, as DDP would).

Resampling draws the same inputs as the unsharded SAE: every rank scores the sample with the
sharded forward and draws, with the same generator, one input per dead feature of the whole
dictionary, then keeps the draws of its own dead features (they are contiguous in feature
order); the mean alive-encoder norm is all-reduced. Checkpoints are torch.distributed.checkpoint
directories whose sharded tensors are saved as DTensor views of the slices, so they carry the
whole dictionary's shapes.

Supported variants: paper, april2024, topk, batchtopk. TopK's AuxK runs its own global top-k over
dead latents. The local SAE's silent-step counts come from SAEModule's statistics, which are
reduced across ranks every step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from framework.config import SAEConfig
from framework.errors import RecipeError
from framework.sae import FEATURE_DIM, BatchTopKSAE, SAEOutput, TopKSAE, build_sae, reset_adam_state
from framework.sae.init import initialize_weights
from framework.sae.kernels import (
    ActivePattern,
    Workspace,
    batch_topk_flat,
    compute_dtype,
    decode_at,
    dense_pre_activations,
    encode_at,
)
from framework.sae.resampling import resampling_weights
from framework.sae.topk import normalized_mse
from framework.training.layout import LOSS_CHUNK, ParameterLayout

SUPPORTED_VARIANTS = ("paper", "april2024", "topk", "batchtopk")
# Which dimension of each sharded tensor indexes features; every other tensor is replicated.
SAE_FEATURE_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "steps_since_fired": 0}
STATS_FEATURE_DIM = {"steps_since_fired": 0, "window_fires": 0}


def check_shardable(cfg: SAEConfig, shards: int) -> None:
    """Refuse, before any process starts training, an SAE this strategy cannot split."""
    if cfg.variant not in SUPPORTED_VARIANTS:
        raise RecipeError(
            f"train.strategy=feature_sharded supports sae.variant {', '.join(SUPPORTED_VARIANTS)}; "
            f"{cfg.variant!r} (SAE {cfg.name!r}) is not sharded yet: train it with strategy ddp, fsdp or deepspeed"
        )
    if cfg.n_features % shards:
        raise RecipeError(
            f"sae.n_features={cfg.n_features} (SAE {cfg.name!r}) does not split over {shards} feature shards; "
            f"use a multiple of {shards}, or set train.feature_shards"
        )


def _slice(t: Tensor, dim: int, start: int, length: int) -> Tensor:
    return t.narrow(dim, start, length).clone()


def _collective_device(group) -> torch.device:
    """Where a tensor must be for a collective on `group`: the current GPU under NCCL, else the host."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(t: Tensor, group) -> Tensor:
    """(shards, *t.shape): every rank's t, in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


class _SumOverShards(torch.autograd.Function):
    """all-reduce(SUM) forward, identity backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


@torch.no_grad()
def global_top(candidates: Tensor, k: int, group) -> tuple[Tensor, Tensor]:
    """Of every rank's candidates (rows, c) per row, the k largest: (row, position) of those
    this rank holds. Every rank selects from the same gathered values, so each winner is kept
    by exactly one rank. Pad a rank's candidates with -inf when it has fewer than c."""
    rows, c = candidates.shape
    pool = _all_gather(candidates, group).permute(1, 0, 2).reshape(rows, -1)  # (rows, shards · c)
    top = pool.topk(k, dim=1, sorted=False).indices  # (rows, k)
    mine = top // c == dist.get_rank(group)
    row = torch.arange(rows, device=candidates.device).unsqueeze(1).expand_as(top)[mine]
    return row, top[mine] % c


def _top_candidates(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's min(k, columns) largest scores, padded with -inf to k: (values, columns)."""
    values, columns = scores.topk(min(k, scores.shape[1]), dim=1, sorted=False)
    pad = k - values.shape[1]
    if pad:
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], dim=1)
    return values.float(), columns


class FeatureShardedSAE(nn.Module):
    """One rank's slice of an SAE's features, with the collectives that make it whole."""

    def __init__(self, whole, group, data_group):
        super().__init__()
        shards, shard = dist.get_world_size(group), dist.get_rank(group)
        check_shardable(whole.cfg, shards)
        self.group, self.data_group = group, data_group
        self.shard, self.n_shards = shard, shards
        self.cfg, self.d_in, self.n_features = whole.cfg, whole.d_in, whole.n_features
        self.n_local = whole.n_features // shards
        self.offset = shard * self.n_local
        self.local = build_sae(whole.d_in, dataclasses.replace(whole.cfg, n_features=self.n_local))
        if whole.W_enc.is_meta:  # the whole SAE was never materialised: draw this slice's init
            initialize_weights(self.local, self.offset, self.n_features)
        else:
            self.local.load_state_dict(self._my_slice(whole.state_dict()))
        self._workspace = Workspace()

    def initialize_from_data(self, sample: Tensor) -> None:
        """The whole SAE's data-dependent init, restricted to this slice (the sample is the same
        on every rank; b_dec comes out the same everywhere)."""
        self.local.initialize_from_data(sample, self.offset, self.n_features)

    def _my_slice(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {key: _slice(t, SAE_FEATURE_DIM[key], self.offset, self.n_local) if key in SAE_FEATURE_DIM else t
                for key, t in state.items()}

    @property
    def variant(self) -> str:
        return self.local.variant

    @property
    def steps_since_fired(self) -> Tensor | None:
        return getattr(self.local, "steps_since_fired", None)

    # ---- collectives ------------------------------------------------------------------------

    def _sum(self, t: Tensor) -> Tensor:
        """Value-only sum over the feature group (no gradient)."""
        total = t.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total

    def _reconstruct(self, partial: Tensor, with_bias: bool = True) -> Tensor:
        """x̂ from each rank's Σ_{j in slice} f_j W_dec_j (batch, d)."""
        if with_bias and self.shard == 0:
            partial = partial + self.local.b_dec
        return _SumOverShards.apply(partial, self.group)

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, x: Tensor, step: int = 0) -> SAEOutput:
        if isinstance(self.local, TopKSAE):
            return self._forward_topk(x)
        return self._forward_relu(x, step)

    def _forward_relu(self, x: Tensor, step: int) -> SAEOutput:
        out = self.local(x, step)  # this slice's codes, partial x̂ (+ b_dec), this slice's L1
        x_hat = self._reconstruct(out.reconstruction - self.local.b_dec)
        l1 = out.losses["l1"]
        l1_all, l0 = self._sum(torch.stack([l1.detach().float(), out.losses["l0"].float()]))
        mse = (x_hat.float() - x.float()).pow(2).mean()
        # Value: the whole dictionary's L1; gradient: this slice's (the others' is theirs).
        l1_total = l1 + (l1_all - l1.detach())
        loss = mse + self.local.l1_coefficient(step) * l1_total
        out.reconstruction = x_hat
        out.losses = {"loss": loss, "mse": mse, "l1": l1_total.detach(), "l0": l0}
        return out

    def _forward_topk(self, x: Tensor) -> SAEOutput:
        sae = self.local
        ws = self._workspace if self.training else None
        pre = dense_pre_activations(x, sae.W_enc, sae.b_enc, sae.b_dec, compute_dtype(x, sae.W_enc), ws)
        pattern, pre_values = self._select(pre, ws)  # (batch, n_local) pattern of kept codes
        values = torch.relu(encode_at(x, sae.W_enc, sae.b_enc, sae.b_dec, pre_values, pattern))  # (nnz,)
        x_hat = self._reconstruct(decode_at(values, sae.W_dec, pattern))  # (batch, d)
        auxk = self._auxk(x, x_hat, pre)
        self._record_selection(values.detach())
        l0 = self._sum((values.detach() > 0).sum().float() / x.shape[0])
        mse = (x_hat.float() - x.float()).pow(2).mean()
        loss = mse + self.cfg.aux_k_coefficient * auxk
        losses = {"loss": loss, "mse": mse, "auxk": auxk.detach(), "l0": l0}
        return SAEOutput(x_hat, losses=losses, sparse_features=pattern.features(values))

    @torch.no_grad()
    def _select(self, pre: Tensor, ws: Workspace | None) -> tuple[ActivePattern, Tensor]:
        """The global TopK (or BatchTopK) selection, as this rank's kept positions of pre."""
        sae, shape = self.local, tuple(pre.shape)
        if isinstance(sae, BatchTopKSAE):
            if not self.training:  # inference: the learned threshold, feature-local
                flat = (pre > sae.threshold.clamp_min(0)).view(-1).nonzero().squeeze(1)
                return ActivePattern.from_flat(flat, shape), pre.view(-1)[flat]
            total = sae.cfg.k * pre.shape[0]
            local = batch_topk_flat(pre, min(total, pre.numel()), ws)  # (c,) ascending flat indices
            candidates = pre.view(-1)[local].float().unsqueeze(0)  # (1, c)
            if candidates.shape[1] * self.n_shards < total:
                raise RecipeError(f"batchtopk k·batch={total} exceeds the batch's codes")
            _, position = global_top(candidates, total, self.group)
            flat = local[position].sort().values
        else:
            candidates, columns = _top_candidates(pre, sae.cfg.k)  # (batch, k)
            row, position = global_top(candidates, sae.cfg.k, self.group)
            flat = (row * self.n_local + columns[row, position]).sort().values
        return ActivePattern.from_flat(flat, shape), pre.view(-1)[flat]

    def _counting(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _record_selection(self, kept: Tensor) -> None:
        """BatchTopK's threshold statistic: the smallest kept positive code of the whole batch."""
        if not isinstance(self.local, BatchTopKSAE) or not self._counting():
            return
        positive = kept[kept > 0]
        low = positive.min().float() if positive.numel() else kept.new_tensor(float("inf"), dtype=torch.float32)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        if torch.isfinite(low):
            self.local.record_selection(low.view(1))

    def _auxk(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor:
        """AuxK over the dictionary's dead latents: a global top-aux_k, as the selection."""
        zero = x_hat.new_zeros((), dtype=torch.float32)
        if not self._counting():
            return zero
        sae = self.local
        dead = sae.dead_mask()  # (n_local,)
        n_dead = int(self._sum(dead.sum()))
        if n_dead == 0:
            return zero
        k_aux = min(sae.cfg.aux_k, n_dead)
        with torch.no_grad():
            candidates, columns = _top_candidates(pre.masked_fill(~dead, float("-inf")), k_aux)
            row, position = global_top(candidates, k_aux, self.group)
            flat = (row * self.n_local + columns[row, position]).sort().values
        pattern = ActivePattern.from_flat(flat, tuple(pre.shape))
        values = torch.relu(encode_at(x, sae.W_enc, sae.b_enc, sae.b_dec, pre.view(-1)[flat], pattern))
        e_hat = self._reconstruct(decode_at(values, sae.W_dec, pattern), with_bias=False)
        return normalized_mse(e_hat, (x.float() - x_hat.float()).detach())

    # ---- around the optimizer step ----------------------------------------------------------

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        params = [p for p in self.local.parameters() if p.grad is not None]
        if dist.get_world_size(self.data_group) > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, group=self.data_group)
            flat /= dist.get_world_size(self.data_group)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
        if self.local.b_dec.grad is not None:
            dist.all_reduce(self.local.b_dec.grad, group=self.group)
        self.local.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        self.local.after_optimizer_step()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> None:
        """Clip by the whole dictionary's gradient norm (b_dec, replicated, counted once)."""
        sharded = [p.grad for name, p in self.local.named_parameters() if name != "b_dec" and p.grad is not None]
        square = self._sum(sum(g.float().pow(2).sum() for g in sharded))
        if self.local.b_dec.grad is not None:
            square = square + self.local.b_dec.grad.float().pow(2).sum()
        scale = (max_norm / (square.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.local.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)

    # ---- resampling and evaluation ----------------------------------------------------------

    @torch.no_grad()
    def per_input_loss(self, x: Tensor) -> Tensor:
        out = self(x)
        mse = (out.reconstruction - x).pow(2).mean(1)
        sparsity = self._sum(out.features.abs().sum(1)) * float(getattr(self.cfg, "l1_coefficient", 0.0))
        return mse + sparsity

    @torch.no_grad()
    def resample(self, dead: Tensor, inputs: Tensor, generator: torch.Generator, optimizer) -> bool:
        """framework/sae/resampling.py's procedure, drawing for the whole dictionary at once;
        False where nothing was resampled (on every rank alike)."""
        local = self.local
        losses = torch.cat([self.per_input_loss(chunk) for chunk in inputs.split(LOSS_CHUNK)])
        counts = _all_gather(dead.sum().view(1), self.group).view(-1).tolist()  # dead per shard
        weights = resampling_weights(losses, inputs)  # the same on every rank: the whole inputs' losses
        if sum(counts) == 0 or not weights.any():
            return False
        chosen = torch.multinomial(weights, sum(counts), replacement=True, generator=generator)
        first = sum(counts[: self.shard])
        mine = chosen[first : first + counts[self.shard]].to(inputs.device)
        norms = torch.linalg.vector_norm(local.W_enc[:, ~dead], dim=0)
        alive = self._sum(torch.stack([norms.sum(), norms.new_tensor(float(norms.numel()))]))
        alive_norm = alive[0] / alive[1] if alive[1] > 0 else torch.ones((), device=inputs.device)
        index = dead.nonzero().squeeze(1)
        directions = inputs[mine].to(local.W_dec.dtype)  # (n_dead here, d)
        directions = directions / torch.linalg.vector_norm(directions, dim=1, keepdim=True).clamp_min(1e-12)
        local.W_dec[index] = directions
        local.W_enc[:, index] = (directions * 0.2 * alive_norm).T.to(local.W_enc.dtype)
        local.b_enc[index] = 0
        for name in ("W_enc", "W_dec", "b_enc"):
            reset_adam_state(optimizer, getattr(local, name), index, FEATURE_DIM[name])
        return True

    def evaluate(self, batches: list[Tensor]) -> dict[str, float]:
        """framework/evaluation/metrics.evaluate_sae, with the per-feature tallies summed."""
        from framework.evaluation.metrics import evaluate_sae

        return evaluate_sae(self, batches, self._sum)


def shard_features(module, mesh) -> None:
    """Replace each SAE of the bank (and its statistics) by this rank's slice of its features.

    The bank is normally built on the meta device (SAEModule(on_meta=True)): each rank then draws
    only its slice's init, and runs the data-dependent init (module.pending_init, the samples
    train.initialize left) on the slice, so no rank holds a whole dictionary while training."""
    from framework.training.module import FeatureStats

    data, features = mesh["data_parallel"].get_group(), mesh["tensor_parallel"].get_group()
    layout = FeatureShardedLayout(mesh)
    for name, whole in list(module.saes.items()):
        sharded = FeatureShardedSAE(whole, features, data)
        stats = FeatureStats(sharded.n_local)
        stats.load_state_dict({key: _slice(t, STATS_FEATURE_DIM[key], sharded.offset, sharded.n_local)
                               if key in STATS_FEATURE_DIM else t
                               for key, t in module.stats[name].state_dict().items()})
        module.saes[name], module.stats[name] = sharded, stats
        if module.pending_init is not None:
            sharded.initialize_from_data(module.pending_init.samples[name])
            W_dec = layout.gather_to_root(sharded.local.W_dec.detach(), SAE_FEATURE_DIM["W_dec"])
            if W_dec is not None:
                module.pending_init.save_decoder(name, W_dec)
    module.pending_init = None
    module.layout = layout


class FeatureShardedLayout(ParameterLayout):
    whole_tensors = False
    strategy_broadcasts_buffers = False

    def __init__(self, mesh):
        super().__init__(mesh["data_parallel"].get_group())
        self.mesh = mesh  # (data_parallel, tensor_parallel = feature shards)
        self.feature_group = mesh["tensor_parallel"].get_group()
        self.name = f"feature_sharded-{mesh['tensor_parallel'].size()}"

    def sum_over_features(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, group=self.feature_group)
        return t

    def gather_features(self, t: Tensor) -> Tensor:
        return torch.cat(list(_all_gather(t, self.feature_group)))

    def clip_grad_norm_(self, sae, max_norm: float) -> None:
        sae.clip_grad_norm_(max_norm)

    def resample(self, sae, dead: Tensor, inputs: Tensor, generator: torch.Generator, optimizer) -> bool:
        return sae.resample(dead, inputs, generator, optimizer)

    def evaluate(self, sae, batches: list[Tensor]) -> dict[str, float]:
        return sae.evaluate(batches)

    # ---- the whole dictionary: checkpoints (DTensor views) and export (gathered) -----------

    def feature_dims(self, module) -> dict[str, int]:
        """Which entries of module.state_dict() are feature-sharded, and along which dim."""
        dims = {}
        for name in module.saes:
            dims |= {f"saes.{name}.local.{key}": dim for key, dim in SAE_FEATURE_DIM.items()}
            dims |= {f"stats.{name}.{key}": dim for key, dim in STATS_FEATURE_DIM.items()}
        return dims

    def as_dtensor(self, t: Tensor, dim: int) -> DTensor:
        """This rank's slice as a view of the whole tensor (replicated over data parallelism)."""
        return DTensor.from_local(t, self.mesh, [Replicate(), Shard(dim)], run_check=False)

    def gather_to_root(self, t: Tensor, dim: int) -> Tensor | None:
        """The whole tensor from every shard's slice, on global rank 0 only (None elsewhere)."""
        if self.mesh["data_parallel"].get_local_rank() != 0:
            return None  # rank 0's feature group holds the same slices
        is_root = self.mesh["tensor_parallel"].get_local_rank() == 0
        # NCCL gathers CUDA tensors only: the slices are still on the host while configure_model
        # draws them (the initial decoder), on the GPU afterwards.
        t = t.to(_collective_device(self.feature_group)).contiguous()
        parts = [torch.empty_like(t) for _ in range(self.mesh["tensor_parallel"].size())] if is_root else None
        dist.gather(t, parts, group=self.feature_group, group_dst=0)
        return torch.cat(parts, dim=dim).cpu() if is_root else None

    def full_state_dict(self, module) -> dict[str, Tensor]:
        """The whole bank on global rank 0, gathered slice by slice (rank 0's feature group)."""
        dims, whole = self.feature_dims(module), {}
        for key, t in module.state_dict().items():
            if key in dims:
                t = self.gather_to_root(t, dims[key])
            elif self.mesh["data_parallel"].get_local_rank() != 0:
                t = None
            if t is not None:
                whole[key.replace(".local.", ".", 1) if key.startswith("saes.") else key] = t.cpu()
        return whole


class FeatureShardedStrategy(ModelParallelStrategy):
    """ModelParallelStrategy whose checkpoints save each rank's feature slices as DTensor views.

    Lightning's own path expects DTensor parameters (FSDP2, tensor parallelism); the slices here
    are plain tensors, so the state handed to torch.distributed.checkpoint wraps them, and loading
    reads into the same views and copies back. Adam's moments are sharded like their parameters.
    """

    def _layout(self) -> FeatureShardedLayout:
        return self.lightning_module.layout

    def lightning_module_state_dict(self) -> dict:
        dims = self._layout().feature_dims(self.lightning_module)
        state = self.lightning_module.state_dict()
        return {k: self._layout().as_dtensor(t, dims[k]) if k in dims else t for k, t in state.items()}

    def optimizer_state(self, optimizer) -> dict:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        dims = self._layout().feature_dims(self.lightning_module)
        names = {id(p): name for name, p in self.lightning_module.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copy
        for index, moments in list(state["state"].items()):
            dim = dims.get(names[id(params[index])])
            if dim is not None:
                views = {key: self._layout().as_dtensor(moments[key], dim) for key in ("exp_avg", "exp_avg_sq")}
                state["state"][index] = moments | views
        return state

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint import load

        path = Path(self.broadcast(checkpoint_path))
        optimizer = self.optimizers[0]
        _start_adam_state(optimizer)  # tensors for the loader to fill
        state = {"state_dict": self.lightning_module_state_dict(), "optimizer_0": self.optimizer_state(optimizer)}
        load(state, checkpoint_id=path)
        self.lightning_module.load_state_dict(_to_local(state["state_dict"]))
        optimizer.load_state_dict(_to_local(state["optimizer_0"]))
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


def _start_adam_state(optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _to_local(state):
    if isinstance(state, DTensor):
        return state.to_local()
    if isinstance(state, dict):
        return {k: _to_local(v) for k, v in state.items()}
    return state
