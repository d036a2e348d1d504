"""Every train.strategy in real torchrun jobs (CPU processes on gloo) against one process.

"The same global batches": under data parallelism (ddp, fsdp, deepspeed) rank r of 2 reads the
r-th half of each global batch; the one-process reference reads, at every step, rank 0's half
followed by rank 1's (`ConcatenatedRanks`). Two feature shards read the whole batch each, which
is what one process reads anyway. The paper recipes leave features dead, so resampling runs
under every strategy too (4 features at step 12; 3 at steps 5 and 6 for the feature-sharded one).

Tolerance: 1e-5 absolute on every weight after 16 Adam steps (lr 3e-3; weights of order 1).
Measured: at most 3.6e-6, from the different summation order of the gradient reductions and of
the sharded reconstruction; a wrong collective (a gradient counted twice, b_dec added per shard,
a rank-local statistic) moves weights by 1e-3 or more within a few steps. Adam amplifies
rounding where a gradient element is near its epsilon (a feature that barely fires): with L1 at
3e-2 feature sharding's different summation order reaches 3.7e-5 on 3 of 131,072 elements, so
the feature-sharded paper run uses L1 1e-3. Those figures (and the resampling counts) are on a
store of consecutive contexts (harvest.context_order: source, set below): on a shuffled one the
feature-sharded paper run resampled nothing and one W_dec element differed by 1.6e-5.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRETRAIN
from safetensors.torch import load_file
from test_training import STORE, TRAIN, TRAIN_FOR_BANK
from torch.utils.data import DataLoader, IterableDataset

import framework.training.train as train_stage
from framework.activations.harvest import harvest
from framework.config import load_recipe
from framework.errors import CheckpointError, RecipeError
from framework.sae import build_sae
from framework.training.data import ActivationDataModule
from framework.training.strategies import trainer_arguments

pytestmark = pytest.mark.distributed

HERE = Path(__file__).parent
TOLERANCE = 1e-5
# The store these tests were tuned on (which features die, where Adam's epsilon amplifies rounding).
STORE = [*STORE, "harvest.context_order=source"]
PAPER = ["sae.l1_coefficient=3e-2", "train.resample_steps=[6,12]", "train.dead_window=4", "train.checkpoint_every=4"]
TOPK = ["sae.variant=topk", "sae.k=8", "sae.aux_k=16", "sae.dead_steps_threshold=4", "train.checkpoint_every=4"]
# AuxK normalises by the residual energy of the batch a rank sees: under data parallelism that is
# each rank's half, so data-parallel TopK is compared with AuxK idle (no latent dies in 16 steps).
TOPK_DATA_PARALLEL = ["sae.variant=topk", "sae.k=8", "train.checkpoint_every=4"]
SHARDED_PAPER = ["train.checkpoint_every=4"]  # L1 1e-3, the paper's schedule compressed to 16 steps
PAPER_SAE, SHARDED_PAPER_SAE, TOPK_SAE = "paper_256_l1_3e-02", "paper_256_l1_1e-03", "topk_256_k8"


@pytest.fixture(scope="module")
def store_dir(pretrained_recipe, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("distributed_store")
    return harvest(load_recipe(None, [*TINY_PRETRAIN, f"workdir={workdir}", f"lm.path={pretrained_recipe.path('lm')}", *STORE]))


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "distributed.yaml"
    path.write_text("name: distributed\n")
    return path


@pytest.fixture(scope="module")
def overrides(pretrained_recipe, store_dir):
    def make(out: Path, *extra: str) -> list[str]:
        # A bank's entries set their sizes: TRAIN's sae.n_features beside them would be refused.
        train = TRAIN_FOR_BANK if any(e.startswith("train.bank=") for e in extra) else TRAIN
        return [*TINY_PRETRAIN, f"lm.path={pretrained_recipe.path('lm')}", *STORE, f"harvest.output_dir={store_dir}",
                *train, f"train.output_dir={out}", *extra]

    return make


def torchrun(recipe: Path, args: list[str], *, env: dict | None = None, restarts: int = 0, processes: int = 2,
             timeout: int = 240, entry: Path = HERE / "distributed_entry.py") -> subprocess.CompletedProcess:
    """`sae train` under torchrun with CPU processes (through tests/distributed_entry.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--max-restarts={restarts}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", str(entry),
               str(recipe), *args]
    # CPU and gloo, GPU or not; a rank that crashes (SIGSEGV, SIGABRT) prints its Python stacks
    full_env = os.environ | {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                             "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"} | (env or {})
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_entry(tmp_path: Path, patch: str, callback: str | None = None) -> Path:
    """A torchrun entry script: `patch` (source that patches the train stage to observe or
    inject something), then `sae train` with the command line's arguments; `callback`, the name
    of a Callback class `patch` defines, is put first among the Trainer's callbacks."""
    added = "" if callback is None else f"""
import framework.training.train as train_stage

_build_trainer = train_stage.build_trainer


def _build_with_callback(*args, **kwargs):
    trainer = _build_trainer(*args, **kwargs)
    trainer.callbacks.insert(0, {callback}())
    return trainer


train_stage.build_trainer = _build_with_callback
"""
    entry = tmp_path / "train_entry.py"
    # The collector off while the patch imports, as the `sae` program has it (program() enables it).
    entry.write_text("import gc\n\ngc.disable()\n" + patch + added +
                     '\nimport sys\n\nfrom framework.cli import program\n\nsys.exit(program(["train", *sys.argv[1:]]))\n')
    return entry


def succeeded(run: subprocess.CompletedProcess) -> bool:
    if run.returncode != 0:
        # Each distinct stderr line once: warnings repeated by every rank at every step would
        # otherwise push the cause of a crash out of what a CI log keeps.
        print(run.stdout[-5000:], "\n".join(dict.fromkeys(run.stderr.splitlines()))[-15000:])
    return run.returncode == 0


def repeated_warnings(run: subprocess.CompletedProcess, ranks: int = 2) -> dict[str, int]:
    """Warning lines a job printed more often than once per rank (Python prints a warning once
    per place unless something resets the warning filters, as a subprocess call does)."""
    lines = Counter(line for line in run.stderr.splitlines() if "Warning" in line or "deprecated" in line)
    return {line: count for line, count in lines.items() if count > ranks}


class _Concatenated(IterableDataset):
    def __init__(self, streams):
        self.streams = streams

    def __iter__(self):
        for parts in zip(*self.streams):
            yield tuple(torch.cat(tensors) for tensors in zip(*parts))


class ConcatenatedRanks(ActivationDataModule):
    """One process whose batch at each step is what ranks 0 and 1 of a 2-rank job read, in order."""

    def train_dataloader(self) -> DataLoader:
        half = self.rank_batch // 2
        seed = self.recipe.train.seed
        streams = [self._stream(0, rank, 2, seed, self.total_steps, half) for rank in (0, 1)]
        return DataLoader(_Concatenated(streams), batch_size=None)


@pytest.fixture(scope="module")
def reference(recipe_file, overrides, tmp_path_factory):
    """One-process runs, once per (recipe, data order), for every strategy to be compared with."""
    done: dict[tuple, Path] = {}

    def run(extra: tuple[str, ...], concatenated: bool) -> Path:
        if (extra, concatenated) not in done:
            out = tmp_path_factory.mktemp("reference")
            with pytest.MonkeyPatch.context() as patch:
                if concatenated:
                    patch.setattr(train_stage, "ActivationDataModule", ConcatenatedRanks)
                train_stage.train(load_recipe(recipe_file, overrides(out, *extra)))
            done[(extra, concatenated)] = out
        return done[(extra, concatenated)]

    return run


def assert_same_weights(a: Path, b: Path, name: str) -> None:
    mine, theirs = load_file(str(a / name / "sae.safetensors")), load_file(str(b / name / "sae.safetensors"))
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=TOLERANCE, msg=lambda m, key=key: f"{key}: {m}")


def adam_state_is_split_over_the_ranks(checkpoint: Path, decoder_shape: tuple[int, int]) -> bool:
    """Each rank saved its own part of the decoder's Adam moments (and no rank all of them)."""
    if (checkpoint / "checkpoint").is_dir():  # DeepSpeed: one optimizer-state file per rank
        return len(list((checkpoint / "checkpoint").glob("*optim_states.pt"))) == 2
    from torch.distributed.checkpoint import FileSystemReader

    moments = [meta for key, meta in FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata.items()
               if key.endswith(("exp_avg", "exp_avg_sq")) and tuple(meta.size) == decoder_shape]
    return len(moments) == 2 and all(len(meta.chunks) == 2 for meta in moments)


def resampled(out: Path, name: str) -> float:
    rows = list(csv.DictReader(open(out / "logs" / "csv" / "metrics.csv")))
    return sum(float(r[f"{name}/resampled"]) for r in rows if r.get(f"{name}/resampled"))


STRATEGIES = [
    pytest.param(["train.strategy=ddp"], PAPER, True, PAPER_SAE, id="ddp"),
    pytest.param(["train.strategy=fsdp"], PAPER, True, PAPER_SAE, id="fsdp"),
    pytest.param(["train.strategy=deepspeed", "train.deepspeed_stage=1"], PAPER, True, PAPER_SAE, id="zero1"),
    pytest.param(["train.strategy=deepspeed", "train.deepspeed_stage=2"], PAPER, True, PAPER_SAE, id="zero2"),
    pytest.param(["train.strategy=deepspeed", "train.deepspeed_stage=3"], PAPER, True, PAPER_SAE, id="zero3"),
    pytest.param(["train.strategy=feature_sharded"], SHARDED_PAPER, False, SHARDED_PAPER_SAE, id="feature_sharded-paper"),
    pytest.param(["train.strategy=feature_sharded"], TOPK, False, TOPK_SAE, id="feature_sharded-topk"),
    pytest.param(["train.strategy=fsdp"], TOPK_DATA_PARALLEL, True, TOPK_SAE, id="fsdp-topk"),
]


@pytest.mark.parametrize(("strategy", "sae", "concatenated", "name"), STRATEGIES)
def test_two_processes_give_the_weights_and_metrics_of_one_process_on_the_same_global_batches(
        strategy, sae, concatenated, name, recipe_file, overrides, reference, tmp_path):
    one = reference(tuple(sae), concatenated)
    two = tmp_path / "two"
    run = torchrun(recipe_file, overrides(two, *sae, *strategy))
    assert succeeded(run)
    assert not repeated_warnings(run)
    assert "shm_comm" not in run.stdout + run.stderr  # DeepSpeed on CPU: no shared-memory op built or loaded
    assert_same_weights(one, two, name)
    if strategy != ["train.strategy=ddp"]:
        assert adam_state_is_split_over_the_ranks(two / "checkpoints" / "last.ckpt", (256, 512))
    metrics_one = json.loads((one / name / "metrics.json").read_text())
    metrics_two = json.loads((two / name / "metrics.json").read_text())
    for key in ("fvu", "mse", "l0", "l1", "dead_fraction_heldout", "dead_fraction", "median_log10_density"):
        assert metrics_two[key] == pytest.approx(metrics_one[key], rel=1e-4, abs=1e-6), key
    if name != TOPK_SAE:
        assert resampled(two, name) == resampled(one, name) > 0


def test_two_processes_that_lightning_starts_itself_train_as_torchrun_ranks_do_and_only_the_first_evaluates(recipe_file, overrides, reference,
                                                                              tmp_path):
    """`sae run ... train.devices=2` without torchrun: Lightning starts the second process with
    LOCAL_RANK but no RANK (and no WORLD_SIZE once training is over). It took itself for rank 0:
    refused by its own job's lock on the output directory, and then (once let through) it ran
    eval beside the first process. It trains, and leaves the other stages to the first."""
    two = tmp_path / "two"
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-m", "framework.cli", "run", str(recipe_file),
                          *overrides(two, *PAPER, "train.strategy=ddp", "train.devices=2"), f"workdir={tmp_path}",
                          "run.stages=[train,eval]", "eval.n_contexts=4"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert succeeded(run)
    logged = run.stderr + run.stdout
    assert "MEMBER: 2/2" in logged and logged.count("evaluating paper_256") == 1
    assert_same_weights(reference(tuple(PAPER), True), two, PAPER_SAE)


def test_under_torchrun_stages_that_do_not_divide_their_work_run_on_rank_zero_alone(recipe_file, overrides, reference,
                                                                                    tmp_path):
    """`sae run` under torchrun: every rank runs the command; eval and export ran on every rank
    (each writing the same files through the same temporary names); now rank 0 does them and
    the other ranks wait for it, then finish."""
    trained = reference(tuple(PAPER), True)
    entry = tmp_path / "entry.py"
    entry.write_text('import sys\n\nfrom framework.cli import program\n\nsys.exit(program(["run", *sys.argv[1:]]))\n')
    run = torchrun(recipe_file, [*overrides(trained, *PAPER), f"workdir={tmp_path}", "eval.n_contexts=4",
                                 "run.stages=[train,eval,export]"], entry=entry)
    assert succeeded(run)
    logged = run.stdout + run.stderr
    assert logged.count("evaluating paper_256") == 1 and logged.count(f"exported {PAPER_SAE}") == 1
    assert (tmp_path / "eval" / "COMPLETE").is_file() and (tmp_path / "export" / "COMPLETE").is_file()
    assert logged.count("Done. Where everything went") == 1


# `sae train` under torchrun that prints, at the first step, whether each SAE's parameters are
# sharded again (FSDP2 swaps a module's parameters to DTensor shards when it reshards) once every
# forward of the bank has run and before the backward.
RECORD_RESHARDED = """
from torch.distributed.tensor import DTensor

from framework.training.module import SAEModule

original = SAEModule.training_step


def training_step(self, batch, batch_idx):
    loss = original(self, batch, batch_idx)
    if self.global_step == 0:
        for name, sae in self.saes.items():
            print(f"rank {self.global_rank} {name} sharded before backward: {isinstance(sae.W_enc, DTensor)}", flush=True)
    return loss


SAEModule.training_step = training_step
"""
BANK = [*PAPER, "train.bank=[{name: small, n_features: 128}, {name: large, n_features: 256}]"]


def test_an_fsdp_bank_holds_one_sae_whole_at_a_time_and_trains_as_one_process(recipe_file, overrides, reference, tmp_path):
    entry = train_entry(tmp_path, RECORD_RESHARDED)
    run = torchrun(recipe_file, overrides(tmp_path / "sae", *BANK, "train.strategy=fsdp"), entry=entry)
    assert succeeded(run)
    # Two ranks share the pipe: a line's text and its newline are separate writes, so lines may
    # run together ("...: Truerank 1 ..."); the pattern needs no line boundaries.
    found = re.findall(r"rank (\d) (small|large) sharded before backward: (True|False)", run.stdout)
    assert sorted(found) == [(r, name, "True") for r in "01" for name in ("large", "small")]
    one = reference(tuple(BANK), True)
    for name in ("small", "large"):
        assert_same_weights(one, tmp_path / "sae", name)


REPORT_THRESHOLDS = """
from lightning.pytorch.callbacks import Callback


class ReportThresholds(Callback):
    def on_train_end(self, trainer, module):
        for name, sae in module.saes.items():
            print(f"rank {trainer.global_rank} {name} threshold {sae.threshold.item()!r};", flush=True)
"""


def test_batchtopk_thresholds_agree_on_every_rank_under_fsdp(recipe_file, overrides, tmp_path):
    """Each rank updates BatchTopK's threshold from its own share of the batch; FSDP broadcasts
    no buffers, so without rank 0's being shared after each step the ranks ended apart."""
    entry = train_entry(tmp_path, REPORT_THRESHOLDS, callback="ReportThresholds")
    run = torchrun(recipe_file, overrides(tmp_path / "sae", "sae.variant=batchtopk", "sae.k=8",
                                          "train.strategy=fsdp"), entry=entry)
    assert succeeded(run)
    found = dict(re.findall(r"rank (\d) \S+ threshold ([-\d.e]+);", run.stdout))
    assert sorted(found) == ["0", "1"] and float(found["0"]) > 0 and found["0"] == found["1"], found


def test_feature_shards_combine_with_data_parallelism_on_a_two_by_two_mesh(recipe_file, overrides, reference, tmp_path):
    # 4 processes: ranks 0-1 hold the two halves of the features for the first half of each
    # global batch, ranks 2-3 for the second half.
    args = overrides(tmp_path / "sae", *SHARDED_PAPER, "train.strategy=feature_sharded", "train.feature_shards=2")
    assert succeeded(torchrun(recipe_file, args, processes=4))
    assert_same_weights(reference(tuple(SHARDED_PAPER), True), tmp_path / "sae", SHARDED_PAPER_SAE)


def test_a_feature_sharded_sae_computes_what_the_whole_sae_does_and_topk_selects_the_same_features(tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(HERE / "sharded_selection.py"), str(tmp_path / "out.json")],
                         env=os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                         capture_output=True, text=True, timeout=120)
    assert succeeded(run)
    results = json.loads((tmp_path / "out.json").read_text())
    assert set(results) == {"topk", "batchtopk", "paper", "april2024"}
    for variant, result in results.items():
        assert result["same_selection"], variant
        if variant in ("topk", "batchtopk"):
            assert result["selected"] == 64 * 6 and result["auxk_value"] > 0 and result["auxk"] < TOLERANCE, variant
        for key in ("reconstruction", "loss", "grad_W_dec", "grad_W_enc", "grad_b_dec"):
            assert result[key] < TOLERANCE, (variant, key, result[key])


def test_a_killed_rank_or_a_preempted_job_stops_with_a_report_and_reruns_resume_to_the_same_weights(
        recipe_file, overrides, reference, tmp_path):
    args = overrides(tmp_path / "sae", *PAPER, "train.strategy=ddp")
    start = time.monotonic()
    killed = torchrun(recipe_file, args, env={"SAE_TEST_FAULT": "kill:1:7"})
    assert killed.returncode != 0 and time.monotonic() - start < 120
    assert "SIGKILL" in killed.stderr and "injected fault: rank 1 kill at step 7" in killed.stdout
    assert re.search(r"rank 0 stopped at step \d+ \(", killed.stderr)  # the surviving rank says how to go on
    assert "The last checkpoint is kept" in killed.stderr
    assert (tmp_path / "sae" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "sae" / "COMPLETE").exists()

    # A cluster preempting the job sends SIGTERM to every rank: Lightning lets each finish its step
    # (12, whose checkpoint is written) and stops it with SystemExit, not an Exception; each rank
    # still says where the job resumes from.
    preempted = torchrun(recipe_file, args, env={"SAE_TEST_FAULT": "term:0:11,term:1:11"})
    assert preempted.returncode != 0 and "resuming the activation stream at step 4" in preempted.stderr
    assert "stopped by SIGTERM" in preempted.stderr
    assert re.findall(r"rank (\d) stopped at step 12 \(SIGTERM", preempted.stderr) in (["0", "1"], ["1", "0"])
    assert preempted.stderr.count("The last checkpoint is kept") == 2
    assert not (tmp_path / "sae" / "COMPLETE").exists()

    rerun = torchrun(recipe_file, args)
    assert succeeded(rerun) and "resuming the activation stream at step 12" in rerun.stderr
    assert_same_weights(reference(tuple(PAPER), True), tmp_path / "sae", PAPER_SAE)


# `sae train` under torchrun that prints each rank's fast-path choice (dense or sparse codes) when
# training starts; with SAE_TEST_CHOOSE set, the ranks choose differently just before the step-4
# checkpoint (rank 1 sparse, rank 0 dense: each rank chooses from its own part of the batch) and
# rank 0 dies after step 5.
CHOICES_PER_RANK = """
import os
import signal

from lightning.pytorch.callbacks import Callback


def chooser(module):
    sae = next(iter(module.saes.values()))
    return getattr(sae, "local", sae)  # under feature sharding, the rank's slice chooses


class Choices(Callback):
    def on_train_start(self, trainer, module):
        print(f"rank {trainer.global_rank} starts with sparse_codes={chooser(module).sparse_codes}", flush=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if not os.environ.get("SAE_TEST_CHOOSE"):
            return
        if trainer.global_step == 4:  # before the checkpoint callback saves step 4
            chooser(module).sparse_codes = trainer.global_rank == 1
        if trainer.global_step == 5 and trainer.global_rank == 0:
            print("injected fault: rank 0 killed after step 5", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("strategy", ["ddp", "feature_sharded"])
def test_a_resumed_run_gives_each_rank_back_its_own_fast_path_choice(recipe_file, overrides, tmp_path, strategy):
    # The checkpoint held rank 0's choice only, which every rank restored: a rank that had chosen
    # the other path took rank 0's for a step, the same math summed in another order. Under
    # feature sharding (each rank's slice chooses from its own features) nothing was kept at all.
    args = overrides(tmp_path / "sae", *(PAPER if strategy == "ddp" else SHARDED_PAPER), f"train.strategy={strategy}")
    entry = train_entry(tmp_path, CHOICES_PER_RANK, callback="Choices")
    killed = torchrun(recipe_file, args, entry=entry, env={"SAE_TEST_CHOOSE": "1"})
    assert killed.returncode != 0 and "injected fault: rank 0 killed after step 5" in killed.stdout
    rerun = torchrun(recipe_file, args, entry=entry)
    assert succeeded(rerun) and "resuming the activation stream at step 4" in rerun.stderr
    assert "rank 0 starts with sparse_codes=False" in rerun.stdout
    assert "rank 1 starts with sparse_codes=True" in rerun.stdout


def test_torchrun_restarts_a_killed_feature_sharded_job_from_its_last_checkpoint(
        recipe_file, overrides, reference, tmp_path):
    args = overrides(tmp_path / "sae", *SHARDED_PAPER, "train.strategy=feature_sharded")
    run = torchrun(recipe_file, args, env={"SAE_TEST_FAULT": "kill:1:7"}, restarts=1)
    assert succeeded(run)
    assert "injected fault: rank 1 kill at step 7" in run.stdout
    assert "resuming the activation stream at step 4" in run.stderr
    assert_same_weights(reference(tuple(SHARDED_PAPER), False), tmp_path / "sae", SHARDED_PAPER_SAE)


# `sae train` under torchrun in which rank 0 SIGKILLs itself while the step-8 last.ckpt is being
# written: after every rank's shards (torch.distributed.checkpoint), before Lightning's meta.pt.
KILLED_WRITING_LAST = """
import os
import signal
from pathlib import Path

import lightning.pytorch.strategies.model_parallel as model_parallel

original = model_parallel._distributed_checkpoint_save
saves = []


def save(state, path):
    original(state, path)
    if "last.ckpt" in Path(path).name:
        saves.append(path)
        if len(saves) == 2 and int(os.environ["RANK"]) == 0:
            print("injected fault: rank 0 killed writing last.ckpt", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


model_parallel._distributed_checkpoint_save = save
"""


# `sae train` under torchrun in which rank 0 SIGKILLs itself while the first last.ckpt it replaces
# is being removed to make way for the next: the directory's torch.distributed.checkpoint index (.metadata)
# is gone, its shards and Lightning's meta.pt not yet (shutil.rmtree removes one file at a time).
KILLED_REMOVING_LAST = """
import os
import shutil
import signal
from pathlib import Path

import framework.training.train as train_stage

original = shutil.rmtree


class Shutil:
    def rmtree(self, path, *args, **kwargs):
        path = Path(path)
        if "last.ckpt" in path.name and not path.name.endswith(".partial") and (path / ".metadata").is_file():
            (path / ".metadata").unlink()
            print("injected fault: rank 0 killed removing last.ckpt", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, *args, **kwargs)


train_stage.shutil = Shutil()
"""


def test_jobs_killed_while_replacing_a_directory_checkpoint_resume_to_the_same_weights(
        recipe_file, overrides, reference, tmp_path):
    args = overrides(tmp_path / "sae", *PAPER, "train.strategy=fsdp")
    # A sharded last.ckpt was rewritten in place: killed there, it held step 8's shards beside
    # step 4's meta.pt, and the rerun resumed step 4's loop with step 8's weights (max weight
    # difference 0.5 from the uninterrupted run), without a word. step-8.ckpt, written just
    # before, is whole: the rerun resumes from it, not from step 4's last.ckpt.
    killed = torchrun(recipe_file, args, entry=train_entry(tmp_path, KILLED_WRITING_LAST))
    assert killed.returncode != 0 and "injected fault: rank 0 killed writing last.ckpt" in killed.stdout
    # The old sharded last.ckpt was deleted in place, file by file, before the new one was renamed
    # over it: killed in between (step 8's last.ckpt making way for step 12's), last.ckpt was a
    # directory with meta.pt but without part of its shards, which the rerun took for the
    # checkpoint to resume from and failed to load.
    killed = torchrun(recipe_file, args, entry=train_entry(tmp_path, KILLED_REMOVING_LAST))
    assert killed.returncode != 0 and "resuming the activation stream at step 8" in killed.stderr
    assert "injected fault: rank 0 killed removing last.ckpt" in killed.stdout
    rerun = torchrun(recipe_file, args)
    assert succeeded(rerun) and "resuming the activation stream at step 12" in rerun.stderr
    assert_same_weights(reference(tuple(PAPER), True), tmp_path / "sae", PAPER_SAE)
    assert not list((tmp_path / "sae" / "checkpoints").glob(".*"))  # nothing partial or half-removed left


def test_a_rank_that_stops_answering_fails_the_job_after_the_timeout_instead_of_hanging(
        recipe_file, overrides, tmp_path):
    args = overrides(tmp_path / "sae", *PAPER, "train.strategy=ddp")
    start = time.monotonic()
    run = torchrun(recipe_file, args, env={"SAE_TEST_FAULT": "hang:1:7", "SAE_DIST_TIMEOUT_S": "10"})
    assert run.returncode != 0 and time.monotonic() - start < 120
    assert "timeout" in run.stderr.lower() and "SAE_DIST_TIMEOUT_S=10" in run.stderr


# `sae train` under torchrun in which one rank writes a NaN into its own ZeRO-3 partition of the
# first SAE's W_enc (DeepSpeed's fp32 master, the copy Adam steps) just before an optimizer step:
# the NaN then reaches that rank's partition of the module's weights and no other rank's.
NAN_IN_ONE_PARTITION = """
import os

from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param
from lightning.pytorch.callbacks import Callback

RANK, STEP = (int(v) for v in os.environ["SAE_TEST_NAN"].split(":"))


class NaNInPartition(Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_rank != RANK or trainer.global_step != STEP:
            return
        param = next(iter(module.saes.values())).W_enc
        assert param.numel() == 0 and param.ds_tensor.numel() > 0, "expected a ZeRO-3 partitioned parameter"
        local = safe_get_local_fp32_param(param).clone()
        local[-1] = float("nan")
        safe_set_local_fp32_param(param, local)
        print(f"injected fault: rank {RANK} nan in its W_enc partition at step {STEP}", flush=True)
"""


def test_a_nan_in_one_ranks_zero3_weight_partition_stops_every_rank_with_the_training_error(
        recipe_file, overrides, tmp_path):
    # Under ZeRO-3 a rank's module parameters are empty placeholders outside gathers; the weight
    # check must read each rank's own partition, and sum the count over the ranks so that rank 0,
    # whose partition is clean, stops at the same step with the same error instead of hanging.
    entry = train_entry(tmp_path, NAN_IN_ONE_PARTITION, callback="NaNInPartition")
    args = overrides(tmp_path / "sae", *SHARDED_PAPER, "train.strategy=deepspeed", "train.deepspeed_stage=3")
    start = time.monotonic()
    run = torchrun(recipe_file, args, entry=entry, timeout=300,
                   env={"SAE_TEST_NAN": "1:6", "DS_ACCELERATOR": "cpu", "SAE_DIST_TIMEOUT_S": "60"})
    elapsed = time.monotonic() - start
    assert run.returncode != 0, run.stderr[-5000:]
    assert "injected fault: rank 1 nan in its W_enc partition at step 6" in run.stdout
    error = (rf"SAE '{SHARDED_PAPER_SAE}': weights became non-finite \(nan/inf\) at step 6; training stopped\. "
             rf"The last good checkpoint is kept: \S*checkpoints/last\.ckpt")
    for rank in (0, 1):  # each rank raised the TrainingError itself (none was killed or timed out)
        assert re.search(rf"rank {rank} stopped at step \d+ \(TrainingError: {error}", run.stderr), run.stderr[-8000:]
    assert elapsed < 240
    assert (tmp_path / "sae" / "checkpoints" / "last.ckpt").is_dir()
    assert not (tmp_path / "sae" / "COMPLETE").exists()


def test_a_nan_loss_on_one_ddp_rank_stops_every_rank_with_the_training_error(recipe_file, overrides, tmp_path):
    # Only rank 1's loss is nan. Had it stopped alone in training_step, rank 0 would fail in the
    # gradient all-reduce (gloo) or wait there until the process-group timeout (NCCL); the check
    # is collective instead.
    args = overrides(tmp_path / "sae", *PAPER, "train.strategy=ddp")
    start = time.monotonic()
    run = torchrun(recipe_file, args, timeout=300, env={"SAE_TEST_FAULT": "nan:1:5", "SAE_DIST_TIMEOUT_S": "60"})
    elapsed = time.monotonic() - start
    assert run.returncode != 0, run.stderr[-5000:]
    assert "injected fault: rank 1 nan at step 5" in run.stdout
    for rank, value in ((0, "not finite on another rank"), (1, "nan")):
        error = (rf"SAE '{PAPER_SAE}': loss is {value} at step 5; training stopped\. "
                 rf"The last good checkpoint is kept: \S*checkpoints/last\.ckpt")
        assert re.search(rf"rank {rank} stopped at step \d+ \(TrainingError: {error}", run.stderr), run.stderr[-8000:]
    assert elapsed < 50, elapsed  # well within SAE_DIST_TIMEOUT_S: no rank waited for the other
    assert not (tmp_path / "sae" / "COMPLETE").exists()


def test_a_checkpoint_is_refused_under_a_strategy_that_lays_out_parameters_differently(
        recipe_file, overrides, reference):
    one = reference(tuple(SHARDED_PAPER), False)
    recipe = load_recipe(recipe_file, overrides(one, *SHARDED_PAPER, "train.strategy=fsdp"))
    with pytest.raises(CheckpointError, match=r"laid out as 'replicated'.*train.strategy=fsdp"):
        train_stage.check_checkpoint(one / "checkpoints" / "last.ckpt", recipe)


def test_a_checkpoint_is_refused_by_another_number_of_data_parallel_ranks(recipe_file, overrides, reference,
                                                                          monkeypatch):
    """Each rank resumes the stream in its own slice of the shards: one process's checkpoint
    resumed by two DDP ranks would repeat some rows and skip others."""
    one = reference(tuple(SHARDED_PAPER), False)
    recipe = load_recipe(recipe_file, overrides(one, *SHARDED_PAPER, "train.strategy=ddp"))
    train_stage.check_checkpoint(one / "checkpoints" / "last.ckpt", recipe)  # one rank: as written
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CheckpointError, match=r"written by 1 data-parallel ranks, and this run has 2.*Resume with 1"):
        train_stage.check_checkpoint(one / "checkpoints" / "last.ckpt", recipe)


@pytest.mark.parametrize(("extra", "message"), [
    (["sae.variant=jumprelu"], r"supports sae.variant paper, april2024, topk, batchtopk; 'jumprelu'"),
    (["sae.n_features=255"], r"n_features=255 .* does not split over 2 feature shards"),
])
def test_feature_sharding_refuses_an_sae_it_cannot_split_before_training(extra, message, recipe_file, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = load_recipe(recipe_file, ["train.strategy=feature_sharded", *extra])
    with pytest.raises(RecipeError, match=message):
        trainer_arguments(recipe)


@pytest.mark.parametrize("strategy", ["auto", "ddp", "deepspeed"])
def test_a_process_of_a_two_machine_torchrun_launch_gets_the_trainer_lightning_accepts(strategy, recipe_file,
                                                                                        monkeypatch):
    """Node 0 of `torchrun --nnodes 2 --nproc_per_node 2` (launch/slurm.sbatch): Lightning was
    told num_nodes=1 and its launcher refused devices=2 x num_nodes=1 against a world of 4."""
    import lightning as L

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key, value in dict(TORCHELASTIC_RUN_ID="test", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", RANK="0",
                           LOCAL_RANK="0", GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999").items():
        monkeypatch.setenv(key, value)
    recipe = load_recipe(recipe_file, [f"train.strategy={strategy}"])
    arguments = trainer_arguments(recipe)
    assert (arguments["devices"], arguments["num_nodes"]) == (2, 2)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, **arguments)
    if trainer.strategy.launcher is not None:
        trainer.strategy.launcher.launch(lambda: None)  # checks devices x num_nodes against the world
    with pytest.raises(RecipeError, match=r"train.num_nodes=3, but torchrun started 2 machine\(s\) of 2"):
        trainer_arguments(load_recipe(recipe_file, ["train.num_nodes=3"]))


# `sae train` under torchrun that prints, on every rank, the size of every SAE built with storage
# (an SAE built on the meta device holds none).
RECORD_MATERIALISED = """
import torch.distributed as dist

from framework.sae.base import SAE

original = SAE.__init__


def recording(self, d_in, cfg):
    original(self, d_in, cfg)
    if not self.W_enc.is_meta:
        rank = dist.get_rank() if dist.is_initialized() else -1
        print(f"materialised on rank {rank}: {cfg.n_features} features", flush=True)


SAE.__init__ = recording
"""


def test_a_16384_feature_sae_trains_sharded_over_two_processes_and_no_rank_holds_it_whole(
        recipe_file, overrides, tmp_path):
    entry = train_entry(tmp_path, RECORD_MATERIALISED)
    args = overrides(tmp_path / "sae", "train.strategy=feature_sharded", "sae.variant=topk", "sae.k=32",
                     "sae.n_features=16384", "sae.init=transpose", "sae.init_target_l0=0", "train.batch_size=1024",
                     "train.n_tokens=4096", "train.eval_batches=1")
    run = torchrun(recipe_file, args, entry=entry)
    assert succeeded(run)
    # Each rank materialised its own half only (the export on rank 0 loads gathered tensors into
    # SAEs built on the meta device).
    assert sorted(re.findall(r"materialised on rank (-?\d+): (\d+) features", run.stdout)) == [("0", "8192"), ("1", "8192")]
    name = "topk_16384_k32"
    weights = load_file(str(tmp_path / "sae" / name / "sae.safetensors"))
    assert weights["W_dec"].shape == (16384, 512) and weights["W_enc"].shape == (512, 16384)
    torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.ones(16384), rtol=0, atol=1e-5)
    # The halves drawn on each rank, gathered, are the init of the whole dictionary.
    recipe = load_recipe(recipe_file, args)
    whole = build_sae(512, recipe.sae_configs()[0])
    init = load_file(str(tmp_path / "sae" / name / "init_decoder.safetensors"))["W_dec"]
    assert torch.equal(init, whole.W_dec.detach())
    metrics = json.loads((tmp_path / "sae" / name / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0 < metrics["fvu"] < 1 and metrics["l0"] <= 32


GPU = {"CUDA_VISIBLE_DEVICES": "0"}


@pytest.fixture(scope="module")
def single_gpu_run(recipe_file, overrides, tmp_path_factory) -> Path:
    """The plain single-device run on the first GPU, once for every strategy compared with it."""
    out = tmp_path_factory.mktemp("single_gpu")
    assert succeeded(torchrun(recipe_file, overrides(out, *SHARDED_PAPER), env=GPU, processes=1))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", [
    ["train.strategy=ddp"], ["train.strategy=fsdp"], ["train.strategy=feature_sharded"],
    ["train.strategy=deepspeed", "train.deepspeed_stage=1"], ["train.strategy=deepspeed", "train.deepspeed_stage=2"],
    ["train.strategy=deepspeed", "train.deepspeed_stage=3"],
], ids=["ddp", "fsdp", "feature_sharded", "zero1", "zero2", "zero3"])
def test_each_strategy_trains_on_one_gpu_as_a_single_device_run_does(strategy, single_gpu_run, recipe_file,
                                                                      overrides, tmp_path):
    """The CUDA paths (NCCL, Lightning's own DeepSpeedStrategy): one process on the first GPU."""
    run = torchrun(recipe_file, overrides(tmp_path / "strategy", *SHARDED_PAPER, *strategy), env=GPU, processes=1)
    assert succeeded(run)
    assert_same_weights(single_gpu_run, tmp_path / "strategy", SHARDED_PAPER_SAE)
