"""The LightningDataModule that feeds SAE training: shards from a store, or live from the LM.

Batches are tuples with one (batch, d) tensor per harvested hook point; each SAE of the bank
picks its own. The global batch is split over the data-parallel ranks; the ranks of one
feature-shard group (strategy=feature_sharded) hold different features of the same rows, so
they read the same slice (`ranks_per_batch` of them per slice). The stream starts after the
rows this rank consumed before a resume, which Lightning's restored `global_step` tells
(`global_step x per-rank batch`), so a resumed run sees exactly the rows an uninterrupted run
would have seen next.
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch.utils.data import DataLoader

from framework.activations.reader import ActivationStore, ActivationStream, open_heldout_store, sub_store
from framework.config import Recipe, total_steps
from framework.errors import DataError, RecipeError

log = logging.getLogger(__name__)


class ActivationDataModule(L.LightningDataModule):
    def __init__(self, recipe: Recipe, world_size: int = 1, model=None, ranks_per_batch: int = 1):
        super().__init__()
        self.recipe = recipe
        self.ranks_per_batch = ranks_per_batch
        self.world_size = world_size // ranks_per_batch  # data-parallel replicas
        cfg = recipe.train
        if cfg.batch_size % self.world_size:
            raise DataError(
                f"train.batch_size={cfg.batch_size} does not split evenly over {self.world_size} "
                f"data-parallel ranks; use a multiple of {self.world_size}"
            )
        self.rank_batch = cfg.batch_size // self.world_size
        self.total_steps = total_steps(recipe)
        self.live_model = model if recipe.harvest.mode == "live" else None
        self._live_rows: int | None = None  # available_rows() in live mode, once counted
        if self.live_model is not None and cfg.num_workers > 0:
            raise RecipeError(
                f"train.num_workers={cfg.num_workers} with harvest.mode=live: live activations come from "
                f"the LM in the training process, which worker processes cannot share. Set "
                f"train.num_workers=0, or harvest a store (harvest.mode=shards) to read it with workers."
            )
        self.store = None if self.live_model is not None else ActivationStore(
            recipe.store_location(), verify=recipe.harvest.verify_on_read
        )
        self._check_enough_rows()

    # ---- what the store holds -----------------------------------------------------------

    @property
    def hook_points(self) -> list[str]:
        return list(self.recipe.harvest.hook_points) if self.store is None else self.store.manifest.hook_points

    def width(self, hook: str) -> int:
        if self.store is not None:
            return self.store.manifest.width(hook)
        return self.live_model.hook_points()[hook]

    def input_scale(self, hook: str) -> float:
        """Factor that brings rows to mean norm sqrt(d) (peers' normalisation), or 1."""
        if self.recipe.train.normalize_activations == "none":
            return 1.0
        if self.store is None:
            norms = self.sample(4096, seed=0)[self.hook_points.index(hook)].norm(dim=1)
            mean_norm = norms.mean().item()
        else:
            mean_norm = self.store.manifest.normalisation[hook]["mean_norm"]
        return math.sqrt(self.width(hook)) / mean_norm

    def available_rows(self) -> int:
        """The rows a sample can draw from: the store's, or those live mode generates (harvest.n_tokens,
        or fewer where the split's text holds fewer)."""
        if self.store is not None:
            return self.store.manifest.rows
        if self._live_rows is None:
            from framework.activations.live import LiveStream

            self._live_rows = LiveStream(self.live_model, self.recipe, 1).plan.rows
        return self._live_rows

    def _check_enough_rows(self) -> None:
        cfg = self.recipe.train
        need = self.total_steps * self.rank_batch
        if self.store is None:
            from framework.activations.live import LiveStream

            have = LiveStream(self.live_model, self.recipe, self.rank_batch, world=self.world_size).rows_per_rank()
            if have < need:
                raise DataError(
                    f"train.n_tokens={cfg.n_tokens:,} needs {need:,} rows per rank but harvest.mode=live with "
                    f"harvest.n_tokens={self.recipe.harvest.n_tokens:,} generates {have:,} per rank, each once "
                    f"(live activations have no epochs; each rank generates whole windows of "
                    f"harvest.shuffle_window rows, so with several ranks the fewest rows per rank decide). Raise "
                    f"harvest.n_tokens, or lower train.n_tokens."
                )
            return
        per_epoch = self.store.rows_per_epoch(0, self.world_size)
        if per_epoch * cfg.epochs < need:
            raise DataError(
                f"train.n_tokens={cfg.n_tokens:,} needs {need:,} rows per rank but the store "
                f"{self.store.location} gives {per_epoch:,} per rank per epoch x train.epochs={cfg.epochs}. "
                f"Harvest more (harvest.n_tokens), lower train.n_tokens, or raise train.epochs "
                f"(the paper never repeats data)."
            )
        shards = self.store.manifest.shards
        uneven = self.store.n_shards % self.world_size or len({s.rows for s in shards}) > 1
        if self.world_size > 1 and per_epoch < need and uneven:
            log.warning(
                "training reads past one epoch of %s, whose %d shards give the %d data-parallel ranks different "
                "numbers of rows per epoch: ranks cross into the next epoch at different steps, so a global batch "
                "near the crossing can hold rows of one shard read by two ranks. Shards of equal size, in a count "
                "the ranks divide, avoid it", self.store.location, self.store.n_shards, self.world_size)

    # ---- streams ------------------------------------------------------------------------

    def _stream(self, start_row: int, rank: int, world: int, seed: int, max_batches: int | None,
                batch: int, shuffle: bool = True, dtype: torch.dtype | None = torch.float32):
        if self.store is not None:
            return ActivationStream(self.store, batch, rank=rank, world=world, seed=seed,
                                    epochs=self.recipe.train.epochs, shuffle=shuffle,
                                    start_row=start_row, max_batches=max_batches, dtype=dtype)
        from framework.activations.live import LiveStream

        return LiveStream(self.live_model, self.recipe, batch, rank=rank, world=world,
                          start_row=start_row, max_batches=max_batches)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        step = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        rank, world = self.data_rank(rank, world)
        if step:
            log.info("resuming the activation stream at step %d (row %s of this rank)", step,
                     f"{step * self.rank_batch:,}")
        # Batches come in the store's dtype (SAEModule.scaled_input widens them on the device) and,
        # bound for a GPU, in page-locked memory, so that their copy is asynchronous and at full speed.
        stream = self._stream(step * self.rank_batch, rank, world, self.recipe.train.seed,
                              self.total_steps - step, self.rank_batch, dtype=None)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(stream, batch_size=None, num_workers=self.recipe.train.num_workers, pin_memory=on_gpu)

    def data_rank(self, rank: int, world: int) -> tuple[int, int]:
        """Which slice of the data this process reads: ranks r·k … r·k + k - 1 of a feature-shard
        group of k read slice r (the device mesh is data-parallel-major)."""
        return rank // self.ranks_per_batch, world // self.ranks_per_batch

    def sample(self, n: int, seed: int) -> list[torch.Tensor]:
        """n rows per hook point, drawn reproducibly (for initialisation and resampling)."""
        if self.store is None:
            stream = self._live_sample(n, seed)
        else:
            stream = self._stream(0, 0, 1, seed=10_007 + seed, max_batches=1, batch=n)
        try:
            return list(next(iter(stream)))
        except StopIteration:
            rows = self.store.manifest.rows if self.store is not None else "too few"
            raise DataError(f"cannot draw a sample of {n:,} rows: the store has {rows} rows") from None

    def _live_sample(self, n: int, seed: int):
        """n live rows from a seeded place: from window `seed` on (the windows in a ring), past a
        seeded number of rows, so that each resampling scores other rows, as a store's sample
        starts at another shard."""
        from framework.activations.live import LiveStream

        stream = LiveStream(self.live_model, self.recipe, n, max_batches=1, first_window=seed)
        spare = stream.rows_per_rank() - n
        if spare > 0:
            stream.start_row = int(torch.randint(spare + 1, (), generator=torch.Generator().manual_seed(10_007 + seed)))
        return stream

    def heldout_batches(self, n_batches: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        """Held-out rows for periodic evaluation (the store's heldout/ split): up to `n_batches`
        of `batch` rows, or one batch of all there are where the split holds less than `batch`
        (a stream drops a last partial batch, and no batch at all would leave nothing to score)."""
        location = sub_store(self.recipe.store_location(), "heldout")
        heldout_tokens = self.recipe.harvest.heldout_tokens
        if self.store is None and heldout_tokens > 0:
            from framework.activations.live import LiveStream

            stream = LiveStream(self.live_model, self.recipe, batch, split="heldout", n_tokens=heldout_tokens,
                                max_batches=n_batches)
            stream.batch_size = min(batch, stream.plan.rows)
        elif self.store is None:
            log.warning("harvest.heldout_tokens=0: periodic evaluation uses training rows")
            stream = self._stream(0, 0, 1, seed=1, max_batches=n_batches, batch=batch)
        elif (store := open_heldout_store(self.recipe.store_location(), self.recipe.harvest.verify_on_read)) is None:
            log.warning("no held-out store at %s; periodic evaluation uses training rows", location)
            stream = self._stream(0, 0, 1, seed=1, max_batches=n_batches, batch=batch)
        else:
            stream = ActivationStream(store, min(batch, store.manifest.rows), shuffle=False, max_batches=n_batches)
        batches = list(stream)
        if not batches:
            raise DataError(f"no held-out rows for periodic evaluation in {location}; re-run `sae harvest RECIPE` "
                            f"with harvest.heldout_tokens > 0")
        return batches
