"""`SAEModule`: a bank of SAEs trained on the same batches, as one LightningModule.

The paper trained runs A/0-A/5 (512 -> 131,072 features) on identical data; a bank does that in
one pass over the activations, which is where most of the cost of a sweep over sizes goes. The
SAEs share nothing but the batch: one Adam optimizer with one parameter group per SAE is
exactly equivalent to separate optimizers (Adam's state is per parameter) and keeps Lightning's
automatic optimization, which every strategy (DDP, FSDP, DeepSpeed) supports.

`training_step` holds only the math. Feature statistics that callbacks need (steps since each
feature last fired, fires in the current density window) live in buffers, so they are
checkpointed with the weights and a resumed run makes the same resampling decisions.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from framework.config import Recipe, SAEConfig
from framework.errors import TrainingError
from framework.sae import build_sae


class FeatureStats(nn.Module):
    """Per-feature firing statistics of one SAE (buffers: checkpointed, moved with the model)."""

    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("steps_since_fired", torch.zeros(n_features, dtype=torch.long))
        self.register_buffer("window_fires", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("window_rows", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, fire_counts: torch.Tensor, batch_rows: int) -> None:
        fires = fire_counts.to(torch.float64)  # (n_features,)
        rows = torch.tensor(float(batch_rows), dtype=torch.float64, device=fires.device)
        if dist.is_available() and dist.is_initialized():
            # Every rank must see the same statistics, or resampling would diverge the replicas.
            both = torch.cat([fires, rows.view(1)])
            dist.all_reduce(both)
            fires, rows = both[:-1], both[-1]
        self.window_fires += fires
        self.window_rows += rows
        self.steps_since_fired += 1
        self.steps_since_fired[fires > 0] = 0

    def density(self) -> torch.Tensor:
        return self.window_fires / self.window_rows.clamp_min(1)

    def reset_window(self) -> None:
        self.window_fires.zero_()
        self.window_rows.zero_()


class SAEModule(L.LightningModule):
    def __init__(self, recipe: Recipe, widths: dict[str, int], input_scales: dict[str, float]):
        super().__init__()
        self.recipe = recipe
        self.configs: dict[str, SAEConfig] = {c.name: c for c in recipe.sae_configs()}
        self.hook_of = {name: c.hook_point for name, c in self.configs.items()}
        self.saes = nn.ModuleDict({name: build_sae(widths[c.hook_point], c) for name, c in self.configs.items()})
        self.stats = nn.ModuleDict({name: FeatureStats(c.n_features) for name, c in self.configs.items()})
        self.input_scales = dict(input_scales)
        self.hook_points: list[str] = []  # order of the tensors in a batch; set by train()
        self.last_good_checkpoint: str | None = None

    # ---- the math ---------------------------------------------------------------------------

    def scaled_input(self, batch: tuple[torch.Tensor, ...], name: str) -> torch.Tensor:
        hook = self.hook_of[name]
        x = batch[self.hook_points.index(hook)]
        scale = self.input_scales.get(hook, 1.0)
        return x * scale if scale != 1.0 else x

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        total = 0.0
        log_now = self.global_step % self.recipe.train.log_every == 0
        for name, sae in self.saes.items():
            x = self.scaled_input(batch, name)
            out = sae(x, self.global_step)
            self._check_finite(name, out.loss)
            self.stats[name].update(out.fire_counts(), x.shape[0])
            total = total + out.loss
            if log_now:
                self._log_step(name, x, out)
        return total

    def _check_finite_weights(self, name: str, sae, step: int) -> None:
        # The sparse fast paths mask NaN pre-activations to zero features, so a diverged
        # encoder can leave the loss finite; the weights themselves are the reliable signal.
        local = (p.to_local() if hasattr(p, "to_local") else p for p in sae.parameters())  # DTensor shards
        if not all(torch.isfinite(t).all() for t in local):
            where = self.last_good_checkpoint or "none was written yet (set train.checkpoint_every)"
            raise TrainingError(
                f"SAE {name!r}: weights became non-finite (nan/inf) at step {step}; training stopped. "
                f"The last good checkpoint is kept: {where}. Lower train.lr, set train.grad_clip, "
                f"or check the activations for inf (`sae harvest RECIPE --verify`)."
            )

    def _check_finite(self, name: str, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            where = self.last_good_checkpoint or "none was written yet (set train.checkpoint_every)"
            raise TrainingError(
                f"SAE {name!r}: loss is {loss.item()} at step {self.global_step}; training stopped. "
                f"The last good checkpoint is kept: {where}. Lower train.lr, set train.grad_clip, "
                f"or check the activations for inf (`sae harvest RECIPE --verify`)."
            )

    @torch.no_grad()
    def _log_step(self, name: str, x: torch.Tensor, out) -> None:
        residual = (x - out.reconstruction).float()
        fvu = residual.pow(2).sum() / (x.float() - x.float().mean(0)).pow(2).sum().clamp_min(1e-12)
        metrics = {f"{name}/{k}": v.detach().float() for k, v in out.losses.items()}
        metrics[f"{name}/fvu"] = fvu
        metrics[f"{name}/l0"] = out.fire_counts().sum().float() / x.shape[0]
        dead_after = self.dead_window()
        metrics[f"{name}/dead_fraction"] = (self.stats[name].steps_since_fired >= dead_after).float().mean()
        group = list(self.saes).index(name)
        metrics[f"{name}/lr"] = torch.tensor(self.trainer.optimizers[0].param_groups[group]["lr"])
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, sync_dist=False)

    # ---- the paper's decoder constraint, around Lightning's optimizer step -------------------

    def on_before_optimizer_step(self, optimizer) -> None:
        for group, sae in zip(optimizer.param_groups, self.saes.values()):
            sae.before_optimizer_step()
            if self.recipe.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(group["params"], self.recipe.train.grad_clip)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # Renormalise right after the step, before any callback (resampling, checkpointing)
        # sees the weights: a checkpoint must hold the constrained decoder.
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        for name, sae in self.saes.items():
            sae.after_optimizer_step()
            self._check_finite_weights(name, sae, step)

    # ---- optimisation -----------------------------------------------------------------------

    def configure_optimizers(self):
        cfg = self.recipe.train
        groups = [{"params": list(sae.parameters()), "name": name} for name, sae in self.saes.items()]
        optimizer = torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas))
        total = total_steps(self.recipe)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def dead_window(self) -> int:
        from framework.training.callbacks import dead_window

        return dead_window(self.recipe, total_steps(self.recipe))

    # ---- checkpoints carry the recipe, so a foreign one can be refused ---------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from framework.artifacts import stage_fingerprint

        checkpoint["sae_framework"] = {
            "fingerprint": stage_fingerprint(self.recipe, "train"),
            "hook_points": self.hook_points,
            "input_scales": self.input_scales,
        }


def total_steps(recipe: Recipe) -> int:
    return max(1, recipe.train.n_tokens // recipe.train.batch_size)


def lr_factor(step: int, total: int, cfg) -> float:
    """Linear warm-up, then constant, linear decay over the last fraction, or cosine."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_decay == "linear":
        decay_start = total * (1 - cfg.lr_decay_fraction)
        return 1.0 if step < decay_start else max(0.0, (total - step) / max(total - decay_start, 1))
    if cfg.lr_decay == "cosine":
        progress = (step - cfg.lr_warmup_steps) / max(1, total - cfg.lr_warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0

