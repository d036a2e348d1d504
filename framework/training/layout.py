"""Where an SAE's parameters live across ranks, and how the updates that are not gradient steps
reach them.

A training step is forward, backward, the variant's constraint hooks around the optimizer step
(the paper's gradient projection and decoder renormalisation), and now and then resampling,
held-out evaluation and, at the end, export. Gradients are each strategy's business (DDP's
all-reduce, FSDP2's reduce-scatter, ZeRO's partitioned buckets); everything else touches the
weights or optimizer state directly, and how depends on where they are:

    ParameterLayout          every rank holds whole tensors (one process, DDP): call as is
    FSDPLayout (fsdp.py)     DTensor shards of every tensor; row-wise hooks run on the shards
    ZeROLayout (zero.py)     flat fp32 partitions inside DeepSpeed's optimizer
    FeatureShardedLayout     each rank owns a slice of the features (feature_sharded.py)

`SAEModule` and the callbacks only ever call a layout, so they say once what they do
("renormalise", "resample these features", "report metrics") and each layout says how. The
layouts also carry the two process groups that statistics reduce over: the data-parallel group
(ranks that see different rows: counts add up) and the feature group (ranks that hold different
features of the same rows: per-feature vectors concatenate).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from framework.evaluation.metrics import evaluate_sae
from framework.sae import FEATURE_DIM, SAE, BatchTopKSAE, build_sae, resample_dead_features, reset_adam_state

LOSS_CHUNK = 8192  # rows per forward when scoring the resampling sample


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def per_input_loss(sae, x: Tensor) -> Tensor:
    """Each input's own loss under the SAE (reconstruction + sparsity), shape (rows,)."""
    out = sae(x)
    mse = (out.reconstruction - x).pow(2).mean(1)
    sparsity = out.features.abs().sum(1) * float(getattr(sae.cfg, "l1_coefficient", 0.0))
    return mse + sparsity


def expose_losses_to_hooks(sae) -> None:
    """Let forward hooks registered so far see the SAE's losses dict, and later ones its SAEOutput.

    FSDP2 and ZeRO-3 hang the hook that gathers the weights again before backward on the
    tensors they find in a module's output, looking inside tuples, lists and dicts only; an
    SAEOutput is a plain class. Around their hooks, one hook turns the output into
    (SAEOutput, losses) and one turns it back.
    """
    sae.register_forward_hook(lambda _module, _args, out: (out, out.losses), prepend=True)
    sae.register_forward_hook(lambda _module, _args, out: out[0])


def overrides(sae, hook: str) -> bool:
    """Whether the variant defines `hook` (a constraint), so layouts skip the work otherwise."""
    return getattr(type(sae), hook) is not getattr(SAE, hook)


class ParameterLayout:
    """Whole tensors on every rank: one process, or data parallelism (DDP)."""

    name = "replicated"
    whole_tensors = True  # every rank holds every tensor whole
    # DDP broadcasts rank 0's buffers before every forward; the other strategies do not.
    strategy_broadcasts_buffers = True

    def __init__(self, data_group=None):
        self.data_group = data_group  # None: the default group (all ranks) when distributed

    # ---- reductions -------------------------------------------------------------------------

    def data_parallel_size(self) -> int:
        return dist.get_world_size(self.data_group) if distributed() else 1

    def sum_over_data(self, t: Tensor) -> Tensor:
        """Sum of t over ranks that saw different rows (in place; returned for chaining)."""
        if distributed() and self.data_parallel_size() > 1:
            dist.all_reduce(t, group=self.data_group)
        return t

    def sum_over_features(self, t: Tensor) -> Tensor:
        """Sum of t over ranks that hold different features of the same rows (none here)."""
        return t

    def gather_features(self, t: Tensor) -> Tensor:
        """A per-feature vector of the whole dictionary from each rank's part (whole here)."""
        return t

    def on_fit_start(self, module) -> None:
        """After the strategy has wrapped the model (and registered its hooks)."""

    # ---- around the optimizer step ----------------------------------------------------------

    def before_optimizer_step(self, sae) -> None:
        sae.before_optimizer_step()

    def after_optimizer_step(self, sae) -> None:
        sae.after_optimizer_step()

    def clip_grad_norm_(self, sae, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(list(sae.parameters()), max_norm)

    def share_running_statistics(self, sae) -> None:
        """After each step: rank 0's running statistics to every rank. BatchTopK's inference
        threshold is updated by each rank from its own share of the batch; where the strategy
        does not broadcast buffers (fsdp, deepspeed, a 2-D feature_sharded mesh) the ranks'
        thresholds drifted apart, and export, held-out metrics and a resumed run took one rank's."""
        if self.strategy_broadcasts_buffers or not distributed():
            return
        inner = getattr(sae, "local", sae)  # feature_sharded wraps the rank's slice
        if isinstance(inner, BatchTopKSAE):
            dist.broadcast(inner.threshold, src=0)

    # ---- resampling, evaluation, export -----------------------------------------------------

    @torch.no_grad()
    def resample(self, sae, dead: Tensor, inputs: Tensor, generator: torch.Generator, optimizer) -> bool:
        """The paper's resampling of the `dead` features (see framework/sae/resampling.py);
        False where nothing was resampled (no input to draw from: all of them zero)."""
        losses = torch.cat([per_input_loss(sae, chunk) for chunk in inputs.split(LOSS_CHUNK)])
        changed = resample_dead_features(sae, dead, inputs, losses, generator)
        for param_name, index in changed.items():
            reset_adam_state(optimizer, getattr(sae, param_name), index, FEATURE_DIM[param_name])
        return bool(changed)

    def evaluate(self, sae, batches: list[Tensor]) -> dict[str, float]:
        return evaluate_sae(sae, batches)

    def full_state_dict(self, module) -> dict[str, Tensor]:
        """The whole module's state as plain tensors, on global rank 0 (collective)."""
        return module.state_dict()


class GatheredLayout(ParameterLayout):
    """Base of the layouts that hold no whole tensor between steps (FSDP, ZeRO).

    Resampling happens a few times per run, so it gathers: a plain copy of the SAE with the
    whole weights scores the sample and draws the new features on every rank (each rank does
    the same arithmetic on the same numbers), and only the changed tensors and their Adam
    moments are written back. Peak memory is one whole SAE per rank for the duration.
    """

    whole_tensors = False
    strategy_broadcasts_buffers = False

    def full_parameter(self, sae, name: str) -> Tensor:
        raise NotImplementedError

    def set_full_parameter(self, sae, name: str, value: Tensor) -> None:
        raise NotImplementedError

    def full_optimizer_state(self, optimizer, sae, name: str, key: str) -> Tensor | None:
        raise NotImplementedError

    def set_full_optimizer_state(self, optimizer, sae, name: str, key: str, value: Tensor) -> None:
        raise NotImplementedError

    def plain_copy(self, sae):
        with torch.device("meta"):  # every tensor is overwritten below: skip the random init
            plain = build_sae(sae.d_in, sae.cfg)
        plain = plain.to_empty(device=sae.b_dec.device)
        with torch.no_grad():
            for name, param in plain.named_parameters():
                param.copy_(self.full_parameter(sae, name))
            for name, buffer in sae.named_buffers():
                plain.get_buffer(name).copy_(buffer)
        return plain.train(sae.training)

    @torch.no_grad()
    def resample(self, sae, dead: Tensor, inputs: Tensor, generator: torch.Generator, optimizer) -> bool:
        plain = self.plain_copy(sae)
        losses = torch.cat([per_input_loss(plain, chunk) for chunk in inputs.split(LOSS_CHUNK)])
        changed = resample_dead_features(plain, dead, inputs, losses, generator)
        for name, index in changed.items():
            self.set_full_parameter(sae, name, getattr(plain, name))
            for key in ("exp_avg", "exp_avg_sq"):
                state = self.full_optimizer_state(optimizer, sae, name, key)
                if state is not None:
                    state.index_fill_(FEATURE_DIM[name], index.to(state.device), 0)
                    self.set_full_optimizer_state(optimizer, sae, name, key, state)
        return bool(changed)
