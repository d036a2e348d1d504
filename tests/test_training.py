"""SAE training through a real Lightning Trainer on real shards: outputs, resume, refusals."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRETRAIN, copy_lm_with_other_weights, inject
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

import framework.training.train as train_stage
from framework.activations.harvest import harvest
from framework.config import load_recipe, save_recipe
from framework.errors import CheckpointError, DataError, RecipeError, TrainingError

STORE = [
    "harvest.n_tokens=16384",
    "harvest.tokens_per_context=32",
    "harvest.shuffle_window=4096",
    "harvest.rows_per_shard=2048",
    "harvest.rows_per_sample=512",
    "harvest.heldout_tokens=2048",
    "harvest.dtype=float32",
]
TRAIN = [
    "sae.n_features=256",
    "sae.init=data",
    "sae.init_target_l0=10",
    "sae.l1_coefficient=1e-3",
    "train.n_tokens=8192",
    "train.batch_size=512",
    "train.lr=3e-3",
    "train.log_every=2",
    "train.density_window=4",
    "train.resample_sample_size=2048",
    "train.eval_batches=2",
    "train.wandb.mode=disabled",
]


@pytest.fixture(scope="module")
def store_dir(pretrained_recipe, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("train_store")
    recipe = load_recipe(None, [*TINY_PRETRAIN, f"workdir={workdir}", f"lm.path={pretrained_recipe.path('lm')}", *STORE])
    return harvest(recipe)


def make_recipe(pretrained_recipe, store_dir: Path, out: Path, *extra: str, train: tuple[str, ...] = tuple(TRAIN)):
    return load_recipe(None, [*TINY_PRETRAIN, f"lm.path={pretrained_recipe.path('lm')}", *STORE,
                              f"harvest.output_dir={store_dir}", f"train.output_dir={out}", *train, *extra])


# For a bank whose entries set their sizes: an sae.n_features override beside them reaches no SAE
# and is refused.
TRAIN_FOR_BANK = tuple(t for t in TRAIN if not t.startswith("sae.n_features="))


class CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected crash at step {self.step}")


def weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / name / "sae.safetensors"))


def test_training_writes_the_sae_metrics_plots_and_report(pretrained_recipe, store_dir, tmp_path):
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae")
    out = train_stage.train(recipe)
    name = recipe.sae_configs()[0].name
    metrics = json.loads((out / name / "metrics.json").read_text())
    assert metrics["steps"] == 16 and metrics["tokens"] == 8192
    for key in ("l0", "fvu", "mse", "dead_fraction", "moved_fraction", "median_log10_density"):
        assert key in metrics
    assert 0 < metrics["fvu"] < 1 and 0 < metrics["l0"] < 256
    for path in (out / "report.md", out / "training_curves.png", out / name / "density.png", out / "COMPLETE",
                 out / "recipe.yaml", out / "checkpoints" / "last.ckpt"):
        assert path.is_file(), path
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt", "step-16.ckpt"]
    assert "moved from init" in (out / "report.md").read_text()
    w = weights(out, name)
    assert torch.allclose(w["W_dec"].norm(dim=1), torch.ones(256), atol=1e-5)  # the paper's constraint


def test_training_lowers_the_loss(pretrained_recipe, store_dir, tmp_path):
    import csv

    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.log_every=1")
    out = train_stage.train(recipe)
    name = recipe.sae_configs()[0].name
    rows = list(csv.DictReader(open(out / "logs" / "csv" / "metrics.csv")))
    mse = [float(r[f"{name}/mse"]) for r in rows if r.get(f"{name}/mse")]
    assert mse[-1] < 0.7 * mse[0]


def test_training_logs_its_metrics_at_their_own_steps_and_prints_progress_off_a_terminal(pretrained_recipe, store_dir, tmp_path, caplog):
    import csv
    import logging

    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.log_every=4",
                         "train.lr_warmup_steps=16")
    with caplog.at_level(logging.INFO, logger="framework.training.callbacks"):
        out = train_stage.train(recipe)  # pytest's stderr is no terminal: the progress line is logged
    rows = list(csv.DictReader(open(out / "logs" / "csv" / "metrics.csv")))
    logged = {int(r["step"]): float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")}
    # every 4 steps of 16; the first window starts at the second batch (a step's time is measured
    # from one batch's start to the next one's)
    assert sorted(logged) == [3, 7, 11, 15], logged
    assert all(value > 0 for value in logged.values())
    # The SAE's metrics are written at the same steps, each with its own step's values: with the
    # learning rate warming up over all 16 steps, step s trained at lr 3e-3 * (s + 1) / 16.
    name = recipe.sae_configs()[0].name
    lrs = {int(r["step"]): float(r[f"{name}/lr"]) for r in rows if r.get(f"{name}/lr")}
    assert sorted(lrs) == [3, 7, 11, 15], lrs
    assert all(abs(lr - 3e-3 * (step + 1) / 16) < 1e-9 for step, lr in lrs.items()), lrs
    # one row per logged step, holding the module's metrics and the callbacks' together
    assert len([r for r in rows if r.get("train/tokens_per_s")]) == 4
    assert all(r.get(f"{name}/lr") for r in rows if r.get("train/tokens_per_s"))
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    assert progress and progress[-1].startswith("train: 8,192/8,192 tokens (100%)"), progress


def test_sae_train_prints_each_lightning_line_once(pretrained_recipe, store_dir, tmp_path):
    """Lightning's logger prints through its own handler and also propagates to the root logger
    that the CLI sets up: every line came out twice."""
    recipe_file = save_recipe(make_recipe(pretrained_recipe, store_dir, tmp_path / "sae"), tmp_path / "recipe")
    run = subprocess.run([sys.executable, "-m", "framework.cli", "train", str(recipe_file)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("GPU available:") == 1, run.stderr[-3000:]
    assert run.stderr.count("`Trainer.fit` stopped") == 1, run.stderr[-3000:]
    assert "framework.training.callbacks: train: 8,192/8,192 tokens (100%)" in run.stderr  # our own lines stay


def whole_and_crashed_at_8(pretrained_recipe, store_dir, tmp_path, monkeypatch):
    """A run trained to the end, and the same recipe crashed at step 8 after a checkpoint at 6."""
    extra = ("train.checkpoint_every=6",)
    whole = make_recipe(pretrained_recipe, store_dir, tmp_path / "whole", *extra)
    train_stage.train(whole)
    broken = make_recipe(pretrained_recipe, store_dir, tmp_path / "broken", *extra)
    with monkeypatch.context() as patch:
        inject(patch, CrashAt(8))
        with pytest.raises(RuntimeError, match="injected crash"):
            train_stage.train(broken)
    return whole, broken


def test_resumed_training_equals_an_uninterrupted_run(pretrained_recipe, store_dir, tmp_path, monkeypatch):
    whole, broken = whole_and_crashed_at_8(pretrained_recipe, store_dir, tmp_path, monkeypatch)
    assert sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir()) == ["last.ckpt", "step-6.ckpt"]
    assert not (tmp_path / "broken" / "COMPLETE").exists()
    train_stage.train(broken)  # resumes from step 6
    assert sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir()) == ["last.ckpt", "step-12.ckpt"]

    name = whole.sae_configs()[0].name
    a, b = weights(tmp_path / "whole", name), weights(tmp_path / "broken", name)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # The CSV log keeps the rows logged before the crash (Lightning's logger deleted them), and
    # the rows the resumed run logged again are there once.
    logged = [[r["step"] for r in csv.DictReader(open(out / "logs" / "csv" / "metrics.csv")) if r.get(f"{name}/mse")]
              for out in (tmp_path / "whole", tmp_path / "broken")]
    assert logged[1] == logged[0] and len(logged[0]) == 8  # log_every 2 over 16 steps


class RecordPath(Callback):
    """Which fast path (sparse codes or dense) the SAE's forward takes at each step."""

    def __init__(self):
        self.sparse: dict[int, bool | None] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.sparse[trainer.global_step] = next(iter(module.saes.values())).sparse_codes


def test_a_resumed_run_takes_the_fast_path_the_uninterrupted_one_took(pretrained_recipe, store_dir, tmp_path,
                                                                      monkeypatch):
    """A ReLU SAE chooses its next step's path (dense or sparse codes) from the last step's
    density. Resumed, it chose afresh from its first batch's pre-activations, and near the
    threshold chose the other one: the same math summed in another order, which resampling
    amplified to 1e-4 in W_enc 190 steps later (a run killed at step 64 of 256)."""
    extra = ("train.checkpoint_every=6",)
    whole_path = RecordPath()
    with monkeypatch.context() as patch:
        inject(patch, whole_path)
        train_stage.train(make_recipe(pretrained_recipe, store_dir, tmp_path / "whole", *extra))
    broken = make_recipe(pretrained_recipe, store_dir, tmp_path / "broken", *extra)
    with monkeypatch.context() as patch:
        inject(patch, CrashAt(8))
        with pytest.raises(RuntimeError, match="injected crash"):
            train_stage.train(broken)
    resumed_path = RecordPath()
    with monkeypatch.context() as patch:
        inject(patch, resumed_path)
        train_stage.train(broken)
    assert whole_path.sparse[6] is not None
    assert {step: whole_path.sparse[step] for step in resumed_path.sparse} == resumed_path.sparse
    name = broken.sae_configs()[0].name
    a, b = weights(tmp_path / "whole", name), weights(tmp_path / "broken", name)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def resumes_at_step_6_like_the_whole_run(whole, broken, tmp_path, caplog) -> None:
    """Rerun `broken`: it resumes at step 6 and ends with the whole run's weights and checkpoint
    files (none left over)."""
    import logging

    with caplog.at_level(logging.INFO, logger="framework.training"):
        train_stage.train(broken)
    assert "resuming the activation stream at step 6" in caplog.text
    assert sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())
    name = whole.sae_configs()[0].name
    a, b = weights(tmp_path / "whole", name), weights(tmp_path / "broken", name)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_without_last_ckpt_training_resumes_from_the_latest_step_checkpoint(pretrained_recipe, store_dir, tmp_path,
                                                                              monkeypatch, caplog):
    """A directory checkpoint (fsdp, feature_sharded, deepspeed) cannot replace last.ckpt in one
    rename: a process killed between removing the old one and renaming the new one into place
    leaves step-N.ckpt, written just before, and no last.ckpt. The run resumes from step-N; it
    used to start over."""
    whole, broken = whole_and_crashed_at_8(pretrained_recipe, store_dir, tmp_path, monkeypatch)
    (tmp_path / "broken" / "checkpoints" / "last.ckpt").unlink()  # what the kill leaves: step-6.ckpt alone
    resumes_at_step_6_like_the_whole_run(whole, broken, tmp_path, caplog)  # step-6.ckpt, resumed from, removed


def test_killed_between_step_n_and_last_ckpt_training_resumes_from_step_n(pretrained_recipe, store_dir, tmp_path,
                                                                           monkeypatch, caplog):
    """A save writes step-N.ckpt, then last.ckpt. Killed in between, the run resumed from the
    older last.ckpt, redid the steps to N and saved step N again as step-N-v1.ckpt beside the old
    one, which stayed on disk for good. It resumes from step-N.ckpt now."""
    from framework.training.train import WholeCheckpoint

    extra = ("train.checkpoint_every=3",)
    whole = make_recipe(pretrained_recipe, store_dir, tmp_path / "whole", *extra)
    train_stage.train(whole)
    broken = make_recipe(pretrained_recipe, store_dir, tmp_path / "broken", *extra)
    original = WholeCheckpoint._save_last_checkpoint

    def killed_before_last_at_6(self, trainer, monitor_candidates):
        if trainer.global_step == 6:
            raise RuntimeError("killed before last.ckpt at step 6")
        original(self, trainer, monitor_candidates)

    with monkeypatch.context() as patch:
        patch.setattr(WholeCheckpoint, "_save_last_checkpoint", killed_before_last_at_6)
        with pytest.raises(RuntimeError, match="killed before last.ckpt"):
            train_stage.train(broken)
    assert sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir()) == ["last.ckpt", "step-6.ckpt"]
    resumes_at_step_6_like_the_whole_run(whole, broken, tmp_path, caplog)  # no step-6-v1.ckpt, no stale step-6


def test_a_run_stopped_after_a_checkpoint_keeps_the_row_of_the_step_before_it(pretrained_recipe, store_dir,
                                                                              tmp_path, monkeypatch):
    """The checkpoint at step 6 is saved among the callbacks at the end of batch 5, and the rows
    of batch 5 were written after them: a run that died in between resumed at step 6 and its
    log never held step 5. Here the run dies as it writes step 5's row."""
    import framework.training.module as module_file

    extra = ("train.checkpoint_every=6",)
    whole = make_recipe(pretrained_recipe, store_dir, tmp_path / "whole", *extra)
    train_stage.train(whole)
    broken = make_recipe(pretrained_recipe, store_dir, tmp_path / "broken", *extra)
    original = module_file.log_metrics

    def dies_at_step_5(trainer, metrics, step):
        if step == 5:
            raise RuntimeError("killed writing the log of step 5")
        original(trainer, metrics, step)

    with monkeypatch.context() as patch:
        patch.setattr(module_file, "log_metrics", dies_at_step_5)
        with pytest.raises(RuntimeError, match="killed writing"):
            train_stage.train(broken)
    train_stage.train(broken)
    name = whole.sae_configs()[0].name
    logged = [[r["step"] for r in csv.DictReader(open(out / "logs" / "csv" / "metrics.csv")) if r.get(f"{name}/mse")]
              for out in (tmp_path / "whole", tmp_path / "broken")]
    assert logged[1] == logged[0] and "5" in logged[0]


def test_checkpoint_of_another_recipe_is_refused(pretrained_recipe, store_dir, tmp_path, monkeypatch):
    first = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.checkpoint_every=4")
    inject(monkeypatch, CrashAt(5))
    with pytest.raises(RuntimeError, match="injected crash"):
        train_stage.train(first)
    other = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.checkpoint_every=4",
                        "sae.l1_coefficient=5e-3")
    with pytest.raises(CheckpointError, match=r"different recipe.*l1_coefficient"):
        train_stage.train(other)


class PoisonWeights(Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 5:
            with torch.no_grad():
                next(iter(module.saes.values())).W_enc.fill_(float("nan"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(pretrained_recipe, store_dir, tmp_path, monkeypatch):
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.checkpoint_every=4")
    inject(monkeypatch, PoisonWeights())
    with pytest.raises(TrainingError, match=r"(loss is nan|weights became non-finite \(nan/inf\)) at step 5.*"
                                            r"last good checkpoint is kept: .*last.ckpt"):
        train_stage.train(recipe)
    assert (tmp_path / "sae" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "sae" / "COMPLETE").exists()


class PoisonOneDecoderValue(Callback):
    """One decoder value becomes -inf as the optimizer step of step `step` begins: the loss of
    that step was finite, so only the check of the weights after the step can see it."""

    def __init__(self, step: int = 5):
        self.step = step

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(iter(module.saes.values())).W_dec[3, 7] = float("-inf")


def test_a_single_non_finite_weight_stops_training_at_its_step(pretrained_recipe, store_dir, tmp_path, monkeypatch):
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.checkpoint_every=4")
    inject(monkeypatch, PoisonOneDecoderValue())
    with pytest.raises(TrainingError, match=r"weights became non-finite \(nan/inf\) at step 5; training stopped"):
        train_stage.train(recipe)
    assert not (tmp_path / "sae" / "COMPLETE").exists()


def test_a_step_whose_check_fails_writes_no_checkpoint(pretrained_recipe, store_dir, tmp_path, monkeypatch):
    """The optimizer step of step 3 makes a weight -inf and the checkpoint of step 4 is due right
    after it: the check of step 3 is read before that checkpoint is written (it is read a step
    later otherwise), so nothing is written and the error names step 3; that step's metrics
    still reach the log."""
    import csv

    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.checkpoint_every=4")
    inject(monkeypatch, PoisonOneDecoderValue(step=3))
    with pytest.raises(TrainingError, match=r"weights became non-finite \(nan/inf\) at step 3; training stopped.*"
                                            r"none was written yet"):
        train_stage.train(recipe)
    assert not list((tmp_path / "sae").glob("checkpoints/*.ckpt"))
    name = recipe.sae_configs()[0].name
    rows = list(csv.DictReader(open(tmp_path / "sae" / "logs" / "csv" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get(f"{name}/loss")] == [1, 3]  # log_every=2


class PeekAtTheLog(Callback):
    """What metrics.csv holds on disk as step 12 begins."""

    def __init__(self, path: Path):
        self.path, self.steps = path, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 12:
            rows = list(csv.DictReader(open(self.path))) if self.path.is_file() else []
            self.steps = sorted({int(r["step"]) for r in rows})


def test_the_csv_log_on_disk_is_current_while_training_runs(pretrained_recipe, store_dir, tmp_path, monkeypatch):
    peek = PeekAtTheLog(tmp_path / "sae" / "logs" / "csv" / "metrics.csv")
    inject(monkeypatch, peek)
    train_stage.train(make_recipe(pretrained_recipe, store_dir, tmp_path / "sae"))  # log_every=2
    # every logged step so far (odd ones: log_every=2; others: resampling), none to come
    assert {1, 3, 5, 7, 9, 11} <= set(peek.steps) and max(peek.steps) == 11, peek.steps


def test_bf16_true_precision_trains_and_evaluates_on_bf16_inputs(pretrained_recipe, store_dir, tmp_path):
    """Under bf16-true the SAE has bf16 weights: the module gives it bf16 rows, both the training
    batches (which Lightning converts) and the held-out ones (which it does not)."""
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.precision=bf16-true",
                         "sae.variant=gated", "train.n_tokens=2048")
    out = train_stage.train(recipe)
    name = recipe.sae_configs()[0].name
    assert json.loads((out / name / "metrics.json").read_text())["steps"] == 4


def test_live_activations_train_end_to_end_with_resampling_and_held_out_metrics(pretrained_recipe, tmp_path,
                                                                                 monkeypatch):
    """harvest.mode=live: no store on disk; the LM generates the training rows, each resampling's
    sample (from its own windows) and the held-out rows."""
    samples = []
    original = train_stage.ActivationDataModule.sample

    def recorded(self, n, seed):
        rows = original(self, n, seed)
        samples.append((seed, rows[0][:4].clone()))
        return rows

    monkeypatch.setattr(train_stage.ActivationDataModule, "sample", recorded)
    recipe = make_recipe(pretrained_recipe, tmp_path / "none", tmp_path / "sae", "harvest.mode=live",
                         "harvest.n_tokens=8192", "train.resample_steps=[4,8]", "train.dead_window=2",
                         "sae.l1_coefficient=3e-2")
    out = train_stage.train(recipe)
    name = recipe.sae_configs()[0].name
    metrics = json.loads((out / name / "metrics.json").read_text())
    assert metrics["steps"] == 16 and metrics["fvu"] < 1
    assert not (tmp_path / "none").exists()
    (init_seed, init_rows), *resampled = samples  # the init's sample, then each resampling's (with dead features)
    assert init_seed == recipe.train.seed and [seed for seed, _ in resampled] and \
        {seed for seed, _ in resampled} <= {4, 8}
    assert not any(torch.equal(init_rows, rows) for _, rows in resampled)  # other rows than the init's


def test_a_resampling_with_nothing_to_draw_from_resamples_nothing_and_says_so(pretrained_recipe, store_dir,
                                                                            tmp_path, monkeypatch, caplog):
    """A resampling sample whose inputs are all zero gives no direction: the dead features stay as
    they are, still counted dead (their silent-step counts go on), the log says none was resampled."""
    original, calls = train_stage.ActivationDataModule.sample, []

    def zero_after_the_init(self, n, seed):
        rows = original(self, n, seed)
        calls.append(seed)
        return rows if len(calls) == 1 else [torch.zeros_like(r) for r in rows]

    monkeypatch.setattr(train_stage.ActivationDataModule, "sample", zero_after_the_init)
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.resample_steps=[4,8]",
                         "train.dead_window=2", "sae.l1_coefficient=3e-2")
    with caplog.at_level("WARNING", logger="framework.training.callbacks"):
        out = train_stage.train(recipe)
    name = recipe.sae_configs()[0].name
    resamplings = len(calls) - 1  # after the init's sample: one per resampling step with dead features
    warned = [r.getMessage() for r in caplog.records if "none was resampled" in r.getMessage()]
    assert resamplings >= 1 and len(warned) == resamplings and all(name in w for w in warned)
    rows = list(csv.DictReader(open(out / "logs" / "csv" / "metrics.csv")))
    assert [float(r[f"{name}/resampled"]) for r in rows if r.get(f"{name}/resampled")] == [0.0, 0.0]
    stats = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert stats[f"stats.{name}.steps_since_fired"].max() > 8  # not reset at step 8


def test_firing_counters_stay_exact_float64_when_the_module_is_cast_to_bf16():
    """bf16-true casts the whole module: the counters would stop counting at 2^20 rows."""
    from framework.training.module import FeatureStats

    stats = FeatureStats(4)
    stats.window_rows += 2**20
    stats = stats.to(torch.bfloat16)
    assert stats.window_fires.dtype == stats.window_rows.dtype == torch.float64
    assert stats.steps_since_fired.dtype == torch.long
    stats.window_rows += 1
    assert stats.window_rows.item() == 2**20 + 1


def test_16_mixed_precision_keeps_adam_unfused_so_grad_clip_sees_unscaled_gradients(pretrained_recipe, store_dir,
                                                                                     tmp_path):
    """Lightning unscales 16-mixed's gradients before the hook that clips them only for an
    unfused optimizer (a fused one unscales inside its own step, after the clip)."""
    from framework.training.module import SAEModule

    for precision, fused in (("32-true", True), ("bf16-mixed", True), ("16-mixed", None)):
        recipe = make_recipe(pretrained_recipe, store_dir, tmp_path, f"train.precision={precision}")
        module = SAEModule(recipe, {recipe.sae_configs()[0].hook_point: 512}, {})
        assert module._fused_adam([{"params": list(module.saes.parameters())}]) is fused, precision


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_any_non_finite_finds_one_bad_value_among_many(bad):
    from framework.training.module import any_non_finite

    tensors = [torch.randn(64, 300), torch.randn(300), torch.empty(0)]  # an empty ZeRO-3 partition too
    assert any_non_finite(tensors).tolist() == [0.0]
    tensors[0][17, 123] = bad
    assert any_non_finite(tensors).tolist() == [1.0]
    # +inf in one tensor and -inf in another do not cancel out
    assert any_non_finite([torch.tensor([float("inf")]), torch.tensor([float("-inf")])]).tolist() == [1.0]
    assert any_non_finite([torch.full((10,), 1e30, dtype=torch.bfloat16)]).tolist() == [0.0]


def test_store_whose_width_differs_from_the_sae_is_refused_before_training(pretrained_recipe, store_dir, tmp_path):
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "sae.d_in=576")
    with pytest.raises(DataError, match=r"d_in=576.*d=512"):
        train_stage.train(recipe)
    assert not (tmp_path / "sae" / "checkpoints").exists()


def test_sae_reading_a_hook_the_store_lacks_is_refused(pretrained_recipe, store_dir, tmp_path):
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "sae.hook_point=blocks.0.hook_resid_post")
    with pytest.raises(DataError, match="blocks.0.hook_resid_post"):
        train_stage.train(recipe)


@pytest.mark.parametrize("override, difference", [
    ("harvest.seed=1", "harvest.seed: 0 there, 1 here"),
    ("text.max_documents=100", "text.max_documents: 200 there, 100 here"),
])
def test_a_store_harvested_by_another_recipe_is_refused_before_training(pretrained_recipe, store_dir, tmp_path,
                                                                        override, difference):
    """The SAEs would otherwise record this recipe's harvest settings for rows made with others."""
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", override)
    with pytest.raises(RecipeError, match=rf"{store_dir} was harvested by a different recipe \({difference}\).*"
                                          r"set harvest.output_dir to a new directory"):
        train_stage.train(recipe)
    assert not (tmp_path / "sae").exists()


def test_a_store_harvested_from_other_lm_weights_is_refused_before_training(pretrained_recipe, store_dir, tmp_path):
    """lm.path is not part of the recipe fingerprint (a moved LM is the same LM), so only the
    weights hash tells another pretrained LM from the one that made the store."""
    made_the_store = pretrained_recipe.path("lm")
    other = copy_lm_with_other_weights(made_the_store, tmp_path / "other-lm")
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", f"lm.path={other}")
    with pytest.raises(RecipeError, match=rf"{re.escape(str(store_dir))} was harvested from LM weights with sha256 "
                                          rf"\w+\.\.\., but the LM this recipe names \(lm.path={re.escape(str(other))}\).*"
                                          r"set harvest.output_dir to a new directory.*point lm.path at the LM that "
                                          rf"made the store \(it was at {re.escape(str(made_the_store.resolve()))}\)"):
        train_stage.train(recipe)
    assert not (tmp_path / "sae").exists()

    moved = tmp_path / "moved-lm"
    shutil.copytree(made_the_store, moved)
    out = train_stage.train(make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", f"lm.path={moved}"))
    assert (out / "COMPLETE").is_file()


@pytest.mark.parametrize("variant", ["topk", "paper"])
def test_sae_train_around_a_recorded_step_trains_as_the_eager_run(pretrained_recipe, store_dir, tmp_path,
                                                                  variant, monkeypatch):
    """train.cuda_graphs' Lightning side on the CPU: training_step returning None, optimizer_step
    running the closure alone, no zero_grad, the LR schedule and global_step advancing, logging
    and checkpoints around a recorded step. The recording (a GPU's) is stood in for by its step
    run eagerly, gradients emptied first as a replay's backward overwrites them; the run must end
    where the eager one does (tests/test_gpu_training.py replays real graphs)."""
    from framework.training import cuda_graphs

    def replay_eagerly(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        return self.run_step(batch, tuple(sae.auxk_needed() for sae in self.saes.values()))

    extra = (f"sae.variant={variant}", "sae.k=8", "train.lr_warmup_steps=4", "train.lr_decay=linear",
             "train.checkpoint_every=8", "train.resample_steps=[8]")
    eager = train_stage.train(make_recipe(pretrained_recipe, store_dir, tmp_path / "eager", *extra))
    monkeypatch.setattr(cuda_graphs, "check_supported", lambda *args: None)
    monkeypatch.setattr(cuda_graphs.RecordedSteps, "__call__", replay_eagerly)
    recorded = train_stage.train(make_recipe(pretrained_recipe, store_dir, tmp_path / "recorded", *extra,
                                             "train.cuda_graphs=true"))
    name = make_recipe(pretrained_recipe, store_dir, tmp_path, *extra).sae_configs()[0].name
    a, b = weights(eager, name), weights(recorded, name)
    for key in a:  # the same to float rounding (the paper SAE's eager step may take its sparse path)
        assert ((b[key] - a[key]).norm() / a[key].norm()).item() < 1e-5, key
    metrics = [json.loads((out / name / "metrics.json").read_text()) for out in (eager, recorded)]
    assert metrics[1]["steps"] == metrics[0]["steps"] == 16
    rows = [list(csv.DictReader(open(out / "logs" / "csv" / "metrics.csv"))) for out in (eager, recorded)]
    lrs = [[float(r[f"{name}/lr"]) for r in run if r.get(f"{name}/lr")] for run in rows]
    assert lrs[1] == pytest.approx(lrs[0]) and len(set(lrs[0])) > 2  # the schedule moved, the same way
    assert (recorded / "checkpoints" / "last.ckpt").is_file()


def test_asking_for_more_tokens_than_the_store_holds_is_refused(pretrained_recipe, store_dir, tmp_path):
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.n_tokens=1000000")
    with pytest.raises(DataError, match=r"train.n_tokens=1,000,000.*train.epochs"):
        train_stage.train(recipe)


@pytest.mark.parametrize("extra, reason", [
    (["sae.variant=topk"], "needs a CUDA device; this run trains on cpu"),
    (["sae.variant=paper"], "needs a CUDA device; this run trains on cpu"),
    (["sae.variant=batchtopk"], r"fixed by the batch alone \(variants paper, topk\).* \(batchtopk\)"),
    (["sae.variant=april2024"], r"\(variants paper, topk\).* \(april2024\)"),
    (["sae.variant=topk", "train.precision=16-mixed"], r"cannot record float16 mixed precision.*bf16-mixed"),
])
def test_cuda_graphs_where_they_cannot_record_are_refused_with_the_reason(
        pretrained_recipe, store_dir, tmp_path, extra, reason, monkeypatch):
    """train.cuda_graphs on CPU, or for a variant whose selection size depends on the data, stops
    at the start of training with what to change (the graphs themselves: tests/test_gpu_training.py)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.cuda_graphs=true", *extra)
    with pytest.raises(RecipeError, match=reason) as error:
        train_stage.train(recipe)
    assert "train.cuda_graphs=false" in str(error.value)


@pytest.mark.parametrize("overrides, warned", [
    (["train.precision=32-true"], "paper_16384_l1_1e-03"),
    (["train.precision=bf16-mixed"], None),  # the recorded step is faster in bf16 at every size measured
    (["train.precision=32-true", "train.bank=[{n_features: 8192}]"], None),
])
def test_cuda_graphs_warn_where_the_eager_paper_step_measured_faster(tmp_path, caplog, overrides, warned):
    from framework.training.cuda_graphs import check_supported

    recipe = load_recipe(None, [f"workdir={tmp_path}", "train.cuda_graphs=true", "train.bank=[{n_features: 16384}]",
                                "sae.l1_coefficient=1e-3", *overrides])
    with caplog.at_level("WARNING", logger="framework.training.cuda_graphs"):
        check_supported(recipe, torch.device("cuda"), world_size=1)  # (a device object: no GPU needed)
    if warned:
        assert "float32 at 16384 features or more" in caplog.text and warned in caplog.text
        assert "train.precision=bf16-mixed" in caplog.text
    else:
        assert caplog.text == ""


def test_bank_trains_several_saes_on_the_same_batches(pretrained_recipe, store_dir, tmp_path):
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae",
                         "train.bank=[{n_features: 128}, {n_features: 256, variant: topk, k: 8}]", train=TRAIN_FOR_BANK)
    out = train_stage.train(recipe)
    names = [c.name for c in recipe.sae_configs()]
    assert names == ["paper_128_l1_1e-03", "topk_256_k8"]
    for name in names:
        assert json.loads((out / name / "metrics.json").read_text())["steps"] == 16
    assert json.loads((out / "topk_256_k8" / "metrics.json").read_text())["l0"] <= 8


def read_wandb_records(run_dir: Path) -> dict[str, list]:
    """Parse the offline run file: a ':W&B' header, then LevelDB-log records of protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, payloads = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            payloads.append(pending + chunk)
            pending = b""
        else:  # FIRST, MIDDLE
            pending += chunk
    records: dict[str, list] = {}
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.setdefault(record.WhichOneof("record_type"), []).append(record)
    return records


def test_offline_wandb_run_is_written_and_holds_metrics_but_no_secret(pretrained_recipe, store_dir, tmp_path, monkeypatch,
                                                                      capfd):
    monkeypatch.setenv("WANDB_API_KEY", "local-secret-key-0123456789abcdef0123456789abcdef")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.wandb.mode=offline")
    out = train_stage.train(recipe)
    # Lightning's anonymous=None made wandb warn "The anonymous setting has no effect" every run
    assert "anonymous" not in capfd.readouterr().err
    run_dir = next((out / "logs" / "wandb").glob("offline-run-*"))
    records = read_wandb_records(run_dir)
    keys = {item.key or "/".join(item.nested_key) for r in records["history"] for item in r.history.item}
    name = recipe.sae_configs()[0].name
    assert f"{name}/loss" in keys and f"{name}/l0" in keys
    config = {item.key for r in records["run"] for item in r.run.config.update}
    assert {"sae", "train"} <= config
    for path in out.rglob("*"):
        if path.is_file():
            assert b"local-secret-key" not in path.read_bytes(), path
    assert os.environ["WANDB_API_KEY"].startswith("local-secret")


def test_training_from_a_store_served_over_http_equals_training_from_the_directory(pretrained_recipe, store_dir, tmp_path):
    """harvest.output_dir may be a URL: `sae train` streams the shards (and the held-out split)
    from a real HTTP server and ends with the weights a local read gives."""
    import functools
    import http.server
    import threading

    local = train_stage.train(make_recipe(pretrained_recipe, store_dir, tmp_path / "local"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(store_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "http", f"harvest.output_dir={url}",
                             "harvest.verify_on_read=true")
        assert recipe.store_location() == url
        assert harvest(recipe) == url  # nothing to harvest, but the store must answer
        remote = train_stage.train(recipe)
    finally:
        server.shutdown()
        server.server_close()
    name = recipe.sae_configs()[0].name
    for key, value in weights(local, name).items():
        assert torch.equal(value, weights(remote, name)[key]), key


class _Terminal:
    """stderr as a terminal: Lightning's progress bar is on only there."""

    def __init__(self, stream):
        self.stream = stream

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_on_a_terminal_the_progress_bar_redraws_by_time_not_every_step(pretrained_recipe, store_dir, tmp_path,
                                                                       monkeypatch):
    """A redraw after every step cost 0.3-0.6 ms of host time per step; the bar redraws at most
    every interval_s, and at the last step."""
    import sys

    from framework.training.callbacks import ProgressBar

    answers: list[tuple[int, bool]] = []

    class HourlyBar(ProgressBar):
        def __init__(self):
            super().__init__(interval_s=3600.0)  # within this run: the first step and the last

        def _should_update(self, current, total):
            answer = super()._should_update(current, total)
            if self.train_progress_bar is not None and total == self.train_progress_bar.total:
                answers.append((current, answer))
            return answer

    monkeypatch.setattr(train_stage, "ProgressBar", HourlyBar)
    monkeypatch.setattr(sys, "stderr", _Terminal(sys.stderr))
    train_stage.train(make_recipe(pretrained_recipe, store_dir, tmp_path / "sae"))
    assert len(answers) == 16 and [step for step, drawn in answers if drawn] == [1, 16]


@pytest.mark.parametrize("damage", ["truncated shard", "unreadable manifest"])
def test_a_broken_heldout_split_stops_training_before_its_first_step(pretrained_recipe, store_dir, tmp_path,
                                                                      monkeypatch, damage):
    """The held-out rows are read when training starts: found broken at the last step's
    evaluation, they cost the whole run (no checkpoint yet); and a split that is there but
    unreadable is an error, not a silent fallback to training rows."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    heldout = store / "heldout"
    if damage == "truncated shard":
        shard = sorted(heldout.glob("shard-*.tar"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        (heldout / "manifest.json").write_text("xx{")
    recipe = make_recipe(pretrained_recipe, store, tmp_path / "sae")

    class Steps(Callback):
        def __init__(self):
            self.taken: list[int] = []

        def on_train_batch_end(self, trainer, *args):
            self.taken.append(trainer.global_step)

    steps = Steps()
    inject(monkeypatch, steps)
    with pytest.raises(DataError, match="heldout"):
        train_stage.train(recipe)
    assert steps.taken == []


def test_a_heldout_split_smaller_than_one_batch_is_evaluated_whole(pretrained_recipe, store_dir, tmp_path):
    """2,048 held-out rows and batches of 4,096: the periodic evaluation read no batch at all
    (a stream drops a last partial batch) and failed at the last step, before the final
    checkpoint, losing the run; now it scores the rows there are."""
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.batch_size=4096")
    out = train_stage.train(recipe)
    name = recipe.sae_configs()[0].name
    metrics = json.loads((out / name / "metrics.json").read_text())
    assert "dead_fraction_heldout" in metrics and metrics["fvu"] > 0 and metrics["l0"] > 0, metrics  # two steps in


def test_data_init_draws_a_sample_row_for_every_feature(pretrained_recipe, store_dir, tmp_path, monkeypatch):
    """The init sample was capped at INIT_SAMPLE_ROWS rows: a larger dictionary drew rows with
    replacement, and features given the same row trained as one. Here the cap is 128 rows for
    256 features: the sample grows to 256, every decoder row its own."""
    from safetensors.torch import load_file

    from framework.training.data import ActivationDataModule

    asked = []
    sample = ActivationDataModule.sample
    monkeypatch.setattr(ActivationDataModule, "sample", lambda self, n, seed: asked.append(n) or sample(self, n, seed))
    monkeypatch.setattr(train_stage, "INIT_SAMPLE_ROWS", 128)
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae", "train.n_tokens=1024")
    out = train_stage.train(recipe)
    assert asked[0] == 256
    init = load_file(str(out / recipe.sae_configs()[0].name / "init_decoder.safetensors"))["W_dec"]
    assert len({tuple(row.tolist()) for row in init}) == 256


def test_a_run_stopped_while_writing_its_outputs_resumes_from_its_last_step_checkpoint(pretrained_recipe, store_dir,
                                                                                        tmp_path):
    """Killed after the last checkpoint but before COMPLETE: Lightning restores the final-step
    checkpoint and skips the fit loop; the outputs are written from the restored weights."""
    recipe = make_recipe(pretrained_recipe, store_dir, tmp_path / "sae")
    out = train_stage.train(recipe)
    name = recipe.sae_configs()[0].name
    trained = weights(out, name)
    metrics = json.loads((out / name / "metrics.json").read_text())
    for path in (out / "COMPLETE", out / "report.md", out / name / "sae.safetensors", out / name / "metrics.json"):
        path.unlink()
    assert train_stage.train(recipe) == out
    assert (out / "COMPLETE").is_file() and (out / "report.md").is_file()
    for key, value in weights(out, name).items():
        assert torch.equal(value, trained[key]), key
    # the held-out metrics too, which the skipped last step's evaluation would have produced
    assert json.loads((out / name / "metrics.json").read_text()) == pytest.approx(metrics)


@pytest.mark.parametrize("mode", ["auto", "online"])
def test_wandb_online_that_cannot_start_says_to_run_offline_without_printing_the_key(mode, tmp_path, monkeypatch):
    from framework.tracking import TrackingError, make_loggers

    key = "not-a-real-key"  # malformed: wandb refuses it at once, as it refuses a real key with no network
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", key)
    recipe = load_recipe(None, [f"workdir={tmp_path}", f"train.wandb.mode={mode}"])
    wandb_logger = make_loggers(recipe, tmp_path / "logs", run_name="t", job_type="train")[-1]
    with pytest.raises(TrackingError, match=r"train\.wandb\.mode=offline.*WANDB_MODE=offline") as caught:
        _ = wandb_logger.experiment  # starting the run
    assert key not in str(caught.value) and f"train.wandb.mode={mode}" in str(caught.value)


def test_an_empty_wandb_mode_in_the_environment_counts_as_unset(tmp_path, monkeypatch):
    """`WANDB_MODE= sae train ...` (a job template's blank): wandb itself refused "" as a mode."""
    from framework.tracking import make_loggers

    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    recipe = load_recipe(None, [f"workdir={tmp_path}", "train.wandb.mode=auto"])
    wandb_logger = make_loggers(recipe, tmp_path / "logs", run_name="t", job_type="train")[-1]
    _ = wandb_logger.experiment  # starts an offline run
    wandb_logger.experiment.finish()
    assert list((tmp_path / "logs").rglob("offline-run-*"))


def test_damaged_outputs_are_named_with_what_to_do(tmp_path):
    """A checkpoint whose bytes changed (a file checkpoint's zip CRC), an SAE file cut short, a
    COMPLETE marker that is not JSON: each named, with the fix, instead of resuming silently or
    a traceback."""
    import zipfile

    from framework.artifacts import MARKER, is_complete
    from framework.sae import build_sae
    from framework.saved import load_framework_sae

    recipe = load_recipe(None, [f"workdir={tmp_path}"])
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"weights": torch.randn(4096)}, checkpoint)
    member = next(i for i in zipfile.ZipFile(checkpoint).infolist() if i.filename.endswith("data/0"))
    data = bytearray(checkpoint.read_bytes())
    start = member.header_offset + 30 + int.from_bytes(data[member.header_offset + 26:member.header_offset + 28], "little") \
        + int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")  # after the local header
    data[start + 100] ^= 0x20  # one exponent bit of one weight
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"checkpoint {checkpoint} is damaged: its \S+data/0 fails its CRC "
                                              r"check; delete it: the same command then resumes from the newest step-N"):
        train_stage.check_checkpoint(checkpoint, recipe)

    cfg = recipe.sae_configs()[0]
    saved = train_stage.save_sae(build_sae(512, cfg), cfg.name, "blocks.0.mlp.hook_post", 1.0, recipe, tmp_path / "sae" / cfg.name)
    weights = saved / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"cannot read {weights} .*delete {tmp_path / 'sae' / MARKER} and re-run "
                                              r"`sae train RECIPE`: it rewrites the SAEs from the last checkpoint"):
        load_framework_sae(saved)

    (tmp_path / "sae" / MARKER).write_text('{"stage": "tra')
    with pytest.raises(RecipeError, match=rf"{tmp_path / 'sae' / MARKER} is damaged .*Delete it and re-run the stage"):
        is_complete(tmp_path / "sae", recipe, "train")


def test_a_checkpoint_that_fails_to_write_leaves_no_partial_file(tmp_path):
    """A full disk mid-save: the half-written `.last.ckpt.partial` (which kept the disk full) is
    removed, the last whole checkpoint stays, and the error goes on to the CLI's one-line report."""
    from types import SimpleNamespace

    last = tmp_path / "last.ckpt"
    last.write_bytes(b"the previous whole checkpoint")

    def save_checkpoint(filepath, weights_only=False):
        Path(filepath).write_bytes(b"half of it")
        raise OSError(28, "No space left on device", filepath)

    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None),
                              save_checkpoint=save_checkpoint, global_step=8, loggers=[])
    with pytest.raises(OSError, match="No space left"):
        train_stage.WholeCheckpoint(dirpath=tmp_path)._save_checkpoint(trainer, str(last))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert last.read_bytes() == b"the previous whole checkpoint"


def test_a_resumed_run_names_the_checkpoint_it_resumed_from_until_it_writes_one():
    """The NaN message's "last good checkpoint": a resumed run set it to the checkpoint it resumed
    from, and each batch's update kept "none was written yet" until this process saved one."""
    from types import SimpleNamespace

    checkpoint = SimpleNamespace(last_model_path="")
    module = SimpleNamespace(last_good_checkpoint="run/checkpoints/step-14.ckpt")  # set on resume
    tracker = train_stage._TrackLastCheckpoint(checkpoint)
    tracker.on_train_batch_end(None, module, None, None, 0)
    assert module.last_good_checkpoint == "run/checkpoints/step-14.ckpt"
    checkpoint.last_model_path = "run/checkpoints/last.ckpt"
    tracker.on_train_batch_end(None, module, None, None, 1)
    assert module.last_good_checkpoint == "run/checkpoints/last.ckpt"
