"""The last, partial pass: the contexts of the examples the dashboard shows, read again.

Pages show each example as a window of tokens around it, each token highlighted by the unit's
activation there. Rather than carrying activation windows through the streaming stores
(n_units x examples x window floats, for every unit, while pages exist for a few hundred), the
stream keeps only (context id, position) and this pass fetches the shown contexts again by id,
runs them through the LM and the SAE once more and cuts out the windows. Each context is read
once however many examples point into it, so for the default 200 pages this costs at most one
more pass over the analysed tokens and usually much less. The same forward pass feeds the
ablation of every paged unit's top examples (ablation.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from framework.analysis.ablation import AblationEffects, measure_ablations
from framework.analysis.corpus import Corpus
from framework.analysis.units import Units
from framework.lm.base import BaseLM
from framework.progress import Progress

Example = tuple[int, int]  # (context id, position)


@dataclass
class Window:
    tokens: list[int]  # token ids around the example
    activations: list[float | None]  # the unit's activation at each of them (None: not analysed)
    focus: int  # index of the example's own token in the window


def window_bounds(position: int, size: int, length: int) -> tuple[int, int]:
    """[start, end) of a window of `size` tokens around `position`: mostly before it, where the
    tokens that made the unit fire are, and a quarter after, to show what it predicts."""
    after = size // 4
    start = max(0, position - (size - 1 - after))
    return start, min(length, position + after + 1)


@torch.no_grad()
def revisit(
    model: BaseLM,
    hook: str,
    units: dict[str, Units],
    corpus: Corpus,
    shown: dict[str, dict[int, list[Example]]],
    ablated: dict[str, dict[int, list[Example]]],
    window: int,
    batch_size: int,
) -> tuple[dict[tuple[str, int, int, int], Window], dict[str, AblationEffects]]:
    """Windows of every shown example, keyed (kind, unit, context, position), and ablation effects
    of every ablated example, per kind of unit."""
    by_context = _by_context(shown, ablated)
    effects = {kind: AblationEffects() for kind in units}
    windows: dict[tuple[str, int, int, int], Window] = {}
    contexts = sorted(by_context)
    progress = Progress("analyze revisit", len(contexts), unit="contexts")
    for start in range(0, len(contexts), batch_size):
        ids = contexts[start : start + batch_size]
        tokens = corpus.fetch(ids).to(model.device)  # (b, L)
        acts = model.run(tokens, capture=[hook], stop_at=hook).activations[hook]  # (b, L, d_in)
        for kind, unit_set in units.items():
            unit_acts = unit_set.activations(acts)  # (b, L, n_units)
            pairs = []
            for row, context in enumerate(ids):
                for request_kind, unit, position, is_ablation in by_context[context]:
                    if request_kind != kind:
                        continue
                    if is_ablation:
                        pairs.append((row, unit, position))
                    else:
                        lo, hi = window_bounds(position, window, tokens.shape[1])
                        windows[(kind, unit, context, position)] = Window(
                            tokens[row, lo:hi].tolist(),
                            _unanalysed_as_none(unit_acts[row, lo:hi, unit].tolist(), lo, corpus.skip_first_tokens),
                            position - lo,
                        )
            measure_ablations(model, hook, unit_set, tokens, acts, unit_acts, pairs, ids, effects[kind],
                              corpus.skip_first_tokens)
        progress.update(len(ids))
    return windows, effects


def _unanalysed_as_none(activations: list[float], start: int, skip: int) -> list[float | None]:
    """The window's activations, None at positions the analysis skips (below skip_first_tokens:
    atypical, never seen by the SAE in training): their tokens are shown as context, unlit, and
    autointerp does not score them."""
    return [None if start + i < skip else a for i, a in enumerate(activations)]


def _by_context(
    shown: dict[str, dict[int, list[Example]]], ablated: dict[str, dict[int, list[Example]]]
) -> dict[int, list[tuple[str, int, int, bool]]]:
    """context id -> its requests: (kind, unit, position, whether to ablate rather than show)."""
    by_context: dict[int, list[tuple[str, int, int, bool]]] = defaultdict(list)
    for wanted, is_ablation in ((shown, False), (ablated, True)):
        for kind, per_unit in wanted.items():
            for unit, examples in per_unit.items():
                for context, position in examples:
                    by_context[context].append((kind, unit, position, is_ablation))
    return by_context
