"""Per-unit example stores for the streaming pass: running top-k, uniform samples, histograms.

A "unit" is an SAE feature or, for the neuron baseline, an MLP neuron. Every store here is
vectorised over all units and sees one batch of token activations at a time, so its memory is
O(n_units x examples) whatever the number of tokens streamed. A token is named by one int64
index, `context_id * context_length + position`, decoded back when pages are written.

- `TopExamples` keeps a running (n_units, k) tensor of the largest activations. Each batch is
  first reduced to its own top-k per unit, then merged with `torch.topk` over the
  concatenation: the k largest of a union are among the k largest of each part, so the result
  equals sorting every activation at the end (tests check this).
- `GroupSample` keeps a uniform sample of m firings per group (a unit, or a unit's activation
  interval) by bottom-m random keys: every firing draws a key in [0, 1) and each group keeps
  the m smallest. This is reservoir sampling without a per-item loop, and the sample of a
  union is the bottom-m of the two samples, which is exactly how a batch is merged in.
- `ActivationHistogram` counts firings in fixed log-spaced bins, so histograms of different
  units, SAEs and runs share one axis; its row sums are each unit's firing count (density).

Each store round-trips through `state_dict` / `load_state_dict` (plain tensors, saved with
safetensors) so an interrupted stream resumes where it was saved.
"""

from __future__ import annotations

import math

import torch

# Histogram axis: log10(activation) from 1e-4 to 1e4, 8 bins a decade. Smaller (but positive)
# activations count in the first bin and larger ones in the last, so no firing is lost.
LOG10_LOW, LOG10_HIGH, BINS_PER_DECADE = -4.0, 4.0, 8
N_BINS = int((LOG10_HIGH - LOG10_LOW) * BINS_PER_DECADE)


def histogram_edges() -> list[float]:
    """The log10(activation) edges of the N_BINS bins."""
    return [LOG10_LOW + i / BINS_PER_DECADE for i in range(N_BINS + 1)]


class TopExamples:
    """The k largest activations of every unit, and the token each came from."""

    def __init__(self, n_units: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.values = torch.zeros(n_units, k, device=device)  # (n_units, k), descending
        self.tokens = torch.full((n_units, k), -1, dtype=torch.long, device=device)  # (n_units, k)

    def update(self, acts: torch.Tensor, tokens: torch.Tensor) -> None:
        """acts (rows, n_units) of the tokens (rows,) named by their global index."""
        batch_values, rows = torch.topk(acts.T, min(self.k, acts.shape[0]), dim=1)  # (n_units, <=k)
        values = torch.cat([self.values, batch_values], dim=1)  # (n_units, <=2k)
        candidates = torch.cat([self.tokens, tokens[rows]], dim=1)
        self.values, keep = torch.topk(values, self.k, dim=1)  # (n_units, k)
        self.tokens = candidates.gather(1, keep)

    @property
    def max_activation(self) -> torch.Tensor:
        return self.values[:, 0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.values, self.tokens = state["values"].to(self.values), state["tokens"].to(self.tokens)


class GroupSample:
    """m firings per group, drawn uniformly from all the group's firings in the stream."""

    def __init__(self, n_groups: int, m: int, device: torch.device | str = "cpu"):
        self.m = m
        self.keys = torch.full((n_groups, m), math.inf, dtype=torch.float64, device=device)
        self.tokens = torch.full((n_groups, m), -1, dtype=torch.long, device=device)
        self.values = torch.zeros(n_groups, m, device=device)

    def update(self, groups: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor) -> None:
        """Firings (c,) each with its group, random key in [0, 1), token index and activation."""
        # A firing whose key is above its group's m-th smallest cannot enter: drop it before
        # sorting. For a unit that fires on most tokens that is nearly every firing.
        entering = (keys < self.keys.max(dim=1).values[groups]).nonzero().squeeze(1)
        groups, keys, tokens, values = groups[entering], keys[entering], tokens[entering], values[entering]
        if len(groups) == 0:
            return
        held = torch.isfinite(self.keys).nonzero()  # (h, 2): (group, slot) of every held firing
        groups = torch.cat([held[:, 0], groups])
        keys = torch.cat([self.keys[held[:, 0], held[:, 1]], keys.double()])
        tokens = torch.cat([self.tokens[held[:, 0], held[:, 1]], tokens])
        values = torch.cat([self.values[held[:, 0], held[:, 1]], values.float()])
        # Sort by group, then by key within a group (keys < 1, so group + key orders both).
        order = torch.argsort(groups.double() + keys)
        groups, keys, tokens, values = groups[order], keys[order], tokens[order], values[order]
        rank = torch.arange(len(groups), device=groups.device) - torch.searchsorted(groups, groups)
        kept = rank < self.m
        slot = (groups[kept], rank[kept])
        self.keys.fill_(math.inf)
        self.keys[slot], self.tokens[slot], self.values[slot] = keys[kept], tokens[kept], values[kept]

    def samples(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token indices, activations) held for `group`, in no particular order."""
        held = torch.isfinite(self.keys[group])
        return self.tokens[group][held], self.values[group][held]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "tokens": self.tokens, "values": self.values}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.keys, self.tokens, self.values = (state[k].to(getattr(self, k)) for k in ("keys", "tokens", "values"))


class ActivationHistogram:
    """Per-unit firing counts in the fixed log-spaced bins of `histogram_edges()`."""

    def __init__(self, n_units: int, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(n_units, N_BINS, dtype=torch.long, device=device)

    def update(self, units: torch.Tensor, values: torch.Tensor) -> None:
        """Firings (c,): the unit of each and its (positive) activation."""
        bins = ((torch.log10(values.float()) - LOG10_LOW) * BINS_PER_DECADE).floor().clamp(0, N_BINS - 1)
        flat = units * N_BINS + bins.long()
        self.counts += torch.bincount(flat, minlength=self.counts.numel()).view_as(self.counts)

    @property
    def fires(self) -> torch.Tensor:
        """(n_units,) how many tokens each unit fired on."""
        return self.counts.sum(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.counts = state["counts"].to(self.counts)
