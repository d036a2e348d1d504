"""Activation correlations between two sets of units, accumulated over a token stream.

Universality and feature splitting both ask how well unit i of one set (features of an SAE,
or neurons) tracks unit j of another on the same tokens. The Pearson correlation over tokens
needs only running sums -- n, Σa, Σa², Σb, Σb², Σab -- so tokens stream past in batches and
memory is set by how many pairs are tracked, never by how many tokens:

- `PairCorrelation` tracks every pair: Σab is an (n_a, n_b) float64 matrix (4,096 x 4,096 is
  134 MB), which is what an exact best match over all of B needs (universality).
- `CandidateCorrelation` tracks k chosen partners per unit of A: (n_a, k) sums, so matching a
  512-feature SAE against a 16,384-feature one costs O(n_a x k), not O(n_a x n_b) (splitting).

SAE features are sparse (L0 ~ 20 of 4,096), so Σab is built from the pairs that fire together:
for every token, the outer product of A's active units with B's. That touches L0_a x L0_b
entries per token instead of n_a x n_b, about 1,000 times fewer at quickstart size (a dense
4,096-cube matmul per batch takes seconds on two cores; the sparse join, tens of milliseconds).
Dense units (neurons fire on ~40% of tokens) take a float32 matmul instead, in row chunks
added into the float64 sums. Sums are float64 throughout: Σa² - (Σa)²/n cancels badly in
float32 over 10⁵ tokens.
"""

from __future__ import annotations

import torch

SPARSE_BELOW = 0.05  # fraction of nonzero activations under which products use the sparse join
MAX_PAIRS = 1 << 23  # co-firing pairs (or matmul outputs) materialised at once


def pearson(n: int, sa, sa2, sb, sb2, sab) -> torch.Tensor:
    """Pearson correlation from sums over n tokens, broadcasting; 0 where a unit never varies."""
    cov = sab - sa * sb / n
    var = (sa2 - sa * sa / n).clamp(min=0) * (sb2 - sb * sb / n).clamp(min=0)
    return torch.where(var > 0, cov / var.sqrt().clamp(min=1e-300), torch.zeros_like(cov))


class _Moments:
    """n, Σx and Σx² of each unit."""

    def __init__(self, n_units: int, device: torch.device | str):
        self.n = 0
        self.sum = torch.zeros(n_units, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(n_units, dtype=torch.float64, device=device)
        self.fires = torch.zeros(n_units, dtype=torch.long, device=device)

    def update(self, x: torch.Tensor) -> None:
        """x (tokens, n_units); a batch's own sums are exact enough in float32, their total is not."""
        x = x.float()
        self.n += x.shape[0]
        self.sum += x.sum(0).double()
        self.sum_sq += (x * x).sum(0).double()
        self.fires += (x > 0).sum(0)

    @property
    def density(self) -> torch.Tensor:
        """(n_units,) the fraction of tokens each unit fired on."""
        return self.fires.double() / max(self.n, 1)


class PairCorrelation:
    """Every pair's correlation between units a (n_a) and units b (n_b)."""

    def __init__(self, n_a: int, n_b: int, device: torch.device | str = "cpu"):
        self.a, self.b = _Moments(n_a, device), _Moments(n_b, device)
        self.sab = torch.zeros(n_a, n_b, dtype=torch.float64, device=device)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a (tokens, n_a) and b (tokens, n_b): the same tokens' activations."""
        self.a.update(a)
        self.b.update(b)
        if _is_sparse(a) and _is_sparse(b):
            _add_cofiring_products(a, b, self.sab.view(-1))
        else:
            _add_dense_products(a, b, self.sab)

    def best_match(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_a,) each unit of a's highest correlation with any unit of b, and that unit."""
        values, indices = [], []
        rows = max(1, MAX_PAIRS // max(self.sab.shape[1], 1))
        for start in range(0, self.sab.shape[0], rows):
            part = slice(start, start + rows)
            corr = pearson(self.a.n, self.a.sum[part, None], self.a.sum_sq[part, None],
                           self.b.sum[None], self.b.sum_sq[None], self.sab[part])
            best = corr.max(dim=1)
            values.append(best.values)
            indices.append(best.indices)
        return torch.cat(values), torch.cat(indices)


class CandidateCorrelation:
    """Correlations of each unit of a with its own k candidate units of b only."""

    def __init__(self, candidates: torch.Tensor, n_b: int):
        self.candidates = candidates  # (n_a, k) indices into b
        device = candidates.device
        self.a, self.b = _Moments(candidates.shape[0], device), _Moments(n_b, device)
        self.sab = torch.zeros(candidates.shape, dtype=torch.float64, device=device)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a.update(a)
        self.b.update(b)
        tokens, units = a.nonzero(as_tuple=True)  # only tokens where a_i != 0 add to Σ a_i b_j
        step = max(1, MAX_PAIRS // self.candidates.shape[1])
        for start in range(0, len(tokens), step):
            t, i = tokens[start : start + step], units[start : start + step]
            partners = b[t[:, None], self.candidates[i]]  # (nnz, k)
            self.sab.index_add_(0, i, (a[t, i][:, None] * partners).double())

    def correlation(self) -> torch.Tensor:
        """(n_a, k): unit i's correlation with each of its candidates."""
        b_sum, b_sq = self.b.sum[self.candidates], self.b.sum_sq[self.candidates]
        return pearson(self.a.n, self.a.sum[:, None], self.a.sum_sq[:, None], b_sum, b_sq, self.sab)


def _is_sparse(x: torch.Tensor) -> bool:
    return x.numel() > 0 and torch.count_nonzero(x).item() < SPARSE_BELOW * x.numel()


def _add_dense_products(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (n_a, n_b) += aᵀb, a float32 matmul per chunk of a's units."""
    rows = max(1, MAX_PAIRS // max(b.shape[1], 1))
    for start in range(0, a.shape[1], rows):
        out[start : start + rows] += (a[:, start : start + rows].float().T @ b.float()).double()


def _add_cofiring_products(a: torch.Tensor, b: torch.Tensor, flat_out: torch.Tensor) -> None:
    """flat_out (n_a * n_b,) += aᵀb, touching only pairs of units that fire on the same token."""
    n_b = b.shape[1]
    ta, ia = a.nonzero(as_tuple=True)  # row-major: grouped by token
    tb, ib = b.nonzero(as_tuple=True)
    va, vb = a[ta, ia].double(), b[tb, ib].double()
    b_count = torch.bincount(tb, minlength=b.shape[0])
    b_start = torch.cumsum(b_count, 0) - b_count
    partners = b_count[ta]  # how many of b fire with each firing of a
    ends = torch.cumsum(partners, 0)
    first = 0
    while first < len(ta):  # chunks of a's firings with at most MAX_PAIRS partners in all
        done = int(ends[first - 1]) if first else 0
        last = max(first + 1, int(torch.searchsorted(ends, done + MAX_PAIRS, right=True)))
        reps = partners[first:last]
        a_idx = torch.repeat_interleave(torch.arange(first, last, device=a.device), reps)
        offset = torch.arange(len(a_idx), device=a.device) - torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps)
        b_idx = b_start[ta[a_idx]] + offset
        flat_out.index_add_(0, ia[a_idx] * n_b + ib[b_idx], va[a_idx] * vb[b_idx])
        first = last
