"""`sae train`: the training stage, from recipe to trained SAEs on disk.

Layout of the output directory (`{workdir}/sae` unless `train.output_dir` says otherwise):

    checkpoints/last.ckpt     Lightning checkpoint: weights, Adam state, feature statistics,
                              callbacks, loops, and the recipe fingerprint (resume + refusal)
    checkpoints/step-N.ckpt   the same, as of step N (the latest checkpoint step only)
    logs/                     CSV log and the W&B run (offline unless a key is in the env)
    <sae name>/sae.safetensors, config.json, metrics.json, density.png, init_decoder.safetensors
    training_curves.png, report.md, recipe.yaml, COMPLETE
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file

from framework.activations.harvest import check_harvested_lm, harvest_differences
from framework.artifacts import differences_from, is_complete, mark_complete
from framework.config import Recipe, is_url, recipe_to_dict, save_recipe
from framework.errors import CheckpointError, DataError, RecipeError
from framework.lm import weights_sha256
from framework.sae.init import CALIBRATION_ROWS
from framework.tracking import finish_tracking, make_loggers
from framework.training.callbacks import FeatureDensity, HeldoutEval, ProgressBar, Resampling, Throughput
from framework.training.data import ActivationDataModule
from framework.training.module import SAEModule, total_steps
from framework.training.strategies import (
    checkpoint_metadata,
    data_parallel_ranks,
    feature_shards,
    layout_name,
    trainer_arguments,
    world_size,
)

log = logging.getLogger(__name__)
INIT_SAMPLE_ROWS = CALIBRATION_ROWS  # the init sample's rows at least


def resolve_hooks(recipe: Recipe, harvested: list[str]) -> Recipe:
    """Fill in `sae.hook_point` (empty = the first harvested hook) and check every SAE's."""
    recipe = copy.deepcopy(recipe)
    if not recipe.sae.hook_point:
        recipe.sae.hook_point = harvested[0]
    for cfg in recipe.sae_configs():
        if cfg.hook_point not in harvested:
            raise DataError(
                f"SAE {cfg.name!r} reads hook point {cfg.hook_point!r}, but the activations hold "
                f"{harvested}; set its hook_point to one of them, or add it to harvest.hook_points "
                f"and harvest again"
            )
    return recipe


def check_store_recipe(recipe: Recipe, location: str) -> None:
    """Refuse a store harvested with other text, LM or harvest settings, or from other LM weights:
    the SAEs (and their fingerprint) would record this recipe's settings for rows that other
    settings produced."""
    if is_url(location):
        # A remote store's claim and manifest are not fetched here, so neither its recipe nor its
        # LM weights are compared; they were checked where it was harvested.
        return
    differences = harvest_differences(Path(location), recipe)
    if differences:
        raise RecipeError(
            f"the activation store {location} was harvested by a different recipe "
            f"({'; '.join(differences[:5])}); training on it would record this recipe's settings for "
            f"activations made with others. Harvest this recipe into its own store (set harvest.output_dir "
            f"to a new directory and run `sae harvest RECIPE`), or point harvest.output_dir at a store "
            f"harvested with these settings."
        )
    check_harvested_lm(Path(location), recipe, weights_sha256(recipe))


class WholeCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose checkpoints appear under their name whole or not at all.

    Lightning writes a one-file checkpoint atomically, but the sharded strategies (fsdp,
    feature_sharded, deepspeed) write a directory in place: rewriting last.ckpt put the new
    step's shards beside the old step's meta.pt, so a process killed in between left a
    last.ckpt that loaded without complaint and resumed the older step's loop with the newer
    step's weights (a different result). Every checkpoint is now written under a hidden
    temporary name and renamed into place once every rank has written its part. A directory
    cannot replace another in one rename: the old one is renamed aside first and removed after
    (removing it in place, file by file, and killed in between, left a last.ckpt with meta.pt but
    without part of its shards, which the next run took for its checkpoint and failed to load).
    Killed between the two renames, the run resumes from the step-N checkpoint written just
    before (`resume_checkpoint`).
    """

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        path = Path(filepath)
        partial = path.with_name(f".{path.name}.partial")
        replaced = path.with_name(f".{path.name}.replaced")
        if trainer.is_global_zero:
            _remove(partial)  # left by a process killed while writing it
            _remove(replaced)  # left by a process killed while removing it
        trainer.strategy.barrier()
        try:
            super()._save_checkpoint(trainer, str(partial))
        except BaseException:
            with contextlib.suppress(OSError):
                _remove(partial)  # a disk that filled up keeps no half checkpoint (the last whole one stays)
            raise
        trainer.strategy.barrier()  # every rank has written its shards
        if trainer.is_global_zero:
            if partial.is_dir() and path.exists():
                os.replace(path, replaced)  # whole under another name, never half removed under its own
            os.replace(partial, path)
            _remove(replaced)
        trainer.strategy.barrier()
        self._last_checkpoint_saved = str(path)

    def _should_remove_checkpoint(self, trainer, previous: str, current: str) -> bool:
        """Lightning never removes the checkpoint a run resumed from (it may be a user's file);
        a run of ours resumes from its own directory's (`resume_checkpoint`), and a step-N.ckpt
        resumed from is superseded like any other once a later step is saved."""
        if super()._should_remove_checkpoint(trainer, previous, current):
            return True
        own = Path(previous).absolute().parent == Path(self.dirpath).absolute()
        return previous != current and own and _STEP_CHECKPOINT.fullmatch(Path(previous).name) is not None


# step-N.ckpt, or step-N-vK.ckpt where Lightning found the name taken
_STEP_CHECKPOINT = re.compile(r"step-(\d+)(?:-v(\d+))?\.ckpt")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def resume_checkpoint(directory: Path) -> Path | None:
    """The checkpoint a run resumes from: the newer of last.ckpt and the latest step-N.ckpt;
    None when there is neither.

    Each save writes step-N.ckpt, then last.ckpt: a process killed in between leaves step-N
    newer than last.ckpt (and, killed while replacing a directory checkpoint, no last.ckpt at
    all). Resuming from last.ckpt then redid the steps in between and saved step N again as
    step-N-v1.ckpt, beside the old one, which nothing removed."""
    steps = {}
    for path in directory.glob("step-*.ckpt"):
        match = _STEP_CHECKPOINT.fullmatch(path.name)
        if match:
            steps[path] = (int(match[1]), int(match[2] or 0))
    latest = max(steps, key=steps.get) if steps else None
    last = directory / "last.ckpt"
    if not last.exists():
        return latest
    if latest is None:
        return last
    try:
        last_step = int(checkpoint_metadata(last)["global_step"])
    except Exception:  # unreadable: check_checkpoint names the problem when the run loads it
        return last
    return latest if steps[latest][0] > last_step else last


class _TrackLastCheckpoint(Callback):
    """Tells the module where the last good checkpoint is, for the NaN error message."""

    def __init__(self, checkpoint: ModelCheckpoint):
        self.checkpoint = checkpoint

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        module.last_good_checkpoint = self.checkpoint.last_model_path or module.last_good_checkpoint


class ReportStop(Callback):
    """A rank of a multi-process job that stops says why and where the job resumes from.

    It says so in `on_exception`, before Lightning's teardown: torchrun sends SIGTERM to the other
    ranks 0.1 s after one dies, and that teardown ends by restoring SIGTERM's default action (to
    end the process at once), so a rank still tearing down when it arrives would end without a
    word. A SIGTERM that arrives while the report is written is ignored: the rank is stopping
    already, and Lightning's own SIGTERM handler (a broadcast to the dead rank) could cut it short.
    A SIGTERM that came first (preemption, or torchrun stopping the job) is reported as such.
    """

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = checkpoint_dir

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if trainer.world_size == 1 or isinstance(exception, KeyboardInterrupt):
            return
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        why = ("SIGTERM: torchrun stops every rank once one fails, and a cluster stops a job it preempts"
               if isinstance(exception, SIGTERMException) else f"{type(exception).__name__}: {exception}")
        on_main_thread = threading.current_thread() is threading.main_thread()  # where signal.signal works
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if on_main_thread else None
        try:
            log.error(
                "rank %d stopped at step %d (%s). If another rank died or stopped answering for "
                "SAE_DIST_TIMEOUT_S=%ss, its own log says why. The last checkpoint is kept (%s): run the "
                "same command again to resume from it.", trainer.global_rank, trainer.global_step, why,
                os.environ.get("SAE_DIST_TIMEOUT_S", 1800),
                resume_checkpoint(self.checkpoint_dir) or "none written yet; set train.checkpoint_every",
            )
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


DELETE_TO_RESUME = ("delete it: the same command then resumes from the newest step-N.ckpt beside it, "
                    "or starts over when there is none")


def check_checkpoint(path: Path, recipe: Recipe) -> None:
    """Refuse a checkpoint written by a different recipe, activation store or strategy, or one
    whose bytes changed since it was written (a file checkpoint is a zip whose members carry a
    CRC-32: checked in full, as a flipped bit in the weights would otherwise resume silently)."""
    try:
        damaged = None
        if path.is_file():
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        state = checkpoint_metadata(path)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path} ({type(err).__name__}: {err}); {DELETE_TO_RESUME}") from None
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: its {damaged} fails its CRC check; {DELETE_TO_RESUME}")
    saved = state.get("sae_framework", {}).get("fingerprint")
    if saved is None:
        raise CheckpointError(f"{path} was not written by `sae train`; delete it or use another train.output_dir")
    differences = differences_from(saved, recipe, "train")
    if differences:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different recipe ({'; '.join(differences[:5])}). "
            f"Resuming would mix two experiments: use another train.output_dir, or delete "
            f"{path.parent} to start this recipe from scratch."
        )
    layout = state["sae_framework"].get("layout", "replicated")
    if layout != layout_name(recipe):
        raise CheckpointError(
            f"checkpoint {path} holds parameters laid out as {layout!r} but train.strategy="
            f"{recipe.train.strategy} lays them out as {layout_name(recipe)!r}; resume with the strategy "
            f"that wrote it, or use another train.output_dir"
        )
    saved_ranks, ranks = state["sae_framework"].get("data_parallel_ranks"), data_parallel_ranks(recipe)
    if saved_ranks is not None and saved_ranks != ranks:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved_ranks} data-parallel ranks, and this run has {ranks}: "
            f"each rank resumes the activation stream in its own slice of the shards, so another number of "
            f"ranks would train on some rows twice and skip others. Resume with {saved_ranks} (torchrun "
            f"--nproc_per_node, train.devices, train.num_nodes), or use another train.output_dir"
        )


@dataclasses.dataclass
class PendingInit:
    """Data-dependent init that waits for feature sharding: the samples, and where the initial
    decoder goes (moved_fraction in the report compares the trained decoder with it)."""

    samples: dict[str, torch.Tensor]  # SAE name -> (rows, d_in), scaled as training sees it
    out: Path

    def save_decoder(self, name: str, W_dec: torch.Tensor) -> None:
        (self.out / name).mkdir(parents=True, exist_ok=True)
        save_file({"W_dec": W_dec.contiguous().cpu()}, str(self.out / name / "init_decoder.safetensors"))


def initialize(module: SAEModule, data: ActivationDataModule, out: Path, is_main: bool) -> None:
    # A row per feature for init=data (each row is drawn once; features past the sample's rows
    # keep random directions), and INIT_SAMPLE_ROWS at least for b_dec and the bias calibration.
    data_features = [cfg.n_features for cfg in module.recipe.sae_configs() if cfg.init == "data"]
    wanted = max([INIT_SAMPLE_ROWS, *data_features])
    rows = min(wanted, data.available_rows())
    if rows < max(data_features, default=0):
        log.warning("init=data: the store holds %d rows for %d features; features past the rows keep random "
                    "directions (harvest more, or use fewer features)", rows, max(data_features))
    sample = data.sample(rows, seed=module.recipe.train.seed)
    scaled = {hook: sample[data.hook_points.index(hook)] * module.input_scales[hook] for hook in set(module.hook_of.values())}
    samples = {name: scaled[hook] for name, hook in module.hook_of.items()}  # one copy per hook, shared (read only)
    pending = PendingInit(samples, out)
    if any(p.is_meta for p in module.saes.parameters()):
        module.pending_init = pending  # not materialised yet: each rank inits its own slices (shard_features)
        return
    for name, sae in module.saes.items():
        sae.initialize_from_data(samples[name])
        if is_main:
            pending.save_decoder(name, sae.W_dec.detach())


def build_trainer(recipe: Recipe, out: Path, data: ActivationDataModule) -> L.Trainer:
    cfg = recipe.train
    total = total_steps(recipe)
    checkpoint = WholeCheckpoint(
        # step-16.ckpt: Lightning would otherwise insert the metric's name (step-step=16.ckpt)
        dirpath=out / "checkpoints", filename="step-{step}", auto_insert_metric_name=False,
        save_last=True, save_top_k=1, every_n_train_steps=cfg.checkpoint_every or total,
    )
    on_terminal = sys.stderr.isatty()
    callbacks = [
        ReportStop(out / "checkpoints"),  # first: its on_exception runs before any other's
        *([ProgressBar()] if on_terminal else []),
        Throughput(cfg.batch_size, total, cfg.log_every),
        checkpoint,
        _TrackLastCheckpoint(checkpoint),
        Resampling(recipe, data, total),
        FeatureDensity(cfg.density_window),
        HeldoutEval(recipe, data),
    ]
    return L.Trainer(
        max_steps=total,
        logger=make_loggers(recipe, out / "logs", run_name=f"{recipe.name}-train", job_type="train"),
        callbacks=callbacks,
        log_every_n_steps=cfg.log_every,
        enable_progress_bar=on_terminal,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=out,
        deterministic=False,
        **trainer_arguments(recipe),
    )


def train(recipe: Recipe) -> Path:
    out = recipe.path("sae")
    if is_complete(out, recipe, "train"):
        log.info("SAEs in %s are complete; nothing to do", out)
        return out
    if recipe.harvest.mode == "shards":  # live mode reads the recipe's LM itself: nothing to compare
        check_store_recipe(recipe, recipe.store_location())
    if recipe.harvest.split == "heldout":
        log.warning("harvest.split=heldout: training on the held-out split; the held-out metrics of training and "
                    "`sae eval` will be of text the SAEs trained on")
    L.seed_everything(recipe.train.seed, workers=True, verbose=False)
    live_model = None
    if recipe.harvest.mode == "live":
        from framework.lm import load_lm

        live_model = load_lm(recipe)
    data = ActivationDataModule(recipe, world_size(recipe), model=live_model, ranks_per_batch=feature_shards(recipe))
    recipe = resolve_hooks(recipe, data.hook_points)
    data.recipe = recipe
    for cfg in recipe.sae_configs():
        if cfg.d_in and cfg.d_in != data.width(cfg.hook_point):
            raise DataError(
                f"SAE {cfg.name!r} has sae.d_in={cfg.d_in} but {cfg.hook_point!r} in the activations "
                f"has d={data.width(cfg.hook_point)}; set sae.d_in=0 to take it from the store"
            )
    hooks = {c.hook_point for c in recipe.sae_configs()}
    module = SAEModule(recipe, {h: data.width(h) for h in hooks}, {h: data.input_scale(h) for h in hooks},
                       on_meta=recipe.train.strategy == "feature_sharded")
    module.hook_points = data.hook_points
    out.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(recipe, out, data)
    last = out / "checkpoints" / "last.ckpt"  # a file, or a directory for sharded strategies
    resume = resume_checkpoint(last.parent)
    if resume is not None:
        check_checkpoint(resume, recipe)
        log.info("resuming from %s", resume)
        module.last_good_checkpoint = str(resume)  # until this run writes one
    else:
        initialize(module, data, out, trainer.is_global_zero)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    finally:
        finish_tracking(trainer.loggers)
    if trainer.is_global_zero:
        from framework.training.report import write_training_outputs

        write_training_outputs(recipe, _trained_bank(module, trainer, resume or last), trainer, out)
        save_recipe(recipe, out)
        mark_complete(out, recipe, "train", saes=list(module.saes))
    trainer.strategy.barrier()
    return out


def _trained_bank(module: SAEModule, trainer: L.Trainer, last: Path) -> SAEModule:
    """The bank to write out (global rank 0). A checkpoint already at the last step (a run
    stopped while writing its outputs) makes Lightning restore the weights and skip the fit
    loop, on_train_end and the last step's held-out evaluation included: where its tensors are
    whole, the restored module is the result, evaluated here as that step would have."""
    if module.trained_bank is not None:
        return module.trained_bank
    if module.layout.whole_tensors:
        evaluation = next(c for c in trainer.callbacks if isinstance(c, HeldoutEval))
        if not evaluation.results:
            evaluation.evaluate(trainer, module)
        return module
    raise CheckpointError(
        f"{last} is at the last step but the SAEs were never written, and under "
        f"train.strategy={module.recipe.train.strategy} their shards cannot be gathered once "
        f"training is over: delete {last.parent} to train again"
    )


def save_sae(sae, name: str, hook: str, input_scale: float, recipe: Recipe, directory: Path) -> Path:
    """The framework's own SAE format: safetensors weights + config.json (see export.py for SAELens)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in sae.state_dict().items()}
    save_file(tensors, str(directory / "sae.safetensors"))
    config = {
        "name": name, "d_in": sae.d_in, "hook_point": hook, "input_scale": input_scale,
        "sae": vars(sae.cfg) | {"hook_point": hook}, "model": recipe_to_dict(recipe)["lm"],
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1, default=str))
    return directory

