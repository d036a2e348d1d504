"""Where this process sits in a torchrun job, for the stages that run outside Lightning.

Imports no torch until a process group is joined: the CLI's locks ask for the rank before any
stage (and `sae --help` never) imports it.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
# The stages that divide their work over a job's ranks; every other stage runs on rank 0 alone.
PARALLEL_STAGES = ("harvest", "train")
POLL_S = 2.0  # how often the other ranks look whether rank 0 has finished such a stage


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_rank() -> Rank:
    """From the launcher's environment; a plain process is rank 0 of 1."""
    env = os.environ
    local = int(env.get("LOCAL_RANK") or 0)
    return Rank(rank=_global_rank(env, local), world=int(env.get("WORLD_SIZE") or 1), local_rank=local)


def _global_rank(env, local: int) -> int:
    """torchrun's RANK. Without it: the processes Lightning itself starts for `train.devices` > 1
    (no torchrun) carry only LOCAL_RANK and NODE_RANK, and would each take themselves for rank 0
    (locking their own job's directories, writing its reports); then SLURM's task id (srun without
    torchrun). LOCAL_RANK before SLURM_PROCID: Lightning's children inside a batch job inherit the
    batch step's SLURM_PROCID of 0. A child on another node than the first gets a rank past every
    rank of node 0 (its exact rank is Lightning's business; here only "is it rank 0" is asked)."""
    if env.get("RANK"):
        return int(env["RANK"])
    if env.get("LOCAL_RANK"):
        node = int(env.get("NODE_RANK") or 0)
        return local if node == 0 else node * int(env.get("WORLD_SIZE") or 1) + local
    return int(env.get("SLURM_PROCID") or 0)


def init_process_group(rank: Rank) -> bool:
    """Join the job's process group if there is more than one process; True if joined here."""
    import torch
    import torch.distributed as dist

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
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def on_rank_zero(stage: str, workdir: str | os.PathLike, work: Callable[[], T]) -> T | None:
    """Run `work` (a stage that does not divide its work over ranks: pretrain, eval, analyze,
    export) on global rank 0 alone. Every rank of a torchrun job runs the same command; the
    others wait until rank 0 has finished the stage, so that a parallel stage after it
    (`sae run`'s harvest, train) finds its inputs, and then go on with nothing (None). They
    wait for a file rank 0 writes into `workdir` naming this job attempt, not on a collective:
    a stage can take longer than any process-group timeout, and torchrun stops the waiting ranks
    if rank 0 fails. The processes Lightning starts itself for train.devices > 1 only join the
    training: whatever comes before it was done before they started, and rank 0 does what
    comes after."""
    rank = current_rank()
    done = Path(workdir) / f".{stage}.rank0-done"
    # Every rank makes the same calls in the same order: the count tells the same stage run
    # several times in one job apart (a bank sweep analyses each of its SAEs). Rank 0 writes
    # "JOB#n" after its n-th; a rank waiting for its n-th goes on at n or more (rank 0 may be
    # further on by the time it looks).
    _calls[done] = call = _calls.get(done, 0) + 1
    job = _job_attempt()
    if rank.is_main:
        result = work()
        if rank.world > 1:
            done.parent.mkdir(parents=True, exist_ok=True)
            tmp = done.with_name(f"{done.name}.{process_tag()}.tmp")
            tmp.write_text(f"{job}#{call}")
            tmp.replace(done)
        return result
    if not os.environ.get("RANK"):  # started by Lightning (LOCAL_RANK; WORLD_SIZE is gone after fit)
        return None
    while _finished_calls(done, job) < call:
        time.sleep(POLL_S)
    return None


def _finished_calls(done: Path, job: str) -> int:
    """How many times rank 0 of this job has finished the stage, from its done file."""
    try:
        written_job, _, count = done.read_text().rpartition("#")
    except FileNotFoundError:
        return 0
    return int(count) if written_job == job and count.isdigit() else 0


_calls: dict[Path, int] = {}


def process_tag() -> str:
    """This process among all that share a file system: host and pid (array tasks on different
    nodes can have the same pid). For temporary names that no other process may write."""
    return f"{socket.gethostname()}.{os.getpid()}"


def _job_attempt() -> str:
    """Names this torchrun job and restart: its run id, restart count and rendezvous address."""
    env = os.environ
    return "/".join(env.get(name, "") for name in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                                                   "MASTER_ADDR", "MASTER_PORT"))
