"""strategy=deepspeed: DeepSpeed ZeRO stage 1, 2 or 3 through Lightning's DeepSpeedStrategy.

Trade-off: ZeRO partitions over the data-parallel ranks what FSDP2 does, in stages -- 1: the
Adam moments and fp32 master weights; 2: also the gradients; 3: also the weights, gathered per
module for the forward and backward. The optimizer steps flat fp32 partitions it owns, so the
module's tensors are not what Adam updates: anything that changes weights or gradients outside
the optimizer must go through DeepSpeed's tensor-fragment API (`safe_get_full_*` /
`safe_set_full_*`), which gathers a whole tensor from its fragments (an all-reduce of its size)
and writes one back into each rank's fragment.

Here that is the variants' constraint hooks (the paper's projection of W_dec's gradient before
the step and its renormalisation after) and resampling. For a variant that has a hook, each step
swaps the whole fp32 tensors in as the module's parameters (and the whole fp32 gradients as
their .grad), runs the variant's own hook on them unchanged, and writes the result back: to the
gradient fragments before the step; to the fp32 masters and to the module's weights after it
(ZeRO-3: re-partitioned from rank 0). Cost: an all-reduce of the SAE's weights before and after
each step and of its gradients before it, the price of a constraint that needs whole rows.

Lightning refuses DeepSpeed without CUDA; DeepSpeed itself runs on CPU (its CPU accelerator
with the gloo backend). `CPUDeepSpeedStrategy` lifts that refusal and the two CUDA device-index
assumptions behind it, so a CPU run takes the same Lightning path, ZeRO optimizer and checkpoint
format as a GPU run.

Under ZeRO-3 a parameter is an empty placeholder outside the gathers around its module's forward
and backward; `local_partition` gives the part of it this rank holds, for checks that must not
gather (SAEModule's non-finite weight check).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import Tensor

from framework.training.layout import GatheredLayout, expose_losses_to_hooks, overrides


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy without its CUDA-only checks (DeepSpeed's CPU accelerator)."""

    def setup_environment(self) -> None:
        # DeepSpeed's CPU accelerator counts local devices from LOCAL_SIZE, which its own
        # launcher sets and torchrun does not; without it, ZeRO-3 asks `numactl` in a subprocess
        # at every gradient reduction (a fork per step, and the warning filters reset each time,
        # so every deprecation warning printed again every step).
        os.environ.setdefault("LOCAL_SIZE", str(self.num_processes))
        # DeepSpeed's CPU comm backend builds and loads its shared-memory all-reduce op when it
        # starts: a C++ compile of about a minute the first time on a machine, and a shared-memory
        # segment per job, for `inference_all_reduce`, which ZeRO training never calls (its
        # collectives go through torch.distributed, gloo here). DeepSpeed keeps the op-compatibility
        # table in one dict so that edits to it hold; marking the op incompatible skips it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "CUDA only" refusal

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()  # as DeepSpeedStrategy, without its check of CUDA device indices
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        # DeepSpeedStrategy passes root_device.index, which is None for a CPU device.
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False,
        )  # fmt: skip
        return engine, ds_optimizer


def deepspeed_strategy(stage: int, on_gpu: bool, timeout, rank_batch: int) -> DeepSpeedStrategy:
    # The batch size only feeds DeepSpeed's throughput log; Lightning would read it from a
    # batch sampler, which the activation stream (already batched) does not have.
    options = {"stage": stage, "timeout": timeout, "logging_batch_size_per_gpu": rank_batch}
    if on_gpu:
        return DeepSpeedStrategy(**options)
    return CPUDeepSpeedStrategy(**options, process_group_backend="gloo")


def local_partition(param) -> Tensor:
    """This rank's ZeRO-3 partition of `param`: the elements of the flattened tensor it owns.

    Outside the gathers around a module's forward and backward a ZeRO-3 parameter's `.data` is
    an empty placeholder (numel 0); `ds_tensor` holds the rank's flat slice of `ds_numel`
    elements, the one the optimizer's fp32 step is copied into. The last ranks' slices are padded
    to equal length; the padding is allocated uninitialised and is no part of the parameter (it
    may hold anything, NaN included), so it is cut off.
    """
    import torch.distributed as dist

    partition = param.ds_tensor
    size = partition.numel()
    start = size * dist.get_rank(group=getattr(param, "ds_process_group", None))
    return partition.narrow(0, 0, max(0, min(size, param.ds_numel - start)))


class ZeROLayout(GatheredLayout):
    def __init__(self, stage: int):
        super().__init__()
        self.stage = stage
        self.name = f"zero-{stage}"

    def on_fit_start(self, module) -> None:
        if self.stage == 3:  # ZeRO-3 re-gathers weights for the backward from hooks on outputs
            for sae in module.saes.values():
                expose_losses_to_hooks(sae)

    # ---- whole tensors from and to the fragments --------------------------------------------

    def full_parameter(self, sae, name: str) -> Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(getattr(sae, name))

    @torch.no_grad()
    def set_full_parameter(self, sae, name: str, value: Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        param = getattr(sae, name)
        safe_set_full_fp32_param(param, value.float())
        self._set_module_weight(param, value)

    @torch.no_grad()
    def _set_module_weight(self, param, value: Tensor) -> None:
        """The weight the forward reads: whole on every rank below ZeRO-3, else re-partitioned."""
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=self.stage == 3):
            param.data.copy_(value)

    def full_optimizer_state(self, optimizer, sae, name: str, key: str) -> Tensor | None:
        from deepspeed.utils import safe_get_full_optimizer_state

        return safe_get_full_optimizer_state(getattr(sae, name), key)

    def set_full_optimizer_state(self, optimizer, sae, name: str, key: str, value: Tensor) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(getattr(sae, name), value, key)

    def full_state_dict(self, module) -> dict[str, Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        state = {name: safe_get_full_fp32_param(p).cpu() for name, p in module.named_parameters()}
        return state | {name: b.cpu() for name, b in module.named_buffers()}

    # ---- the variants' constraint hooks on whole fp32 tensors -------------------------------

    @contextlib.contextmanager
    def _whole(self, sae, gradients: bool) -> Iterator[None]:
        """Within: the SAE's parameters are whole fp32 tensors (and .grad whole fp32 gradients)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        params = dict(sae.named_parameters())
        kept = {name: p.data for name, p in params.items()}
        grads = {name: safe_get_full_grad(p).float() for name, p in params.items()} if gradients else {}
        for name, p in params.items():
            p.data = safe_get_full_fp32_param(p)
            if gradients:
                p.grad = grads[name]
        try:
            yield
        finally:
            for name, p in params.items():
                p.data = kept[name]

    @torch.no_grad()
    def before_optimizer_step(self, sae) -> None:
        if not overrides(sae, "before_optimizer_step"):
            return
        from deepspeed.utils import safe_set_full_grad

        with self._whole(sae, gradients=True):
            sae.before_optimizer_step()
            for p in sae.parameters():
                grad, p.grad = p.grad, None
                safe_set_full_grad(p, grad)

    @torch.no_grad()
    def after_optimizer_step(self, sae) -> None:
        if not overrides(sae, "after_optimizer_step"):
            return
        with self._whole(sae, gradients=False):
            sae.after_optimizer_step()
            updated = {name: p.data for name, p in sae.named_parameters()}
        for name, value in updated.items():
            self.set_full_parameter(sae, name, value)

    @torch.no_grad()
    def clip_grad_norm_(self, sae, max_norm: float) -> None:
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        grads = [safe_get_full_grad(p).float() for p in sae.parameters()]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p, g in zip(sae.parameters(), grads):
            safe_set_full_grad(p, g * scale)
