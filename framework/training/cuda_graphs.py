"""`train.cuda_graphs`: a bank's whole training step recorded once as a CUDA graph, then replayed.

On a GPU a TopK step at the sizes researchers train (d_in 576, batch 4,096, 16,384 features) is a
couple of milliseconds of kernels, and Python launching them one by one takes longer than the GPU
takes to run them: bench/step_profile.py measured 4.1 ms of wall time for 1.8 ms of kernels at
n 16,384 in bfloat16 on an H100. Recording only the forward and backward (as this module first
did) left 3.3 ms: the decoder constraint, Adam and the firing statistics still launched one by
one; recording the whole step, 2.0 ms (the GPU busy 89% of it). So the whole step is recorded,
as PyTorch's "whole network capture":

    inputs scaled -> forward_static of each SAE -> firing statistics -> backward ->
    decoder-gradient projection, gradient clipping -> Adam -> decoder renormalisation

`SAE.forward_static` is the training forward without host synchronisation and with shapes fixed
by the batch alone: TopK's (k codes per row) and the paper SAE's dense path (its sparse path has
a data-dependent number of codes). Adam runs with `capturable=True` and its learning rate as a
tensor on the device, which the LR schedule fills in place each step, so a replay uses the
scheduled rate. The gradients live in the graph's memory (set to None before recording, the
recorded backward makes them), and nothing zeroes them between steps: each replay overwrites them.

Whether a TopK SAE has dead latents changes the work (AuxK), so each answer (one per SAE of the
bank) gets its own graph, recorded the first time it comes up; the answer comes from
`SAE.auxk_needed` before each step, which for TopK reads the device (a host sync) only when a
latent may be dead. Before recording, three warm-up steps run eagerly on a side stream (cuBLAS
and the autograd engine set themselves up, Adam makes its state); they change the weights,
Adam's moments and the statistics, so all of those are saved before and put back after, in place
(the graph keeps their addresses).

What stays eager, in SAEModule: the nan check (its flags are copied from the step's outputs),
logging, resampling (it writes weights and Adam's moments in place, which the graph reads), the
held-out evaluation and every callback. Requirements, checked at the start of training: a CUDA
device, one process (`train.strategy=auto`, one device), every SAE of the bank of a variant with
a static forward (`topk`, `paper`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from framework.errors import RecipeError
from framework.sae import VARIANTS
from framework.sae.base import SAE, SAEOutput

log = logging.getLogger(__name__)

WARM_UP_STEPS = 3  # as torch.cuda.make_graphed_callables runs before recording
# From this size a float32 paper SAE's recorded (dense) step is no faster than its eager one with
# sparse codes (an H200, L0 ~35: 429k against 494k tokens/s at 16,384 features, 113k against
# 283k at 65,536); below it, and in bfloat16 at every size measured, the recorded step is faster.
SLOW_RECORDED_PAPER_FEATURES = 16384


def check_supported(recipe, device: torch.device, world_size: int) -> None:
    """Refuse, with the reason and what to change, what train.cuda_graphs cannot record."""
    cfg = recipe.train
    variants = {c.name: c.variant for c in recipe.sae_configs()}
    unsupported = {name: v for name, v in variants.items() if not VARIANTS[v].graph_safe}
    if unsupported:
        listed = ", ".join(f"{name} ({variant})" for name, variant in unsupported.items())
        recordable = ", ".join(v for v, cls in VARIANTS.items() if cls.graph_safe)
        raise RecipeError(
            f"train.cuda_graphs=true records SAEs whose step has shapes fixed by the batch alone "
            f"(variants {recordable}); this bank also holds {listed}. Set train.cuda_graphs=false."
        )
    if cfg.precision == "16-mixed":
        raise RecipeError(
            "train.cuda_graphs=true cannot record float16 mixed precision: its loss scaling (a "
            "GradScaler that skips steps with inf gradients and adapts its scale) runs outside the "
            "recorded step, so the step would train without it. Use train.precision=bf16-mixed (no "
            "scaling needed) or 32-true, or set train.cuda_graphs=false."
        )
    if device.type != "cuda":
        raise RecipeError(
            f"train.cuda_graphs=true needs a CUDA device; this run trains on {device.type}. "
            f"Set train.cuda_graphs=false."
        )
    if cfg.strategy != "auto" or world_size != 1:
        raise RecipeError(
            f"train.cuda_graphs=true runs in one process on one GPU (train.strategy=auto, one device); "
            f"this run has train.strategy={cfg.strategy} over {world_size} process(es). Set "
            f"train.cuda_graphs=false, or train.devices=1."
        )
    warn_where_eager_is_faster(recipe)


def warn_where_eager_is_faster(recipe) -> None:
    large = [c.name for c in recipe.sae_configs()
             if c.variant == "paper" and c.n_features >= SLOW_RECORDED_PAPER_FEATURES]
    if large and recipe.train.precision == "32-true":
        log.warning(
            "train.cuda_graphs=true records the paper SAE's dense path; in float32 at %d features or more the "
            "eager step, whose sparse path runs once codes are sparse, measured as fast or faster (%s; "
            "docs/training.md, \"CUDA graphs\"). Prefer train.precision=bf16-mixed with graphs, or "
            "train.cuda_graphs=false.", SLOW_RECORDED_PAPER_FEATURES, ", ".join(large),
        )


@dataclass
class StepParts:
    """What a bank's training step is made of, besides the SAEs and the optimizer: shared by
    SAEModule (eager and recorded) and bench/train_step.py."""

    scaled_input: Callable[[tuple[Tensor, ...], str], Tensor]  # the batch -> one SAE's input
    update_stats: Callable[[str, SAE, Tensor, int], None]  # (name, sae, fire_counts, rows)
    constrain_gradients: Callable[[], None]  # the decoder-gradient projection, gradient clipping
    constrain_weights: Callable[[], None]  # the decoder renormalisation
    statistics: tuple[nn.Module, ...] = ()  # modules besides the SAEs whose buffers update_stats changes


@dataclass
class _Recording:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]  # the batch is copied into these before each replay
    outputs: dict[str, tuple[Tensor, SAEOutput]]  # per SAE: its input and output, overwritten by each replay


class RecordedSteps:
    """Calls like a training step: `steps(batch)` runs forward, backward and the optimizer step of
    every SAE of the bank and returns, per SAE, (its input, SAEOutput with losses, reconstruction
    and firing counts; no features), replaying a recorded graph. The returned tensors are the
    graph's: the next replay overwrites them."""

    def __init__(self, saes: Mapping[str, SAE], optimizer: torch.optim.Optimizer, parts: StepParts):
        for name, sae in saes.items():
            if not sae.graph_safe:
                raise RecipeError(f"SAE {name!r}: a {sae.variant} SAE cannot be recorded as a CUDA graph; "
                                  f"set train.cuda_graphs=false")
        self.saes, self.optimizer, self.parts = dict(saes), optimizer, parts
        self._recorded: dict[tuple, _Recording] = {}

    def __call__(self, batch: tuple[Tensor, ...]) -> dict[str, tuple[Tensor, SAEOutput]]:
        with_auxk = tuple(sae.auxk_needed() for sae in self.saes.values())
        amp = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        key = (with_auxk, tuple((t.shape, t.dtype) for t in batch), amp)
        recording = self._recorded.get(key)
        if recording is None:
            recording = self._recorded[key] = self._record(batch, with_auxk, *amp)
        for static, t in zip(recording.inputs, batch):
            static.copy_(t)
        recording.graph.replay()
        return recording.outputs

    # ---- the step, as recorded ---------------------------------------------------------------

    def run_step(self, batch: tuple[Tensor, ...], with_auxk: tuple[bool, ...],
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 ) -> dict[str, tuple[Tensor, SAEOutput]]:
        """The step itself, eagerly: what is recorded. The forward runs under `autocast` (the
        precision's); the backward and the update outside it, as Lightning runs them (autograd
        would otherwise carry autocast into backward functions that multiply matrices)."""
        outputs, total = {}, None
        with autocast():
            for (name, sae), auxk_on in zip(self.saes.items(), with_auxk):
                x = self.parts.scaled_input(batch, name)
                x_hat, losses, fire_counts = sae.forward_static(x, auxk_on)
                self.parts.update_stats(name, sae, fire_counts, x.shape[0])
                outputs[name] = (x, SAEOutput(x_hat, losses=losses, fire_counts=fire_counts))
                total = losses["loss"] if total is None else total + losses["loss"]
        with torch.autocast(batch[0].device.type, enabled=False):
            total.backward()
            self.parts.constrain_gradients()
            self.optimizer.step()
            self.parts.constrain_weights()
        return outputs

    # ---- recording ----------------------------------------------------------------------------

    def _record(self, batch: tuple[Tensor, ...], with_auxk: tuple[bool, ...], amp_enabled: bool,
                amp_dtype: torch.dtype) -> _Recording:
        # Autocast's weight-cast cache would hold tensors from outside the graph's memory, so it
        # is off while recording (and warming up, for the same kernels).
        def autocast():
            return torch.autocast("cuda", dtype=amp_dtype, enabled=amp_enabled, cache_enabled=False)

        inputs = tuple(t.detach().clone() for t in batch)
        prepare_optimizer(self.optimizer)
        self.warm_up(inputs, with_auxk, autocast)
        self.optimizer.zero_grad(set_to_none=True)  # the recorded backward makes the gradients
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread keeps calling CUDA while a graph is
        # recorded mid-run (the AuxK graph); in the default global mode its calls would break the
        # recording and then that thread
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.run_step(inputs, with_auxk, autocast)
        return _Recording(graph, inputs, outputs)

    def warm_up(self, inputs: tuple[Tensor, ...], with_auxk: tuple[bool, ...],
                autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        """WARM_UP_STEPS eager steps (on a side stream on a GPU, as recording wants), then the
        weights, Adam's state and every buffer as they were before: the run goes on unchanged."""
        saved = _TrainingState([*self.saes.values(), *self.parts.statistics], self.optimizer)
        on_gpu = inputs[0].device.type == "cuda"
        side = torch.cuda.Stream() if on_gpu else None
        if on_gpu:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if on_gpu else contextlib.nullcontext(), warnings.catch_warnings():
            # Adam warns once that a capturable optimizer runs uncaptured: it does, here only
            warnings.filterwarnings("ignore", message=".*capturable=True")
            for _ in range(WARM_UP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self.run_step(inputs, with_auxk, autocast)
        if on_gpu:
            torch.cuda.current_stream().wait_stream(side)
        saved.restore()
        for sae in self.saes.values():
            if hasattr(sae, "silent_counts_changed"):  # TopK: the warm-up advanced its counts
                sae.silent_counts_changed()


def prepare_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Adam as a recorded step needs it: capturable (its step counts on the device, no host reads),
    and the learning rate a tensor on the device, which LR schedules fill in place. (A resumed
    optimizer may have loaded other settings from an eager run's checkpoint.)"""
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not isinstance(group["lr"], Tensor):
            device = group["params"][0].device
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def portable_optimizer_state(state: dict) -> None:
    """An optimizer's state_dict (a checkpoint's copy), as an eager run would have saved it:
    plain float learning rates, not capturable, so that it resumes with or without graphs. Only
    the groups prepare_optimizer changed: a no-op for every other optimizer and strategy."""
    for group in state.get("param_groups", []) if isinstance(state, dict) else []:
        if isinstance(group.get("lr"), Tensor):
            group["lr"], group["capturable"] = float(group["lr"]), False


def portable_scheduler_state(state: dict) -> None:
    """An LR scheduler's state_dict (a checkpoint's copy) with float rates, as with an eager run."""
    if isinstance(state, dict) and "_last_lr" in state:
        state["_last_lr"] = [float(v) if isinstance(v, Tensor) else v for v in state["_last_lr"]]


class _TrainingState:
    """Copies of everything a training step changes, to put back in place."""

    @torch.no_grad()
    def __init__(self, modules, optimizer: torch.optim.Optimizer):
        self.tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
        self.copies = [t.detach().clone() for t in self.tensors]
        self.optimizer = optimizer
        self.optimizer_state = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
                                for p, s in optimizer.state.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for t, copy in zip(self.tensors, self.copies):
            t.copy_(copy)
        for p, state in self.optimizer.state.items():
            before = self.optimizer_state.get(p)
            for k, v in state.items():
                if not isinstance(v, Tensor):
                    continue
                if not before:  # made by the warm-up: a fresh Adam's state is all zeros
                    v.zero_()
                else:
                    v.copy_(before[k])
