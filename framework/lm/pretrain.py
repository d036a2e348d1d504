"""`sae pretrain`: train the built-in one-layer LM on the recipe's text, as a real Lightning run.

The paper's base model was trained on 100B tokens of the Pile; here a few hundred AdamW steps on
the Python standard library give a model whose MLP neurons already respond to code structure,
which is all the SAE stages need to show the method working. The run is an ordinary Lightning
fit (GPU when present, CSV + W&B logs, periodic held-out validation, a resumable checkpoint), and
it reports its held-out loss next to the unigram and bigram baselines fitted on the same
training tokens, so "it learned something" is a number, not a belief.

Output directory (`recipe.path("lm")`): model.safetensors, config.json, tokenizer.json,
metrics.json, report.md, recipe.yaml, csv/ and wandb/ logs, checkpoints/, and COMPLETE last.
Files are written under temporary names and renamed; a complete directory is skipped on rerun,
and an interrupted run of the same recipe resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file
from torch.nn import functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

from framework.artifacts import (
    atomic_write_text,
    differences_from,
    is_complete,
    mark_complete,
    stage_fingerprint,
)
from framework.config import PretrainConfig, Recipe, save_recipe
from framework.errors import CheckpointError, DataError
from framework.lm import resolve_device
from framework.lm.base import Tokenizer
from framework.lm.baselines import bigram_loss, unigram_loss
from framework.lm.builtin import BuiltinArchitecture, BuiltinLM
from framework.lm.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from framework.memory import freed_memory_kept
from framework.precision import warn_if_emulated_on_cpu
from framework.progress import Progress
from framework.text import TextSourceError, iter_documents, load_contexts, stdlib_identity, token_stream
from framework.tracking import finish_tracking, make_loggers
from framework.training.callbacks import ProgressBar

log = logging.getLogger(__name__)

STARTED = ".pretrain-started.json"  # the fingerprint of the recipe an unfinished run belongs to


IGNORED = -100  # a target that does not count (F.cross_entropy's ignore_index)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(logits, targets, ignore_index=IGNORED) in float32, the same loss and
    gradient (0, not nan, when no target counts), for (rows, vocab) logits nothing else reads
    afterwards: it overwrites float32 logits with their softmax's numerator and turns that into
    the gradient in place."""
    return _NextTokenLoss.apply(logits, targets)


class _NextTokenLoss(torch.autograd.Function):
    """The (rows, vocab) logits are the largest tensor of a pretraining step (4,096 x 4,096 for
    the quickstart's batch), and F.cross_entropy makes about seven passes over them with three
    more tensors of their size (log-softmax, its gradient, a zero-filled one-hot gradient). Here:
    the row max, exp(x - max) in place, its row sums, and in backward one in-place scaling plus a
    scatter at the targets. The quickstart's step (forward, backward, AdamW) on 2 CPU cores:
    132 -> 120 ms with freed memory kept, as `sae pretrain` runs (framework/memory.py), 175 ->
    121 ms without."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = logits if logits.dtype == torch.float32 else logits.float()  # overwritten below
        counted = targets != IGNORED
        safe_targets = torch.where(counted, targets, 0)
        picked = x.gather(1, safe_targets[:, None]).squeeze(1)  # the targets' logits
        row_max = x.amax(dim=1)
        numerator = x.sub_(row_max[:, None]).exp_()  # exp(x - max): the softmax times its row sum
        row_sum = numerator.sum(dim=1)
        rows = counted.sum().clamp_min(1)
        losses = row_max + row_sum.log() - picked  # logsumexp(x) - x[target]
        ctx.save_for_backward(numerator, row_sum, safe_targets, counted, rows)
        ctx.logits_dtype = logits.dtype
        return torch.where(counted, losses, 0).sum() / rows

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        numerator, row_sum, safe_targets, counted, rows = ctx.saved_tensors
        scale = counted * (grad / rows)  # (rows,): d loss / d (a row's loss)
        gradient = numerator.mul_((scale / row_sum)[:, None])  # softmax · scale
        gradient.scatter_add_(1, safe_targets[:, None], -scale[:, None])  # minus the one-hot target
        return gradient.to(ctx.logits_dtype), None


class PretrainModule(L.LightningModule):
    """Next-token cross-entropy; AdamW with linear warm-up then cosine decay to zero."""

    def __init__(self, model: BuiltinLM, cfg: PretrainConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens)  # (batch, seq, vocab)
        # The last position has no target: ignoring it beats slicing the logits, which would
        # copy the largest tensor of the step (and zero-fill its gradient) on every step.
        targets = F.pad(tokens[:, 1:], (0, 1), value=IGNORED)  # (batch, seq)
        return next_token_loss(logits.flatten(0, 1), targets.flatten())

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch[0])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch[0]), prog_bar=True)

    def configure_optimizers(self):
        # Decay matrices only: decaying LayerNorm gains and biases towards zero only hurts.
        params = list(self.model.parameters())
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.95))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, self.cfg))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class LogProgress(Callback):
    """Off a terminal (no progress bar): tokens/s and ETA every few seconds, held-out loss per eval."""

    def __init__(self, cfg: PretrainConfig, context_length: int):
        self.tokens_per_step = cfg.batch_size * context_length
        self.progress = Progress("pretrain", cfg.steps * self.tokens_per_step, unit="tokens")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.progress.update(self.tokens_per_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None and not trainer.sanity_checking:
            log.info("pretrain step %d: held-out loss %.4f", trainer.global_step, float(loss))


class BatchOrder(Sampler[list[int]]):
    """The training batches: each epoch a fresh random permutation of the contexts in batches,
    the last partial batch dropped, in exactly the order DataLoader(shuffle=True, drop_last=True,
    generator=torch.Generator().manual_seed(seed)) gives under Lightning (one int64 draw for the
    DataLoader iterator's base seed, then the permutation, per epoch), but a function of (seed,
    epoch) alone that can start at any batch: `start`, set to the trainer's global step when
    training starts, is where the next iteration begins (its epoch and the batches it skips).
    So a resumed run trains on the batches the uninterrupted run would have, where a plain
    DataLoader replays the interrupted epoch from its beginning."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self.start = 0
        self._generator: torch.Generator | None = None
        self._epoch = -1  # the epoch whose permutation self._generator drew last

    def __len__(self) -> int:
        return self.per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._generator is None or epoch <= self._epoch:
            self._generator, self._epoch = torch.Generator().manual_seed(self.seed), -1
        while self._epoch < epoch:  # one step per epoch in a run; from the seed on a resume
            torch.empty((), dtype=torch.int64).random_(generator=self._generator)
            permutation = torch.randperm(self.n, generator=self._generator)
            self._epoch += 1
        return permutation

    def __iter__(self):
        epoch, skip = divmod(self.start, self.per_epoch)
        self.start += self.per_epoch - skip  # the next iteration starts the next epoch
        batches = self.permutation(epoch)[: self.per_epoch * self.batch_size].view(self.per_epoch, -1)
        yield from batches[skip:].tolist()


class StartAtGlobalStep(Callback):
    """Starts the batch order at the trainer's global step (0, or the resumed checkpoint's):
    one batch per step, as pretraining accumulates no gradients."""

    def __init__(self, order: BatchOrder):
        self.order = order

    def on_train_start(self, trainer, pl_module) -> None:
        self.order.start = trainer.global_step


class _ResumableLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable mid-epoch (it warns about any other one):
    its BatchOrder resumes by itself, from the global step, so the checkpoint records nothing."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def pretrain(recipe: Recipe) -> Path | str:
    if not recipe.pretrains_lm:  # a ready-made LM: nothing to train; `sae` prints this
        return (f"nothing to pretrain: lm.name={recipe.lm.name!r} is loaded ready-made (sae pretrain "
                f"trains only the built-in LM, lm.name=builtin); go on with `sae harvest RECIPE`")
    out = recipe.path("lm")
    if is_complete(out, recipe, "pretrain"):
        log.info("pretrain: %s is complete; skipping", out)
        return out
    # The corpus's first document before anything is written: a text.source that is not there
    # (or holds nothing readable) fails here, not after lm/ and its started-marker were made.
    if next(iter_documents(recipe.text), None) is None:
        raise TextSourceError(f"text.source {recipe.text.source!r} holds no documents: nothing to pretrain on")
    out.mkdir(parents=True, exist_ok=True)
    resume = _resumable(out, recipe)
    L.seed_everything(recipe.lm.builtin.seed, workers=True, verbose=False)
    start = time.perf_counter()
    tokenizer = load_tokenizer(out / "tokenizer.json") if resume else _train_tokenizer(recipe, out)
    train, heldout = _contexts(recipe, tokenizer)
    arch = BuiltinArchitecture.from_config(recipe.lm.builtin, recipe.text.context_length, tokenizer.vocab_size)
    module = PretrainModule(BuiltinLM(arch, tokenizer), recipe.pretrain)
    _fit(recipe, module, train, heldout, out, resume)
    model = module.model.float().cpu().eval()
    metrics = _metrics(recipe, model, tokenizer, heldout, time.perf_counter() - start)
    _write_model(out, model, arch, metrics)
    save_recipe(recipe, out)
    mark_complete(out, recipe, "pretrain", heldout_loss=metrics["heldout_loss"],
                  corpus=stdlib_identity() if recipe.text.source == "stdlib" else None)
    (out / STARTED).unlink(missing_ok=True)
    log.info("pretrain: held-out loss %.3f (unigram %.3f, bigram %.3f) -> %s", metrics["heldout_loss"],
             metrics["unigram_heldout_loss"], metrics["bigram_heldout_loss"], out)
    return out


def _resumable(out: Path, recipe: Recipe) -> bool:
    """True if `out` holds an unfinished run of this very recipe, False for a fresh start.

    Raises CheckpointError if `out` holds the checkpoint of an unfinished run of a different
    recipe (or of an unknown one): starting over would delete it, resuming would mix the two."""
    started = out / STARTED
    checkpoint = out / "checkpoints" / "last.ckpt"
    fingerprint = json.dumps(stage_fingerprint(recipe, "pretrain"), sort_keys=True, default=str)
    if checkpoint.is_file():
        differences = _started_differences(started, recipe)
        if differences:
            raise CheckpointError(
                f"{out} holds an interrupted pretraining run of a different recipe "
                f"({'; '.join(differences[:5])}), with its checkpoint {checkpoint}. Resuming it would mix "
                f"two experiments and starting over would delete it: rerun with the settings it was "
                f"started with to finish it, or delete {checkpoint.parent} to start this recipe from "
                f"scratch (or pretrain into another workdir or lm.path)."
            )
        if (out / "tokenizer.json").is_file():
            log.info("pretrain: resuming the unfinished run in %s", out)
            return True
        log.warning("pretrain: %s has no tokenizer.json, without which its checkpoint cannot be resumed; "
                    "starting over", out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    atomic_write_text(started, fingerprint)
    return False


def _started_differences(started: Path, recipe: Recipe) -> list[str]:
    """How the recipe that started the unfinished run in `started`'s directory differs from
    `recipe` ("key: value there, value here" each); empty when it is the same."""
    try:
        recorded = json.loads(started.read_text())
    except FileNotFoundError:
        return [f"no {STARTED} records which recipe started it"]
    except (OSError, ValueError) as err:
        return [f"{started} is unreadable ({type(err).__name__}: {err})"]
    return differences_from(recorded, recipe, "pretrain")


def _train_tokenizer(recipe: Recipe, out: Path) -> Tokenizer:
    tokenizer = train_tokenizer(recipe.text, recipe.lm.builtin.vocab_size)
    tmp = out / ".tokenizer.json.tmp"
    save_tokenizer(tokenizer, tmp)
    tmp.replace(out / "tokenizer.json")
    return tokenizer


def _contexts(recipe: Recipe, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """All training contexts, and the held-out contexts validation reads (val_batches of them)."""
    cfg = recipe.pretrain
    train = load_contexts(recipe.text, tokenizer, "train")  # (n_train, context_length)
    heldout = load_contexts(recipe.text, tokenizer, "heldout", stop=cfg.val_batches * cfg.batch_size)
    if len(train) < cfg.batch_size:
        raise DataError(
            f"only {len(train)} training contexts of {recipe.text.context_length} tokens, fewer than one "
            f"batch (pretrain.batch_size={cfg.batch_size}); use more text or a smaller batch or context"
        )
    log.info("pretrain: %d training contexts, %d held-out contexts of %d tokens",
             len(train), len(heldout), recipe.text.context_length)
    return train, heldout


def _fit(recipe: Recipe, module: PretrainModule, train: torch.Tensor, heldout: torch.Tensor,
         out: Path, resume: bool) -> None:
    cfg = recipe.pretrain
    order = BatchOrder(len(train), cfg.batch_size, recipe.lm.builtin.seed)
    train_loader = _ResumableLoader(TensorDataset(train), batch_sampler=order)
    val_loader = DataLoader(TensorDataset(heldout), cfg.batch_size)
    on_tty = sys.stderr.isatty()
    accelerator = _accelerator(recipe.lm.device)
    warn_if_emulated_on_cpu("pretrain.precision", cfg.precision, accelerator["accelerator"] == "cpu")
    checkpoint = ModelCheckpoint(out / "checkpoints", save_last=True, save_top_k=0,
                                 every_n_train_steps=cfg.val_every, enable_version_counter=False)
    progress = ProgressBar() if on_tty else LogProgress(cfg, recipe.text.context_length)
    callbacks: list[Callback] = [checkpoint, progress, StartAtGlobalStep(order)]
    trainer = L.Trainer(
        max_steps=cfg.steps, max_epochs=-1, val_check_interval=cfg.val_every, check_val_every_n_epoch=None,
        limit_val_batches=cfg.val_batches, num_sanity_val_steps=0, precision=cfg.precision,
        logger=make_loggers(recipe, out, run_name=f"{recipe.name}-pretrain", job_type="pretrain"),
        callbacks=callbacks, enable_progress_bar=on_tty, enable_model_summary=False,
        log_every_n_steps=min(10, cfg.steps), default_root_dir=out, **accelerator,
    )
    # Each step allocates (batch × context × vocab) logits and their gradient afresh (64 MiB each
    # at the quickstart's shape); reusing freed memory instead of faulting those pages in again
    # made pretraining 46% faster on 2 cores, for 10% more peak RSS (framework/memory.py).
    try:
        with freed_memory_kept():
            trainer.fit(module, train_loader, val_loader,
                        ckpt_path=out / "checkpoints" / "last.ckpt" if resume else None, weights_only=True)
    finally:
        finish_tracking(trainer.loggers)


def _accelerator(device: str) -> dict:
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return {"accelerator": "gpu", "devices": [resolved.index or 0]}
    return {"accelerator": "cpu", "devices": 1}


@torch.no_grad()
def _metrics(recipe: Recipe, model: BuiltinLM, tokenizer: Tokenizer, heldout: torch.Tensor, seconds: float) -> dict:
    train_tokens = torch.from_numpy(token_stream(recipe.text, tokenizer, "train").tokens()).long()
    vocab = tokenizer.vocab_size
    losses = [model.next_token_loss(batch) for batch in heldout.split(recipe.pretrain.batch_size)]
    weights = torch.tensor([len(batch) for batch in heldout.split(recipe.pretrain.batch_size)], dtype=torch.float)
    return {
        "heldout_loss": float((torch.stack(losses) * weights).sum() / weights.sum()),
        "unigram_heldout_loss": unigram_loss(train_tokens, heldout, vocab),
        "bigram_heldout_loss": bigram_loss(train_tokens, heldout, vocab),
        "heldout_tokens": heldout[:, 1:].numel(),
        "train_tokens": len(train_tokens),
        "steps": recipe.pretrain.steps,
        "tokens_seen": recipe.pretrain.steps * recipe.pretrain.batch_size * recipe.text.context_length,
        "vocab_size": vocab,
        "wall_time_s": round(seconds, 1),
    }


def _write_model(out: Path, model: BuiltinLM, arch: BuiltinArchitecture, metrics: dict) -> None:
    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps(asdict(arch), indent=1))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    atomic_write_text(out / "report.md", _report(metrics))


def _report(m: dict) -> str:
    return (
        "# Pretraining (built-in LM)\n\n"
        f"{m['steps']} steps, {m['tokens_seen']:,} tokens seen ({m['train_tokens']:,} training tokens), "
        f"vocabulary {m['vocab_size']:,}, {m['wall_time_s']:.0f} s.\n\n"
        "| held-out loss (nats/token) | value |\n|---|---|\n"
        f"| built-in LM | {m['heldout_loss']:.3f} |\n"
        f"| bigram baseline | {m['bigram_heldout_loss']:.3f} |\n"
        f"| unigram baseline | {m['unigram_heldout_loss']:.3f} |\n"
    )
