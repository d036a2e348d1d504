"""Where this process sits in a torchrun job, for the stages that run outside Lightning."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_rank() -> Rank:
    """From torchrun's environment; a plain process is rank 0 of 1."""
    return Rank(
        rank=int(os.environ.get("RANK", 0)),
        world=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_process_group(rank: Rank) -> bool:
    """Join the job's process group if there is more than one process; True if joined here."""
    if rank.world == 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank.local_rank)
    # A finite timeout turns a dead rank into an error on the others instead of a hang.
    timeout = datetime.timedelta(seconds=float(os.environ.get("SAE_DIST_TIMEOUT_S", 1800)))
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
