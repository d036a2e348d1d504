"""Automated interpretability: can a language model explain a unit well enough to predict it?

The paper's protocol (after Bills et al. 2023), on the examples `sae analyze` stored in
features.json for each unit with a page:

1. Examples. Three pools: the top activations, the interval samples (highest interval first,
   taken round-robin across intervals) and the random firing examples. Whole contexts are
   dealt alternately to the explainer and the simulator, in the order the pools meet them
   (examples a few tokens apart in one context share most of their window: an explainer shown
   one would see the truth the simulator is scored on); each side takes from its pools in
   turn, up to `analyze.autointerp_explain_examples` (the paper's 49) and
   `analyze.autointerp_simulate_examples` (60). With the default analysis settings (20 top,
   10 x 5 interval, 10 random examples) about 40 reach each side when the examples come from
   many contexts; raise `analyze.top_k_examples` etc. for the paper's full counts. A unit
   whose examples all come from one context has nothing to hold out: it is not scored (listed
   under "unscored").
2. Explanation: the explainer sees its examples, activations quantised to 0-9, and writes a
   phrase (interp_prompts.py).
3. Simulation: given only the explanation, the simulator predicts 0-9 for every token of the
   held-out examples' windows (interp_backends.py).
4. Score: the Spearman rank correlation, over all those tokens, between prediction and true
   activation (the paper's choice; Pearson is recorded beside it). Ties take average ranks.
   A simulator that predicts the same value everywhere explains nothing and scores 0.

The same is done for as many MLP neurons as features (`analyze.autointerp_n_features` of
each, a seeded random sample of the units with pages), which is the paper's comparison:
features are more interpretable than neurons.

Scores are cached in `{analysis}/autointerp/cache.json`, keyed by the backend's identity, the
unit, a hash of its examples and of the prompts, and saved after every unit, so an interrupted
run resumes and a re-run costs nothing. The result goes to `{analysis}/autointerp.json` --
{"features": {"12": {"score": 0.61, "explanation": "..."}}, "neurons": {...}} plus a summary --
and the dashboard is rendered again to show it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import statistics
import time
from pathlib import Path

import torch

from framework.analysis.dashboard import write_dashboard
from framework.analysis.interp_backends import make_backend
from framework.analysis.interp_prompts import PROMPTS_DIGEST, explain_messages
from framework.artifacts import atomic_write_text
from framework.config import AnalyzeConfig, Recipe, RecipeError
from framework.lm import resolve_device
from framework.progress import Progress

log = logging.getLogger(__name__)


def autointerp(recipe: Recipe) -> Path:
    """`sae analyze RECIPE analyze.mode=autointerp`: explain and score features and neurons.

    Returns {analysis}/autointerp (report.md, cache.json); the scores are {analysis}/autointerp.json.
    """
    out = recipe.path("analysis")
    if not (out / "features.json").is_file():
        raise RecipeError(f"autointerp reads the examples of {out}/features.json; run the features analysis first: "
                          f"`sae analyze RECIPE analyze.mode=features` (or analyze.autointerp=true to chain both)")
    data = json.loads((out / "features.json").read_text())
    backend = make_backend(recipe.analyze, str(resolve_device(recipe.lm.device)))
    results = score_kinds(data, backend, recipe.analyze, out / "autointerp" / "cache.json", recipe.seed)
    atomic_write_text(out / "autointerp.json", json.dumps(results, indent=1))
    atomic_write_text(out / "autointerp" / "report.md", report_text(results))
    write_dashboard(out, data)
    return out / "autointerp"


def score_kinds(data: dict, backend, cfg: AnalyzeConfig, cache_path: Path, seed: int = 0) -> dict:
    """Every selected unit of every kind, scored (from the cache where possible)."""
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"model": backend.identity, "score": "spearman", "sae": data["sae"]}
    for kind, record in data["kinds"].items():
        units = select_units(record, cfg.autointerp_n_features, seed)
        progress = Progress(f"autointerp {kind}", len(units), unit="units", every_s=0.0)
        scored, unscored = {}, []
        for unit in units:
            info = record["units"][unit]
            explain, simulate = split_examples(record["pages"][str(unit)], cfg.autointerp_explain_examples,
                                               cfg.autointerp_simulate_examples)
            if not explain or not simulate:  # every example in one context: nothing held out to score on
                unscored.append(unit)
                progress.update(1)
                continue
            key = cache_key(backend.identity, kind, unit, explain, simulate)
            if key not in cache:
                start = time.perf_counter()
                cache[key] = score_unit(backend, explain, simulate, info["max_activation"] or 0.0)
                cache[key]["seconds"] = round(time.perf_counter() - start, 1)
                atomic_write_text(cache_path, json.dumps(cache))
            scored[str(unit)] = cache[key]
            progress.update(1)
        results[kind] = scored
        results.setdefault("unscored", {})[kind] = unscored
    results["summary"] = {kind: _summary(results[kind]) | {"unscored": len(results["unscored"].get(kind, []))}
                          for kind in data["kinds"]}
    return results


def select_units(record: dict, n: int, seed: int) -> list[int]:
    """A seeded random sample of n units with pages (all of them when fewer), in id order."""
    paged = sorted(int(u) for u in record["pages"])
    return sorted(random.Random(seed).sample(paged, min(n, len(paged))))


def split_examples(page: dict, n_explain: int, n_simulate: int) -> tuple[list[dict], list[dict]]:
    """(explainer, simulator) examples from different contexts, each side drawn from top,
    interval and random in turn. Whole contexts are dealt alternately to the two sides, in the
    order they are first met: examples a few tokens apart in one context share most of their
    windows, so an explainer shown one would have seen the truth the simulator is scored on."""
    intervals = [iv["examples"] for iv in page["intervals"]]
    interval_order = [iv[i] for i in range(max(map(len, intervals), default=0)) for iv in intervals if i < len(iv)]
    seen: set[tuple[int, int]] = set()
    side_of_context: dict[int, int] = {}
    sides: tuple[list[list[dict]], list[list[dict]]] = ([[], [], []], [[], [], []])  # side -> pool -> examples
    for i, pool in enumerate((page["top"], interval_order, page["random"])):
        for example in pool:
            if (example["context"], example["position"]) in seen:
                continue
            seen.add((example["context"], example["position"]))
            side = side_of_context.setdefault(example["context"], len(side_of_context) % 2)
            sides[side][i].append(example)
    return _take_in_turn(sides[0], n_explain), _take_in_turn(sides[1], n_simulate)


def _take_in_turn(pools: list[list[dict]], n: int) -> list[dict]:
    taken: list[dict] = []
    for i in range(max(map(len, pools), default=0)):
        taken += [pool[i] for pool in pools if i < len(pool)]
    return taken[:n]


def cache_key(identity: str, kind: str, unit: int, explain: list[dict], simulate: list[dict]) -> str:
    examples = [[e["tokens"], e["activations"]] for e in explain + simulate]
    blob = json.dumps([identity, kind, unit, len(explain), examples, PROMPTS_DIGEST])
    return hashlib.sha256(blob.encode()).hexdigest()


def score_unit(backend, explain: list[dict], simulate: list[dict], max_activation: float) -> dict:
    explanation = backend.explain(explain_messages(explain, max_activation))
    predicted = backend.simulate(explanation, [e["tokens"] for e in simulate])
    # Scored where the activation is known: not at positions the analysis skips (null).
    scored = [(p, a) for e, excerpt in zip(simulate, predicted) for p, a in zip(excerpt, e["activations"])
              if a is not None]
    flat, truth = [p for p, _ in scored], [a for _, a in scored]
    return {
        "explanation": explanation,
        "score": round(spearman(flat, truth), 4),
        "pearson": round(pearson(flat, truth), 4),
        "n_explain": len(explain), "n_simulate": len(simulate), "n_tokens": len(truth),
    }


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; 0 when either side is constant (nothing is predicted)."""
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else 0.0


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman correlation: Pearson of the ranks, ties given their average rank."""
    return pearson(average_ranks(x), average_ranks(y))


def average_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    _, inverse, counts = torch.unique(t, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank (from 0) of each distinct value's first occurrence
    return (first.double() + (counts.double() - 1) / 2)[inverse].tolist()


def _summary(scored: dict) -> dict:
    scores = [s["score"] for s in scored.values()]
    if not scores:
        return {"n": 0, "median": None, "mean": None}
    return {"n": len(scores), "median": statistics.median(scores), "mean": statistics.fmean(scores)}


def report_text(results: dict) -> str:
    lines = [
        f"# Auto-interpretation: {results['sae']}", "",
        f"Explainer and simulator: `{results['model']}`. Score: Spearman correlation between simulated and true "
        "activations over every token of each unit's held-out examples.", "",
        "| units | scored | median score | mean score | unscored (examples from one context) |",
        "|---|---|---|---|---|",
    ]
    for kind, s in results["summary"].items():
        median = "n/a" if s["median"] is None else f"{s['median']:.3f}"
        mean = "n/a" if s["mean"] is None else f"{s['mean']:.3f}"
        lines.append(f"| {kind} | {s['n']} | {median} | {mean} | {s.get('unscored', 0)} |")
    for kind in results["summary"]:
        lines += ["", f"## {kind.capitalize()}", "", "| unit | score | explanation |", "|---|---|---|"]
        for unit, s in sorted(results[kind].items(), key=lambda item: -item[1]["score"]):
            text = s["explanation"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| [{unit}](../dashboard/{kind}/{unit}.html) | {s['score']:.3f} | {text} |")
    return "\n".join(lines) + "\n"
