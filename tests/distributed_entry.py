"""`sae train` under torchrun, with faults injected by environment (tests/test_distributed.py).

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_entry.py RECIPE key=value ...

SAE_TEST_FAULT=kill:RANK:STEP   rank RANK SIGKILLs itself when step STEP starts (first attempt
                                only: a job restarted by torchrun --max-restarts runs clean)
SAE_TEST_FAULT=hang:RANK:STEP   rank RANK stops answering (sleeps) when step STEP starts
SAE_TEST_FAULT=nan:RANK:STEP    rank RANK's batch of step STEP gets one nan (its loss is nan)
SAE_TEST_FAULT=term:RANK:STEP   rank RANK gets SIGTERM when step STEP starts (a cluster preempting
                                the job sends it to every rank: term:0:11,term:1:11)

Several faults: separate them with commas.

Nothing is mocked: the fault is a callback added to the Trainer `sae train` builds.
"""

from __future__ import annotations

import gc

gc.disable()  # as the `sae` program does while it imports (framework.cli.program enables it again)

import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from lightning.pytorch.callbacks import Callback  # noqa: E402

import framework.training.train as train_stage  # noqa: E402
from framework.cli import program  # noqa: E402


class Fault(Callback):
    def __init__(self, kind: str, rank: int, step: int):
        self.kind, self.rank, self.step = kind, rank, step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        print(f"injected fault: rank {self.rank} {self.kind} at step {self.step}", flush=True)
        if self.kind == "nan":
            batch[0][0, 0] = float("nan")
            return
        if self.kind in ("kill", "term"):
            os.kill(os.getpid(), signal.SIGKILL if self.kind == "kill" else signal.SIGTERM)
            return
        time.sleep(3600)


def with_faults(specs: str):
    faults = [Fault(kind, int(rank), int(step)) for kind, rank, step in (spec.split(":") for spec in specs.split(","))]
    original = train_stage.build_trainer

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.callbacks[:0] = faults
        return trainer

    return build


if __name__ == "__main__":
    fault = os.environ.get("SAE_TEST_FAULT")
    if fault and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        train_stage.build_trainer = with_faults(fault)
    sys.exit(program(["train", *sys.argv[1:]]))
