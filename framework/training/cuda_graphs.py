"""`train.cuda_graphs`: a TopK SAE's forward and backward recorded once as CUDA graphs, then replayed.

On a GPU a TopK step at the sizes researchers train (d_in 576, batch 4,096, 16,384 features) is a
few milliseconds of kernels, and Python launching its ~160 kernels one by one takes longer than the
GPU takes to run them: bench/step_profile.py measured 4.1 ms of wall time for 1.8 ms of kernels at
n 16,384 in bfloat16 on an H100. A CUDA graph launches all of a recorded forward (or backward) at once.

What is recorded is `TopKSAE.forward_static`, the training forward without host synchronisation and
with shapes fixed by the batch and k alone, through `torch.cuda.make_graphed_callables`: its
forward and its backward become one graph each, the gradients land in `.grad` as usual, and
everything after (the decoder constraint, gradient clipping, Adam, the firing statistics, the nan
check, logging, every callback) stays as it is. Whether any latent is dead changes the work (AuxK),
so each answer gets its own pair of graphs, recorded the first time it is needed; the answer comes
from `TopKSAE.dead_latents` before each step's forward, which reads the device (a host sync) only
when a latent may be dead.

Requirements, checked at the start of training: a CUDA device, one process (`train.strategy=auto`,
one device), every SAE of the bank a `topk` SAE (BatchTopK's selection size depends on the data).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from framework.errors import RecipeError
from framework.sae.base import SAE, SAEOutput


def check_supported(recipe, device: torch.device, world_size: int) -> None:
    """Refuse, with the reason and what to change, what train.cuda_graphs cannot record."""
    cfg = recipe.train
    variants = {c.name: c.variant for c in recipe.sae_configs()}
    unsupported = {name: v for name, v in variants.items() if v != "topk"}
    if unsupported:
        listed = ", ".join(f"{name} ({variant})" for name, variant in unsupported.items())
        raise RecipeError(
            f"train.cuda_graphs=true records TopK SAEs only (variant topk: a fixed k codes per row); "
            f"this bank also holds {listed}. Set train.cuda_graphs=false."
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


class _StaticForward(nn.Module):
    """forward_static with one AuxK answer, as a module make_graphed_callables can record."""

    def __init__(self, sae: SAE, with_auxk: bool):
        super().__init__()
        self.sae, self.with_auxk = sae, with_auxk

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.sae.forward_static(x, self.with_auxk)


class GraphedSAE:
    """Calls like the SAE in training (`graphed(x)` -> SAEOutput with losses, reconstruction and
    firing counts; no features), replaying recorded graphs."""

    def __init__(self, sae: SAE):
        if not sae.graph_safe:
            raise RecipeError(f"a {sae.variant} SAE cannot be recorded as a CUDA graph; set train.cuda_graphs=false")
        self.sae = sae
        self._recorded: dict[tuple, nn.Module] = {}

    def __call__(self, x: Tensor) -> SAEOutput:
        with_auxk = self.sae.dead_latents() is not None  # reads the device only when one may be dead
        amp = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        key = (with_auxk, tuple(x.shape), x.dtype, amp)
        graphed = self._recorded.get(key)
        if graphed is None:
            graphed = self._recorded[key] = self._record(x, with_auxk, *amp)
        x_hat, loss, mse, auxk, l0, fire_counts = graphed(x)
        return SAEOutput(x_hat, losses={"loss": loss, "mse": mse, "auxk": auxk, "l0": l0}, fire_counts=fire_counts)

    def _record(self, x: Tensor, with_auxk: bool, amp_enabled: bool, amp_dtype: torch.dtype) -> nn.Module:
        # make_graphed_callables runs a few warm-up forwards and backwards before recording: they
        # leave the weights and .grad alone but advance the SAE's silent-step counts, so its
        # buffers are put back afterwards. Autocast's weight-cast cache would hold tensors from
        # outside the graph's memory, so it is off while recording.
        # The recorded graphs keep the parameters' gradient accumulators they were made with, on
        # the recording stream; autograd warns at every replay that it syncs the two streams (an
        # event, microseconds: the measured speed-ups include it).
        warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
        saved = {name: b.clone() for name, b in self.sae.named_buffers()}
        with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_enabled, cache_enabled=False):
            graphed = torch.cuda.make_graphed_callables(_StaticForward(self.sae, with_auxk), (x.detach().clone(),))
        with torch.no_grad():
            for name, b in self.sae.named_buffers():
                b.copy_(saved[name])
        return graphed
