"""Live activations: the same batches as a store, regenerated from the LM instead of disk.

For when running the LM again is cheaper than storing and moving its activations (a large d, a
small model, or a run that reads each row once). The rows are exactly those a harvest of the
same recipe would write, in the order the store reads them without shuffling: both come from
`harvest_window`, window by window. Rank r generates windows r, r + world, ...; resuming skips
whole windows by their row counts without running the LM on them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset

from framework.activations.format import Rows
from framework.activations.harvest import HarvestPlan, harvest_window, make_plan
from framework.activations.reader import rebatch, skip_rows
from framework.config import Recipe
from framework.lm import BaseLM


class LiveStream(IterableDataset):
    def __init__(self, model: BaseLM, recipe: Recipe, batch_size: int, rank: int = 0, world: int = 1,
                 split: str | None = None, n_tokens: int | None = None, start_row: int = 0,
                 max_batches: int | None = None, first_window: int = 0):
        """`split` and `n_tokens`: those a harvest of the recipe reads (harvest.split,
        harvest.n_tokens) unless given (the held-out stream's)."""
        super().__init__()
        self.model, self.recipe, self.batch_size = model, recipe, batch_size
        self.rank, self.world, self.start_row, self.max_batches = rank, world, start_row, max_batches
        self.plan: HarvestPlan = make_plan(recipe, model, split or recipe.harvest.split,
                                           recipe.harvest.n_tokens if n_tokens is None else n_tokens)
        # Samples (init, resampling) start at another window per seed, as a store's draw
        # starts at another shard: training streams start at window 0.
        self.first_window = first_window % self.plan.n_windows

    def windows(self) -> list[int]:
        """This rank's windows, in the order it reads them."""
        order = [(self.first_window + i) % self.plan.n_windows for i in range(self.plan.n_windows)]
        return order[self.rank::self.world]

    def rows_per_rank(self) -> int:
        """The fewest rows any rank's stream holds (each row is read once: no epochs)."""
        return min(sum(self.plan.window_row_count(w) for w in range(r, self.plan.n_windows, self.world))
                   for r in range(self.world))

    def _rows(self) -> Iterator[Rows]:
        to_skip = self.start_row
        for window in self.windows():
            rows_here = self.plan.window_row_count(window)
            if to_skip >= rows_here:
                to_skip -= rows_here
                continue
            rows = harvest_window(self.model, self.recipe, self.plan, window)
            yield from skip_rows(iter([rows]), to_skip)
            to_skip = 0

    def iter_rows(self) -> Iterator[Rows]:
        return self._rows()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return rebatch(self._rows(), self.batch_size, self.max_batches)
