"""Feature ablation: what removing one unit does to next-token log-likelihood where it fires.

For each of a unit's top examples (context c, position p), the hook's activation over the whole
context is replaced by `baseline - a_i * direction_i` (see units.py) and compared with the
baseline spliced in alone -- for an SAE feature, the reconstruction minus the feature's
contribution f_i W_dec[i] / scale against the full reconstruction, so the SAE's own error is
not charged to the feature. The unit is removed at every position, not only at p: that is what
"the model without this feature" means, and in deeper models attention carries earlier
positions' removal to p. At p this measures

- the change in log p(actual next token), averaged over the examples: negative when the unit
  helps predict what comes next;
- the change in log p of every vocabulary token, averaged: the tokens the unit promotes (their
  log-prob falls most without it) and those it suppresses.

For the paper's one-layer model this is the logit effect (logits.py) seen through the real
LayerNorm and softmax on real contexts, so the two tables should agree.

Forward passes are shared: one per context gives the baseline at every example position in it,
and one per (context, unit) the ablation at all of that unit's positions there. A causal
model's logits at p depend only on tokens up to p, so each pass stops at the last position it
needs rather than running the full context.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from framework.analysis.units import Units
from framework.lm.base import BaseLM

LOGIT_BUDGET = 2**22  # floats of (sequences, positions, vocab) logits one forward pass may hold


@dataclass
class AblationExample:
    context: int
    position: int
    next_token: int | None  # None at the context's last position
    delta: float  # change in log p(next token); nan without a next token


@dataclass
class AblationEffects:
    """Accumulated ablation results of one kind of unit, for the units asked about."""

    examples: dict[int, list[AblationExample]] = field(default_factory=dict)
    delta_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # unit -> (vocab,) summed change

    def add(self, unit: int, example: AblationExample, delta: torch.Tensor) -> None:
        self.examples.setdefault(unit, []).append(example)
        if unit not in self.delta_sum:
            self.delta_sum[unit] = torch.zeros(delta.shape, dtype=torch.float64)
        self.delta_sum[unit] += delta.double().cpu()

    def mean_delta(self, unit: int) -> float:
        """Mean change in log p(actual next token) over the unit's examples that have one."""
        deltas = [e.delta for e in self.examples.get(unit, []) if e.next_token is not None]
        return sum(deltas) / len(deltas) if deltas else float("nan")

    def moved_tokens(self, unit: int, k: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """(tokens whose log-prob fell most, tokens whose log-prob rose most), mean change each."""
        mean = self.delta_sum[unit] / len(self.examples[unit])
        down = torch.topk(mean, k, largest=False)
        up = torch.topk(mean, k)
        return (
            list(zip(down.indices.tolist(), down.values.tolist())),
            list(zip(up.indices.tolist(), up.values.tolist())),
        )


Sequence = tuple[int, int, list[int]]  # (row of the batch, unit ablated (-1: none), positions)


@torch.no_grad()
def measure_ablations(
    model: BaseLM,
    hook: str,
    units: Units,
    tokens: torch.Tensor,
    acts: torch.Tensor,
    unit_acts: torch.Tensor,
    pairs: list[tuple[int, int, int]],
    context_ids: list[int],
    effects: AblationEffects,
    skip_first_tokens: int = 0,
) -> None:
    """Ablate each (row, unit, position) of this batch of contexts and add it to `effects`.

    tokens (b, L), acts (b, L, d_in) at the hook, unit_acts (b, L, n_units); context_ids[row]
    names row's context. One forward pass per row gives the baseline at all its positions, and
    one per (row, unit) the ablation at all of that unit's positions in the row. Positions below
    `skip_first_tokens` keep the model's own activation in both: the SAE never trained there
    (position 0 sees only itself, and in deeper models holds an atypical, large activation), so
    its reconstruction there would move both passes off the model's distribution.
    """
    if not pairs:
        return
    baseline = units.baseline(acts, unit_acts)  # (b, L, d_in)
    baseline[:, :skip_first_tokens] = acts[:, :skip_first_tokens]
    by_row: dict[int, list[int]] = defaultdict(list)
    by_row_unit: dict[tuple[int, int], list[int]] = defaultdict(list)
    for row, unit, position in pairs:
        by_row[row].append(position)
        by_row_unit[(row, unit)].append(position)

    def clean_patches(rows: torch.Tensor, _units: torch.Tensor, stop: int) -> torch.Tensor:
        return baseline[rows, :stop]  # (c, stop, d_in)

    def ablated_patches(rows: torch.Tensor, unit_ids: torch.Tensor, stop: int) -> torch.Tensor:
        contribution = unit_acts[rows, :stop, unit_ids][..., None] * units.directions[unit_ids][:, None, :]
        contribution[:, :skip_first_tokens] = 0  # removed only where the baseline is the SAE's
        return baseline[rows, :stop] - contribution  # (c, stop, d_in)

    clean = _logprobs(model, hook, tokens, [(row, -1, ps) for row, ps in by_row.items()], clean_patches)
    ablated = _logprobs(model, hook, tokens, [(r, u, ps) for (r, u), ps in by_row_unit.items()], ablated_patches)
    length = tokens.shape[1]
    for (row, unit), positions in by_row_unit.items():
        clean_row = clean[(row, -1)]
        for position, ablated_lp in zip(positions, ablated[(row, unit)]):
            delta = ablated_lp - clean_row[by_row[row].index(position)]  # (vocab,)
            next_token = int(tokens[row, position + 1]) if position + 1 < length else None
            change = float(delta[next_token]) if next_token is not None else float("nan")
            effects.add(unit, AblationExample(context_ids[row], position, next_token, change), delta)


def _logprobs(
    model: BaseLM, hook: str, tokens: torch.Tensor, sequences: list[Sequence], patches: Callable
) -> dict[tuple[int, int], torch.Tensor]:
    """(row, unit) -> log-softmax (len(positions), vocab) at the sequence's positions, with the
    hook's activation replaced by patches(rows, units, stop).

    Sequences are sorted by their last position and run several to a forward pass, each pass
    stopping at the last position it needs: similar lengths share a pass, so little is cut off
    late or computed for nothing.
    """
    chunk = max(1, LOGIT_BUDGET // (tokens.shape[1] * model.tokenizer.vocab_size))
    sequences = sorted(sequences, key=lambda s: max(s[2]))
    out = {}
    for start in range(0, len(sequences), chunk):
        part = sequences[start : start + chunk]
        stop = max(part[-1][2]) + 1
        rows = torch.tensor([row for row, _, _ in part], device=tokens.device)
        unit_ids = torch.tensor([unit for _, unit, _ in part], device=tokens.device)
        replacement = patches(rows, unit_ids, stop)
        logits = model.run(tokens[rows, :stop], splice={hook: lambda a, r=replacement: r.to(a.dtype)}).logits
        for i, (row, unit, positions) in enumerate(part):
            out[(row, unit)] = torch.log_softmax(logits[i, positions].float(), dim=-1)
    return out
