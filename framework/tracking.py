"""Experiment tracking: W&B through Lightning's WandbLogger, and always a CSV log beside it.

W&B runs online only when an API key is in the environment; otherwise offline, so a run on an
air-gapped node still leaves a run directory that `wandb sync` uploads later. The key itself is
read by wandb from the environment and is never passed through, logged or saved here.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from framework.config import Recipe, WandbConfig, recipe_to_dict
from framework.errors import FrameworkError

# Seconds wandb waits for an online run to start (its own default is 90, and with its retries a
# node without network failed only after about 2 minutes). WANDB_INIT_TIMEOUT overrides it.
INIT_TIMEOUT_S = 30.0


class TrackingError(FrameworkError):
    """W&B could not start the run the recipe asks for."""


class _CheckedWandbLogger(WandbLogger):
    """WandbLogger whose run start fails with a TrackingError saying how to go on without the
    network, not with wandb's traceback (CommError, AuthenticationError)."""

    def __init__(self, *args, why_online: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._why_online = why_online
        # Lightning passes anonymous=None to wandb.init, which wandb 0.31 answers with "The
        # anonymous setting has no effect" on every run; left out, wandb's default is the same.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self):
        import wandb

        try:
            return WandbLogger.experiment.fget(self)
        except wandb.errors.Error as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            key = os.environ.get("WANDB_API_KEY")
            if key:
                message = message.replace(key, "<WANDB_API_KEY>")
            raise TrackingError(
                f"W&B could not start an online run ({self._why_online}): {type(err).__name__}: {message}. "
                f"Without network access or a valid key, run offline with train.wandb.mode=offline (or "
                f"WANDB_MODE=offline; upload later with `wandb sync`), or turn W&B off with "
                f"train.wandb.mode=disabled; the CSV log is written either way"
            ) from None


def wandb_mode(cfg: WandbConfig) -> str:
    if not cfg.enabled or cfg.mode == "disabled":
        return "disabled"
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _public_config(recipe: Recipe) -> dict:
    """The recipe as logged: never anything that looks like a credential."""
    config = recipe_to_dict(recipe)
    config["analyze"].pop("autointerp_api_key_env", None)
    return config


class _ResumableCSVWriter(ExperimentWriter):
    """Lightning's CSV writer deletes metrics.csv when its directory holds files, so a resumed
    run lost every row logged before the interruption (its curves and report showed only the
    resumed part). This one keeps them: at its first save it keeps the earlier rows of the steps
    before the first one it writes (the resumed run logs the later ones again) and goes on."""

    def _check_log_dir_exists(self) -> None:
        self._earlier: list[dict[str, str]] = []
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self._earlier = list(csv.DictReader(file))
            self._fs.rm_file(self.metrics_file_path)

    def save(self) -> None:
        if self._earlier and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            kept = [{k: v for k, v in row.items() if v != ""} for row in self._earlier
                    if row.get("step") and int(float(row["step"])) < first]
            self.metrics = kept + self.metrics
            self._earlier = []
        super().save()


class _ResumableCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableCSVWriter(log_dir=self.log_dir)
        return self._experiment


def make_loggers(recipe: Recipe, save_dir: str | os.PathLike, run_name: str, job_type: str) -> list[Logger]:
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    loggers: list[Logger] = [_ResumableCSVLogger(save_dir, name="csv", version="")]
    cfg = recipe.train.wandb
    mode = wandb_mode(cfg)
    if mode != "disabled" and "WANDB_MODE" in os.environ and not os.environ["WANDB_MODE"].strip():
        # Set but empty (`WANDB_MODE= sae train ...`, a job template's blank): wandb_mode reads it
        # as unset, while wandb itself refuses "" as a mode when the run starts.
        del os.environ["WANDB_MODE"]
    if mode != "disabled":
        extra = {}
        if mode == "online" and "WANDB_INIT_TIMEOUT" not in os.environ:
            import wandb

            extra["settings"] = wandb.Settings(init_timeout=INIT_TIMEOUT_S)
        why = (f"train.wandb.mode={cfg.mode}" if cfg.mode != "auto" else
               f"WANDB_MODE={os.environ['WANDB_MODE']}" if os.environ.get("WANDB_MODE") else "train.wandb.mode=auto with WANDB_API_KEY set")
        loggers.append(
            _CheckedWandbLogger(
                why_online=why,
                name=run_name,
                project=cfg.project,
                entity=cfg.entity or None,
                save_dir=str(save_dir),
                mode=mode,
                job_type=job_type,
                tags=list(cfg.tags),
                config=_public_config(recipe),
                **extra,
            )
        )
    return loggers


def finish_tracking(loggers: list[Logger]) -> None:
    """Close this stage's W&B run, so the next stage in the same process starts its own
    (WandbLogger would otherwise reuse the run still open) and an offline run is complete."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def log_metrics(trainer, metrics: dict[str, float | torch.Tensor], step: int) -> None:
    """Write `metrics` to the trainer's loggers now, labelled `step`: the training step (0-based
    batch index) whose values they are.

    Instead of LightningModule.log, which cost about 1 ms of Python per metric on a CPU core (a
    bank of seven SAEs logs 60-odd per logging step) and writes only at its log_every_n_steps, so
    a value logged at another step came out later under that step's label. Tensor values cross
    to the host in one transfer. Every rank may call this; the loggers write on rank 0 only."""
    tensors = [value for value in metrics.values() if isinstance(value, torch.Tensor)]
    if tensors:
        device = tensors[0].device
        host = iter(torch.stack([t.detach().float().reshape(()).to(device) for t in tensors]).tolist())
        metrics = {key: next(host) if isinstance(value, torch.Tensor) else float(value)
                   for key, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()  # as Lightning does after each write: the CSV log on disk stays current
