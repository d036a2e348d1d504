"""strategy=fsdp: FSDP2 (`fully_shard`) over the data-parallel ranks, through Lightning's
ModelParallelStrategy.

Trade-off: DDP keeps the weights, gradients and both Adam moments whole on every rank (16 bytes
per parameter in fp32); FSDP2 keeps 1/world of each and all-gathers the weights for the forward
and backward, then reduce-scatters the gradients -- the same bytes on the wire as DDP's
all-reduce, in two halves, for a world-fold cut in resident state. The whole weights (and, for
the backward, their gradients) still exist on every rank for the duration of one SAE's step, so
FSDP helps until a single SAE's weights no longer fit a device; past that, feature sharding.

Each SAE is its own FSDP unit and, as the bank around it is not sharded, its own FSDP root:
FSDP2 does not reshard a root after its forward, so a lone SAE's weights are gathered once per
step and stay whole until its backward has run. In a bank all forwards run before the backward,
so that would hold every SAE whole at once; there each SAE reshards right after its forward
(as FSDP2 does for non-root units) and is gathered again for its backward: one more all-gather
per SAE and step, for a peak of one SAE's whole weights instead of the bank's.

Every parameter is a DTensor sharded on dim 0: W_dec and b_enc by features, W_enc and b_dec by
input dimension. The variants' constraint hooks are row-wise on W_dec (a rowwise dot and a
rowwise norm), which DTensor runs shard-locally, so they run unchanged; resampling gathers
(layout.GatheredLayout).

fully_shard's post-forward hook hangs its pre-backward hook (all-gather before backward,
reduce-scatter after) on the tensors of the output, which an SAEOutput hides from it:
layout.expose_losses_to_hooks shows it the losses.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from framework.training.layout import GatheredLayout, expose_losses_to_hooks


def shard_saes(module, mesh) -> None:
    """fully_shard each SAE of the bank over `mesh` (the data-parallel ranks)."""
    from torch.distributed.fsdp import fully_shard

    for sae in module.saes.values():
        fully_shard(sae, mesh=mesh)
        expose_losses_to_hooks(sae)
        if len(module.saes) > 1:
            sae.register_forward_hook(_reshard_after_forward)
    module.layout = FSDPLayout(mesh.get_group())


def _reshard_after_forward(sae, _args, out):
    # After FSDP's own post-forward hook, which has hung the re-gathering for backward on the
    # output; the unsharded tensors autograd saved are refilled in place by that gather.
    sae.reshard()
    return out


def _local_part(full: Tensor, like: DTensor) -> Tensor:
    """This rank's piece of `full` under `like`'s placements (dim-0 chunks, as FSDP2 splits)."""
    mesh = like.device_mesh
    part = full.chunk(mesh.size(), dim=0)[mesh.get_local_rank()]
    if part.shape != like.to_local().shape:
        raise RuntimeError(f"unexpected FSDP shard shape {tuple(like.to_local().shape)} for {tuple(full.shape)}")
    return part


class FSDPLayout(GatheredLayout):
    name = "fsdp"

    def full_parameter(self, sae, name: str) -> Tensor:
        return getattr(sae, name).full_tensor()

    @torch.no_grad()
    def set_full_parameter(self, sae, name: str, value: Tensor) -> None:
        param = getattr(sae, name)
        param.to_local().copy_(_local_part(value, param))

    def full_optimizer_state(self, optimizer, sae, name: str, key: str) -> Tensor | None:
        state = optimizer.state.get(getattr(sae, name), {})
        return state[key].full_tensor() if key in state else None

    @torch.no_grad()
    def set_full_optimizer_state(self, optimizer, sae, name: str, key: str, value: Tensor) -> None:
        moment = optimizer.state[getattr(sae, name)][key]
        moment.to_local().copy_(_local_part(value, moment))

    def full_state_dict(self, module) -> dict[str, Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
