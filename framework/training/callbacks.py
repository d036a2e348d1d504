"""Cross-cutting work around `SAEModule.training_step`: resampling, density, evaluation.

Resampling follows the paper's appendix exactly (see `framework/sae/resampling.py` for the
math); what this callback adds is *when*: at `train.resample_steps`, for features silent over
the last `dead_window` steps. The paper resampled at 25k, 50k, 75k and 100k of 1M steps with a
12,500-step window; a short run keeps those proportions but compressed at most 4x less than
linear scaling would, so that a CPU run of a few hundred steps still resamples at a tenth,
two tenths... of its length with a window long enough to mean something.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque

import lightning as L
import torch

from framework.config import Recipe
from framework.evaluation.metrics import density_summary, in_activation_units
from framework.progress import Progress

log = logging.getLogger(__name__)

# The paper's procedure is for its ReLU + L1 dictionary; the later variants have their own
# remedy for dead latents (April 2024: none needed; TopK: the AuxK loss; JumpReLU: its L0 STE).
RESAMPLED_VARIANTS = {"paper"}

PAPER_TOTAL_STEPS = 1_000_000
PAPER_RESAMPLE_STEPS = (25_000, 50_000, 75_000, 100_000)
PAPER_DEAD_WINDOW = 12_500


def schedule_scale(total: int) -> float:
    return max(total / PAPER_TOTAL_STEPS, min(1.0, total / 250_000))


def resample_steps(recipe: Recipe, total: int) -> list[int]:
    if recipe.train.resample_steps is not None:
        return sorted(recipe.train.resample_steps)
    scale = schedule_scale(total)
    return [s for s in (max(1, round(p * scale)) for p in PAPER_RESAMPLE_STEPS) if s < total]


def dead_window(recipe: Recipe, total: int) -> int:
    if recipe.train.dead_window > 0:
        return recipe.train.dead_window
    return max(1, round(PAPER_DEAD_WINDOW * schedule_scale(total)))


class Resampling(L.Callback):
    """The paper's dead-feature resampling, for the SAEs whose variant uses it."""

    def __init__(self, recipe: Recipe, datamodule, total: int):
        self.recipe = recipe
        self.datamodule = datamodule
        self.steps = set(resample_steps(recipe, total))
        self.window = dead_window(recipe, total)
        self.history: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps:
            return
        module.resolve_finite_check()  # never resample from nan weights: the step's check first
        optimizer = trainer.optimizers[0]
        for name, sae in module.saes.items():
            if sae.variant not in RESAMPLED_VARIANTS or not self.recipe.train.resample:
                continue
            dead = module.stats[name].steps_since_fired >= min(self.window, step)
            n_dead = int(module.layout.sum_over_features(dead.sum()))  # of the whole dictionary
            resampled = n_dead if n_dead and self._resample(module, name, sae, dead, optimizer, step) else 0
            self.history.append({"step": step, "sae": name, "resampled": resampled})
            module.record_metrics({f"{name}/resampled": float(resampled)}, step=step - 1)
            if resampled < n_dead:
                log.warning("step %d: %s has %d dead features and none was resampled: no input of the "
                            "resampling sample has a reconstruction error to draw from (each is zero or "
                            "reconstructed exactly)", step, name, n_dead)
            else:
                log.info("step %d: %s resampled %d dead features", step, name, n_dead)

    @torch.no_grad()
    def _resample(self, module, name: str, sae, dead: torch.Tensor, optimizer, step: int) -> bool:
        hook = module.hook_of[name]
        size = min(self.recipe.train.resample_sample_size, self.datamodule.available_rows())
        sample = self.datamodule.sample(size, seed=step)[module.hook_points.index(hook)].to(module.device)
        inputs = sample * module.input_scales.get(hook, 1.0)
        generator = torch.Generator(device="cpu").manual_seed(self.recipe.train.seed * 7_919 + step)
        if not module.layout.resample(sae, dead, inputs, generator, optimizer):  # the same draw on every rank
            return False
        module.stats[name].steps_since_fired[dead] = 0
        return True

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))


class FeatureDensity(L.Callback):
    """Every `density_window` steps: log each SAE's feature-density histogram, then reset."""

    def __init__(self, window: int):
        self.window = window
        self.last: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        last_step = trainer.global_step >= trainer.max_steps
        if trainer.global_step % self.window and not last_step:
            return
        for name in module.saes:
            stats = module.stats[name]
            if stats.window_rows.item() == 0:
                continue
            density = module.feature_density(name).float().cpu()
            self.last[name] = density
            summary = {f"{name}/density/{key}": value for key, value in density_summary(density).items()}
            module.record_metrics(summary, step=trainer.global_step - 1)
            self._log_histogram(trainer, name, density)
            stats.reset_window()

    @staticmethod
    def _log_histogram(trainer, name: str, density: torch.Tensor) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                values = torch.log10(density.clamp_min(1e-10)).numpy()
                logger.experiment.log({f"{name}/log10_density": wandb.Histogram(values),
                                       "trainer/global_step": trainer.global_step - 1})

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = dict(state.get("last", {}))


class HeldoutEval(L.Callback):
    """Every `eval_every` steps and at the end: MSE, FVU, L0, L1 on held-out activations."""

    def __init__(self, recipe: Recipe, datamodule):
        self.every = recipe.train.eval_every
        self.datamodule = datamodule
        self.n_batches = recipe.train.eval_batches
        self.batches = None
        self.results: dict[str, dict[str, float]] = {}

    def on_fit_start(self, trainer, module) -> None:
        # Read now, not at the first evaluation (often the last step): a broken held-out split
        # must stop the run before it trains, not after, when the final checkpoint was not yet
        # written and the whole run would be lost.
        self._load_batches()

    def _load_batches(self) -> None:
        if self.batches is None:
            batch = min(self.datamodule.recipe.train.batch_size, 4096)  # the same rows under any strategy
            self.batches = self.datamodule.heldout_batches(self.n_batches, batch)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step >= trainer.max_steps or (self.every and step % self.every == 0):
            module.resolve_finite_check()  # no metrics of nan weights: the step's check first
            self.evaluate(trainer, module)

    @torch.no_grad()
    def evaluate(self, trainer, module) -> dict[str, dict[str, float]]:
        self._load_batches()
        for name, sae in module.saes.items():
            metrics = in_activation_units(
                module.layout.evaluate(sae, [module.scaled_input(tuple(t.to(module.device) for t in b), name)
                                             for b in self.batches]),
                module.input_scales.get(module.hook_of[name], 1.0))
            self.results[name] = metrics
            module.record_metrics({f"{name}/eval/{key}": value for key, value in metrics.items()},
                                  step=trainer.global_step - 1)
        return self.results


class ProgressBar(L.pytorch.callbacks.TQDMProgressBar):
    """Lightning's terminal progress bar (`sae train`, `sae pretrain`), redrawn at most every
    `interval_s` seconds (and at the last step) instead of after every step: a redraw formats the
    bar and the metrics, 0.3-0.6 ms of host time per step on 2 CPU cores (300 steps of a
    64-feature SAE, with and without a terminal), which on a GPU, where a step takes a few
    milliseconds, is time the device waits.
    (`_should_update` is the bar's own hook for its refresh_rate, which counts steps, not time.)"""

    def __init__(self, interval_s: float = 0.25):
        super().__init__()
        self.interval_s = interval_s
        self._drawn_at = -float("inf")

    def _should_update(self, current: int, total: int) -> bool:
        now = time.monotonic()
        if not self.is_enabled or (now - self._drawn_at < self.interval_s and current != total):
            return False
        self._drawn_at = now
        return True


class Throughput(L.Callback):
    """Tokens (activation rows of the global batch) per second of the whole training loop: reading
    the batch, the step, every callback. Logged as `train/tokens_per_s`, the mean over the steps
    timed since the last log (a step is timed from its batch's start to the next one's, so the
    time of a held-out evaluation or a checkpoint at a logging step counts in the next window),
    and, off a terminal, where Lightning shows no progress bar (cluster jobs), printed with the
    ETA every 30 seconds on rank 0 (after a resume: of the tokens still to go).

    `step_seconds` keeps the wall time of the last 10,000 steps (start of one batch to the start
    of the next), for bench/train_loop.py. A resumed run counts from where it resumed."""

    def __init__(self, rows_per_step: int, total_steps: int, log_every: int):
        self.rows_per_step = rows_per_step
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.step_seconds: deque[float] = deque(maxlen=10_000)
        self._last_start: float | None = None
        self._window: list[float] = []
        self._progress: Progress | None = None

    def on_train_start(self, trainer, module) -> None:
        if trainer.is_global_zero and not sys.stderr.isatty():
            remaining = max(0, self.total_steps - trainer.global_step) * self.rows_per_step
            self._progress = Progress("train", remaining, unit="tokens", every_s=30.0, logger=log)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_start is not None:
            self.step_seconds.append(now - self._last_start)
            self._window.append(now - self._last_start)
        self._last_start = now

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._progress is not None:
            self._progress.update(self.rows_per_step)
        if self._window and trainer.global_step % self.log_every == 0:
            seconds = sum(self._window) / len(self._window)
            module.record_metrics({"train/tokens_per_s": self.rows_per_step / seconds}, step=trainer.global_step - 1)
            self._window.clear()
