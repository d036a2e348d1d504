"""features.json: what analysis found, per unit, in plain JSON the dashboard is rendered from.

Tensors become lists and token ids become the strings they decode to, so the file reads
without the tokenizer, the model or this package. Layout (floats rounded for size):

    {sae, hook_point, split, n_tokens, n_contexts, context_length, histogram_log10_edges,
     timings_s,
     kinds: {features | neurons: {
        n_units, n_dead, density_summary,
        units: [{id, density, max_activation, histogram, top_tokens: [[token, count]],
                 logits: {top: [[token, effect]], bottom: [...]} | null,
                 composition: {top: [[neuron, weight]], n50, n90, effective} | null,
                 page: bool}],
        pages: {id: {top: [example], intervals: [{low, high, examples: [example]}],
                     random: [example],
                     ablation: {mean_delta, examples: [{context, position, next_token, delta}],
                                promoted: [[token, delta]], suppressed: [[token, delta]]}}}}}}

An example is {context, position, activation, tokens: [str], activations: [float], focus}:
the window of tokens around it, `focus` indexing the example's own token; an activation is null
at positions below harvest.skip_first_tokens (not analysed).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from framework.analysis.ablation import AblationEffects
from framework.analysis.collect import UnitStats
from framework.analysis.composition import Composition
from framework.analysis.corpus import Corpus
from framework.analysis.logits import LogitEffects
from framework.analysis.revisit import Example, Window
from framework.evaluation.metrics import density_summary

TOP_TOKENS = 5  # most frequent tokens among a unit's top examples, in the index


class TokenNames:
    """Token id -> display string, each id decoded once.

    Special tokens decode to "" by default; the end-of-text token between documents is worth
    seeing (features fire on and predict it), so those are decoded with their names instead.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids) -> list[str]:
        ids = [int(i) for i in ids]
        missing = sorted({i for i in ids if i not in self.cache})
        for i, text in zip(missing, self.tokenizer.token_strings(missing)):
            self.cache[i] = text or self.tokenizer.hf.decode([i], skip_special_tokens=False)
        return [self.cache[i] for i in ids]


@dataclass
class KindResults:
    """Everything computed for one kind of unit, before it becomes JSON."""

    stats: UnitStats
    logits: LogitEffects | None
    composition: Composition | None
    pages: list[int]  # units with a page, most active first


def page_units(stats: UnitStats, n_pages: int) -> list[int]:
    """Units that fired, most active (highest density) first; the first n_pages (-1: all)."""
    density = stats.density
    alive = (density > 0).nonzero().flatten()
    order = alive[torch.argsort(density[alive], descending=True, stable=True)].tolist()
    return order if n_pages < 0 else order[:n_pages]


def top_examples(stats: UnitStats, unit: int) -> list[tuple[int, float]]:
    """(token index, activation) of the unit's top examples that fired, largest first."""
    values, tokens = stats.top.values[unit], stats.top.tokens[unit]
    return [(int(t), float(v)) for t, v in zip(tokens.tolist(), values.tolist()) if v > 0]


def interval_examples(stats: UnitStats, unit: int) -> list[tuple[float, float, list[tuple[int, float]]]]:
    """(low, high, examples) of each activation interval, highest interval first."""
    top = float(stats.top.max_activation[unit])
    out = []
    for j in reversed(range(stats.n_intervals)):
        tokens, values = stats.interval_samples(unit, j)
        order = torch.argsort(values, descending=True)
        examples = list(zip(tokens[order].tolist(), values[order].tolist()))
        out.append((j * top / stats.n_intervals, (j + 1) * top / stats.n_intervals, examples))
    return out


def random_examples(stats: UnitStats, unit: int) -> list[tuple[int, float]]:
    tokens, values = stats.random.samples(unit)
    return list(zip(tokens.tolist(), values.tolist()))


def shown_examples(stats: UnitStats, unit: int) -> list[int]:
    """Token indices of every example a unit's page shows."""
    indices = [t for t, _ in top_examples(stats, unit)] + [t for t, _ in random_examples(stats, unit)]
    indices += [t for _, _, examples in interval_examples(stats, unit) for t, _ in examples]
    return indices


def to_example(index: int, length: int) -> Example:
    return divmod(index, length)


def unit_records(results: KindResults, corpus: Corpus, names: TokenNames) -> list[dict]:
    stats = results.stats
    density, peak, histograms = stats.density.tolist(), stats.top.max_activation.tolist(), stats.histogram.counts.tolist()
    fired = stats.top.values > 0
    top_token_ids = corpus.token_ids(stats.top.tokens.clamp(min=0)).tolist()
    paged = set(results.pages)
    records = []
    for unit in range(len(density)):
        counts = Counter(t for t, ok in zip(top_token_ids[unit], fired[unit].tolist()) if ok)
        common = counts.most_common(TOP_TOKENS)
        records.append({
            "id": unit,
            "density": _round(density[unit]),
            "max_activation": _round(peak[unit]),
            "histogram": histograms[unit],
            "top_tokens": [[s, c] for s, (_, c) in zip(names([t for t, _ in common]), common)],
            "logits": _logit_record(results.logits, unit, names),
            "composition": _composition_record(results.composition, unit),
            "page": unit in paged,
        })
    return records


def page_record(
    kind: str,
    unit: int,
    stats: UnitStats,
    windows: dict[tuple[str, int, int, int], Window],
    effects: AblationEffects,
    length: int,
    names: TokenNames,
    k: int,
) -> dict:
    def example(index: int, value: float) -> dict:
        context, position = to_example(index, length)
        window = windows[(kind, unit, context, position)]
        return {
            "context": context, "position": position, "activation": _round(value),
            "tokens": names(window.tokens), "activations": [_round(a) for a in window.activations],
            "focus": window.focus,
        }

    return {
        "top": [example(t, v) for t, v in top_examples(stats, unit)],
        "intervals": [
            {"low": _round(lo), "high": _round(hi), "examples": [example(t, v) for t, v in examples]}
            for lo, hi, examples in interval_examples(stats, unit)
        ],
        "random": [example(t, v) for t, v in random_examples(stats, unit)],
        "ablation": _ablation_record(effects, unit, names, k),
    }


def kind_record(results: KindResults, corpus: Corpus, names: TokenNames, pages: dict) -> dict:
    density = results.stats.density
    return {
        "n_units": len(density),
        "n_dead": int((density == 0).sum()),
        "density_summary": {k: _round(v) for k, v in density_summary(density.float().cpu()).items()},
        "units": unit_records(results, corpus, names),
        "pages": pages,
    }


def _logit_record(logits: LogitEffects | None, unit: int, names: TokenNames) -> dict | None:
    if logits is None:
        return None
    return {
        "top": [[s, _round(v)] for s, v in zip(names(logits.top_ids[unit]), logits.top_values[unit].tolist())],
        "bottom": [[s, _round(v)] for s, v in zip(names(logits.bottom_ids[unit]), logits.bottom_values[unit].tolist())],
    }


def _composition_record(composition: Composition | None, unit: int) -> dict | None:
    if composition is None:
        return None
    pairs = zip(composition.top_neurons[unit].tolist(), composition.top_weights[unit].tolist())
    return {
        "top": [[n, _round(w)] for n, w in pairs],
        "n50": int(composition.neurons_for_50[unit]),
        "n90": int(composition.neurons_for_90[unit]),
        "effective": _round(float(composition.effective_neurons[unit])),
    }


def _ablation_record(effects: AblationEffects, unit: int, names: TokenNames, k: int) -> dict | None:
    if unit not in effects.examples:
        return None
    promoted, suppressed = effects.moved_tokens(unit, k)
    return {
        "mean_delta": _round(effects.mean_delta(unit)),
        "examples": [
            {"context": e.context, "position": e.position,
             "next_token": None if e.next_token is None else names([e.next_token])[0], "delta": _round(e.delta)}
            for e in effects.examples[unit]
        ],
        "promoted": [[s, _round(v)] for s, v in zip(names(t for t, _ in promoted), (v for _, v in promoted))],
        "suppressed": [[s, _round(v)] for s, v in zip(names(t for t, _ in suppressed), (v for _, v in suppressed))],
    }


def _round(x: float | None, digits: int = 4) -> float | None:
    """Four significant digits; NaN (no next token to score), infinities and None (a position
    the analysis skips) become null."""
    return float(f"{x:.{digits}g}") if x is not None and math.isfinite(x) else None
