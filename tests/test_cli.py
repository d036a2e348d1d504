"""The `sae` command itself: output-directory locks, argument parsing, interrupts."""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

import framework.cli as cli
from framework.cli import _written_dirs, main
from framework.config import load_recipe
from framework.locks import LockedError, lock_path, output_locks

ROOT = Path(__file__).resolve().parents[1]


def sae(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """`sae ARGS` in a fresh process, with this checkout's framework."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "framework.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=environ, cwd=ROOT)


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: locked\nworkdir: {tmp_path / 'run'}\n")
    return path


def test_a_second_process_writing_the_same_directory_is_refused_naming_it_and_the_holder(recipe_file, tmp_path):
    export_dir = tmp_path / "run" / "export"
    with output_locks([export_dir], "export"):
        result = sae("export", str(recipe_file))
    assert result.returncode == 2, result.stderr
    assert f"{export_dir} is being written by another sae process (pid {os.getpid()}" in result.stderr
    assert "Wait for it to finish" in result.stderr and "Traceback" not in result.stderr
    # Released: the same command now reaches the stage (which has nothing trained to export).
    result = sae("export", str(recipe_file))
    assert result.returncode == 2 and "another sae process" not in result.stderr
    assert "sae train" in result.stderr


def test_sae_run_locks_every_directory_it_writes(recipe_file, tmp_path):
    with output_locks([tmp_path / "run" / "sae"], "train"):
        result = sae("run", str(recipe_file), "lm.name=builtin")
    assert result.returncode == 2 and f"{tmp_path / 'run' / 'sae'} is being written" in result.stderr


def sweep_file(tmp_path: Path) -> Path:
    """A sweep over sae.* keys on the built-in LM; its text source matches no file, so pretraining
    the shared LM fails at once, naming text.source, when nothing stops it first."""
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: locked\nworkdir: {tmp_path / 'run'}\ntext: {{source: '{tmp_path}/none/*.txt'}}\n"
                    "sweep:\n  grid: {sae.l1_coefficient: [0.001, 0.002]}\n")
    return path


@pytest.mark.parametrize("shared", ["lm", "activations"])
def test_sae_sweep_locks_the_shared_lm_and_store_it_writes(shared, tmp_path):
    # The sweep pretrains and harvests the base recipe's LM and store, outside {workdir}/sweep:
    # a `sae run` or `sae harvest` writing them at the same time is not to be written over.
    with output_locks([tmp_path / "run" / shared], "harvest"):
        result = sae("sweep", str(sweep_file(tmp_path)))
    assert result.returncode == 2, result.stderr
    assert f"{tmp_path / 'run' / shared} is being written by another sae process (pid {os.getpid()}" in result.stderr


def test_sweep_point_tasks_wait_for_the_shared_lm_rather_than_write_it_at_once(tmp_path):
    # One SLURM array task per point: the first makes the shared LM, the others wait for it.
    lm = tmp_path / "run" / "lm"
    with output_locks([lm], "sweep"):
        task = subprocess.Popen([sys.executable, "-m", "framework.cli", "sweep", str(sweep_file(tmp_path)), "--point", "1"],
                                stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            waiting = next((line for line in task.stderr if "waiting for another sae process" in line), "")
            assert f"(pid {os.getpid()}, `sae sweep`) to finish writing {lm}" in waiting
            assert task.poll() is None and not lm.exists()  # it waits, and has written nothing
        except BaseException:
            task.kill()
            raise
    # Released: the task goes on to pretrain the shared LM itself (which fails here on the text).
    _, err = task.communicate(timeout=120)
    assert task.returncode == 2 and "matches no .txt/.jsonl/.parquet files" in err, err


def test_sae_sweep_point_locks_its_point_directory_not_the_sweep_directory(tmp_path):
    recipe = tmp_path / "sweep.yaml"
    # No shared work before the points (an LM that is not pretrained, live activations) and a
    # point stage that fails at once, with nothing trained: what is checked is who gets that far.
    recipe.write_text(f"name: swept\nworkdir: {tmp_path / 'run'}\nlm: {{name: smollm2}}\n"
                      "harvest: {mode: live}\n"
                      "sweep: {grid: {sae.l1_coefficient: [0.001, 0.002]}, stages: [export]}\n")
    sweep_dir = tmp_path / "run" / "sweep"
    with output_locks([sweep_dir / "l1_coefficient=0p001"], "sweep"):
        same = sae("sweep", str(recipe), "--point", "0")
        other = sae("sweep", str(recipe), "--point", "1")
    assert same.returncode == 2
    assert f"{sweep_dir / 'l1_coefficient=0p001'} is being written by another sae process" in same.stderr
    assert other.returncode == 2 and "another sae process" not in other.stderr, other.stderr
    assert "l1_coefficient=0p002/sae; run `sae train RECIPE` first" in other.stderr  # it ran its point
    with output_locks([sweep_dir], "sweep"):  # the sweep directory alone: other points' tasks share it
        result = sae("sweep", str(recipe), "--point", "0")
    assert result.returncode == 2 and "another sae process" not in result.stderr, result.stderr
    whole_sweep = _written_dirs("sweep", load_recipe(recipe), argparse.Namespace(point=None))
    assert sweep_dir / "l1_coefficient=0p002" in whole_sweep
    with output_locks(whole_sweep, "sweep"):  # a whole sweep also writes every point's directory
        result = sae("sweep", str(recipe), "--point", "1")
    assert result.returncode == 2 and "is being written by another sae process" in result.stderr, result.stderr
    result = sae("sweep", str(recipe), "--point", "2")
    assert result.returncode == 2 and "--point 2 is out of range: the sweep has 2 points" in result.stderr


def test_sae_pretrain_of_a_ready_made_lm_writes_and_locks_nothing(recipe_file, tmp_path):
    # Only the built-in LM is pretrained; for another, `sae pretrain` says so and writes nothing,
    # so a process writing lm/ does not stop it.
    with output_locks([tmp_path / "run" / "lm"], "pretrain"):
        result = sae("pretrain", str(recipe_file), "lm.name=smollm2")
    assert result.returncode == 0 and "nothing to pretrain" in result.stdout, result.stderr
    assert not (tmp_path / "run" / "lm").exists()


def test_lock_is_released_when_its_holder_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from framework.locks import output_locks\n"
         f"with output_locks([__import__('pathlib').Path({str(tmp_path)!r})], 'train'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"pid {holder.pid}, `sae train`"):
            with output_locks([tmp_path], "train"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_locks([tmp_path / "out"], "train"):
        assert lock_path(tmp_path / "out").is_file()
        assert not (tmp_path / "out").exists()  # the stage's to create: a refused stage leaves none


def test_only_global_rank_zero_locks(tmp_path, monkeypatch):
    with output_locks([tmp_path], "train"):
        monkeypatch.setenv("RANK", "1")
        with output_locks([tmp_path], "train"):  # another rank of the same job
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(LockedError):
            with output_locks([tmp_path], "train"):
                pass


def interrupt_during_stage(monkeypatch, how: str) -> None:
    import framework.cli as cli

    def stage(*_):
        if how == "harvest":  # a KeyboardInterrupt straight from the stage
            raise KeyboardInterrupt
        try:  # Lightning's graceful shutdown after Ctrl-C in trainer.fit
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)

    monkeypatch.setattr(cli, "_call_stage", stage)


@pytest.mark.parametrize("how", ["harvest", "train"])
def test_ctrl_c_exits_130_with_one_line_saying_how_to_resume(how, recipe_file, monkeypatch, capsys):
    interrupt_during_stage(monkeypatch, how)
    assert main([how, str(recipe_file)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"sae {how}: interrupted; re-run the same command to resume"


@pytest.mark.parametrize("argv, expected", [
    (["harvest", "r.yaml", "--verify", "workdir=x"], {"verify": True, "overrides": ["workdir=x"]}),
    (["sweep", "r.yaml", "--point", "0", "a=1"], {"point": 0, "overrides": ["a=1"]}),
    (["sweep", "r.yaml", "a=1", "--point", "2", "b=2"], {"point": 2, "overrides": ["a=1", "b=2"]}),
    (["-v", "eval", "r.yaml"], {"verbose": True, "overrides": []}),
])
def test_flags_may_come_before_between_or_after_overrides(argv, expected):
    from framework.cli import build_parser

    args = vars(build_parser().parse_args(argv))
    assert args["recipe"] == "r.yaml" and {k: args[k] for k in expected} == expected


def test_usage_without_a_recipe_names_only_the_recipe_as_required(capsys):
    from framework.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval"])
    err = capsys.readouterr().err
    assert "required: recipe" in err and "key=value" not in err.split("error:")[1]


@pytest.mark.parametrize("argv, flags", [
    (["train", "r.yaml", "--bogus"], "-h/--help; recipe overrides are key=value"),
    (["harvest", "r.yaml", "a=1", "--bogus"], "-h/--help, --verify; recipe overrides are key=value"),
    (["hooks", "smollm2", "--bogus"], "-h/--help)"),
])
def test_an_unknown_flag_after_a_stage_is_reported_by_that_stage_with_its_flags(argv, flags, capsys):
    from framework.cli import build_parser

    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    stage = argv[0]
    assert f"usage: sae {stage} [-h]" in err
    assert f"sae {stage}: error: unrecognized arguments: --bogus (the flags of sae {stage}: {flags}" in err
    assert "sae: error" not in err


# A stand-in stage module: whether the garbage collector runs while it is imported, and while
# its stage function runs (and how many objects are frozen by then).
STAND_IN_STAGE = """
import gc

SEEN = {"at_import": gc.isenabled()}


def stage(recipe):
    SEEN.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count())
"""


def test_the_sae_program_imports_without_collections_and_collects_while_the_stage_runs(
        recipe_file, tmp_path, monkeypatch):
    (tmp_path / "stand_in_stage.py").write_text(STAND_IN_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.STAGES, "export", ("stand_in_stage", "stage", cli.STAGES["export"][2]))
    monkeypatch.setattr(cli, "_as_program", False)  # program() sets it; put back for in-process callers
    try:
        assert cli.program(["export", str(recipe_file)]) == 0
        seen = sys.modules["stand_in_stage"].SEEN
        # Imports build millions of objects (torch's, Lightning's): no collections while they do;
        # what exists after them is frozen, and the stage's own objects are collected.
        assert seen == {"at_import": False, "enabled": True, "frozen": seen["frozen"]} and seen["frozen"] > 0
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
        sys.modules.pop("stand_in_stage", None)
    # main, for in-process callers, leaves the collector alone.
    monkeypatch.setattr(cli, "_as_program", False)
    gc.disable()
    try:
        assert main(["export", str(recipe_file)]) == 0
        assert sys.modules["stand_in_stage"].SEEN == {"at_import": False, "enabled": False, "frozen": 0}
    finally:
        gc.enable()
        sys.modules.pop("stand_in_stage", None)


def test_a_path_the_machine_refuses_or_a_full_disk_is_one_line_not_a_traceback(recipe_file, tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["pretrain", str(recipe_file), f"lm.path={tmp_path / 'a-file' / 'lm'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sae pretrain: error: Not a directory: {tmp_path / 'a-file' / 'lm'}. Where it is an output")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

    def disk_full(*_args):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "sae" / "checkpoints"))

    monkeypatch.setattr(cli, "_call_stage", disk_full)
    assert main(["train", str(recipe_file)]) == 2
    assert "the disk is full (or a size limit reached) writing " in capsys.readouterr().err

    def a_bug(*_args):
        raise FileNotFoundError(2, "No such file or directory", "a file the code should have made")

    monkeypatch.setattr(cli, "_call_stage", a_bug)
    with pytest.raises(FileNotFoundError):  # not the machine's refusal: the traceback shows where
        main(["train", str(recipe_file)])


def test_a_resumed_progress_takes_its_rate_from_this_runs_work_alone(monkeypatch, caplog):
    """An analysis resumed at batch 900 of 1,000 reported 900 batches in its first second as its
    rate, and an ETA of a fraction of a second."""
    import logging

    import framework.progress as progress_module

    clock = iter([0.0, 10.0, 10.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    progress = progress_module.Progress("analyze", 1000, unit="batches", already=900)
    with caplog.at_level(logging.INFO, logger="framework.progress"):
        progress.update(10)  # 10 batches in 10 s
    assert progress.rate() == 1.0
    assert "910/1,000 batches (91%), 1 batches/s, ETA 90s" in caplog.text


def test_a_rank_waiting_for_a_rank_zero_stage_goes_on_at_its_call_or_a_later_one(tmp_path, monkeypatch):
    """A bank sweep analyses each SAE in turn: rank 0 can finish the second before another rank
    looks for the first, which then waited forever for a done file that said exactly "#1"."""
    import framework.distributed as distributed

    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job-7",
                        "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    done = tmp_path / ".analyze.rank0-done"
    done.write_text(f"{distributed._job_attempt()}#2")
    for _ in range(2):  # its first and second call: rank 0 has finished both; neither runs the work here
        assert distributed.on_rank_zero("analyze", tmp_path, lambda: 1 / 0) is None
    assert distributed._finished_calls(done, distributed._job_attempt()) == 2
    done.write_text("another-job/0/node0/29500#5")  # an earlier job's file counts for nothing
    assert distributed._finished_calls(done, distributed._job_attempt()) == 0


def test_the_program_ends_its_process_group_before_the_interpreter_exits(tmp_path):
    """Left to the exit, gloo's threads now and then aborted a rank that had finished its work
    (SIGABRT, "terminate called without an active exception")."""
    script = f"""
import torch.distributed as dist
import framework.cli as cli
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
cli.main = lambda argv: 0  # a stage that finished
assert cli.program([]) == 0
print("initialized after the program:", dist.is_initialized())
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(cli.__file__).parents[1])
    assert run.returncode == 0, run.stderr
    assert "initialized after the program: False" in run.stdout
