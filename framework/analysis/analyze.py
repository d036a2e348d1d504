"""`sae analyze`: one trained SAE's features (and, beside them, the MLP's neurons) made readable.

Steps, each in its own module:

    corpus.py       which contexts: held-out text, `analyze.n_tokens` tokens of it
    collect.py      two streaming passes: top examples, interval and random samples,
                    histograms, density (bounded memory, resumable)
    logits.py       each unit's direct logit effect through W_out and W_U
    composition.py  which neurons each feature's decoder direction is built from
    revisit.py      the shown examples' contexts again: activation windows, and
    ablation.py     what removing a unit does to next-token log-likelihood on its top examples
    records.py      all of it as features.json
    dashboard.py    a static HTML site rendered from features.json
    report.py       report.md: the headline numbers and a few features

`analyze.mode` runs one of the other analyses instead, each into its own subdirectory or file:
splitting.py (features across the bank's dictionary sizes), universality.py (best-match
correlations with another run's features), autointerp.py (LLM explanations and scores).

Everything is done for the SAE's features and, when the SAE reads MLP neurons, for the neurons
themselves, so the paper's comparison (features are more interpretable than neurons) can be
made on the same tokens with the same tools.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from framework.analysis.collect import UnitStats, stream_unit_stats
from framework.analysis.composition import has_composition, neuron_composition
from framework.analysis.corpus import Corpus, analysis_corpus
from framework.analysis.dashboard import write_dashboard
from framework.analysis.examples import histogram_edges
from framework.analysis.logits import logit_effects, readout
from framework.analysis.records import (
    KindResults,
    TokenNames,
    kind_record,
    page_record,
    page_units,
    shown_examples,
    to_example,
    top_examples,
)
from framework.analysis.report import write_report
from framework.analysis.revisit import revisit
from framework.analysis.units import Units, units_for
from framework.artifacts import (
    atomic_write_text,
    fingerprint_digest,
    is_complete,
    mark_complete,
    stage_fingerprint,
    trained_weights_digest,
)
from framework.config import AnalyzeConfig, Recipe, RecipeError, save_recipe
from framework.lm import load_lm
from framework.lm.base import BaseLM
from framework.saved import TrainedSAE, load_saes_for_lm

log = logging.getLogger(__name__)
STATE_FILE = "stream_state.safetensors"
TOP_NEURONS = 10  # neurons listed in a feature's composition


# analyze.mode -> (module, stage function); "features" is `analyze_features` below.
MODES = {
    "splitting": ("framework.analysis.splitting", "split"),
    "universality": ("framework.analysis.universality", "compare_universality"),
    "autointerp": ("framework.analysis.autointerp", "autointerp"),
}


def analyze(recipe: Recipe) -> Path:
    """The stage: `analyze.mode` picks what it does (features by default); returns where it wrote."""
    if recipe.analyze.mode in MODES:
        module, function = MODES[recipe.analyze.mode]
        return getattr(importlib.import_module(module), function)(recipe)
    out = analyze_features(recipe)
    if recipe.analyze.autointerp:
        from framework.analysis.autointerp import autointerp

        autointerp(recipe)
    return out


def analyze_features(recipe: Recipe) -> Path:
    out = recipe.path("analysis")
    if is_complete(out, recipe, "analyze"):
        log.info("analysis in %s is complete; nothing to do", out)
        return out
    model = load_lm(recipe)
    weights = trained_weights_digest(recipe, "analyze")  # of the files about to be read
    trained = pick_sae(load_saes_for_lm(recipe, model), recipe.analyze.sae_name)
    corpus = analysis_corpus(recipe.text, model.tokenizer, recipe.analyze.n_tokens, recipe.harvest.skip_first_tokens)
    # Progress resumes only for the same recipe, the same weights (SAEs trained again in between
    # make other features) and the same kind of device (lm.device is volatile, but a GPU's random
    # draws and rounding are not the CPU's: the two passes must see the same activations).
    digest = fingerprint_digest({**stage_fingerprint(recipe, "analyze"),
                                 "sae_weights": weights,
                                 "device": model.device.type})
    analyze_sae(model, trained, corpus, recipe.analyze, out, digest, recipe.seed)
    save_recipe(recipe, out)
    mark_complete(out, recipe, "analyze", sae=trained.name, sae_weights=weights)
    return out


def pick_sae(saes: list[TrainedSAE], name: str, key: str = "analyze.sae_name") -> TrainedSAE:
    """The SAE called `name`, or the first SAE of the bank when it is empty; `key` is the recipe key
    that gave the name, for the error."""
    if not name:
        return saes[0]
    for trained in saes:
        if trained.name == name:
            return trained
    raise RecipeError(f"{key}={name!r} is not a trained SAE; the bank has {', '.join(s.name for s in saes)}")


@torch.no_grad()
def analyze_sae(
    model: BaseLM,
    trained: TrainedSAE,
    corpus: Corpus,
    cfg: AnalyzeConfig,
    out: Path,
    digest: str = "",
    seed: int = 0,
) -> dict:
    """Every analysis of one SAE; writes features.json, dashboard/ and report.md under `out`.

    `digest` names the inputs: progress saved under a different digest is not resumed.
    """
    out.mkdir(parents=True, exist_ok=True)
    # Scores of an earlier analysis (of SAEs since trained again) are keyed by unit id: kept, they
    # would sit beside other features. Autointerp's cache stays (keyed by the examples themselves).
    (out / "autointerp.json").unlink(missing_ok=True)
    (out / "autointerp" / "report.md").unlink(missing_ok=True)
    hook, timings = trained.hook_point, {}
    units = units_for(trained)
    with _timed(timings, "stream"):
        stats = stream_unit_stats(model, hook, units, corpus, cfg, out / STATE_FILE, digest, seed)
    with _timed(timings, "logits_composition"):
        results = unit_results(model, hook, units, stats, cfg)
    with _timed(timings, "revisit_ablation"):
        shown, ablated = example_requests(results, cfg, corpus.context_length)
        windows, effects = revisit(model, hook, units, corpus, shown, ablated, cfg.context_window, cfg.batch_size)
    with _timed(timings, "records_dashboard"):
        names = TokenNames(model.tokenizer)
        kinds = {}
        for kind, r in results.items():
            pages = {
                str(u): page_record(kind, u, r.stats, windows, effects[kind], corpus.context_length, names,
                                    cfg.logit_top_tokens)
                for u in r.pages
            }
            kinds[kind] = kind_record(r, corpus, names, pages)
        data = {
            "sae": trained.name, "hook_point": hook, "split": corpus.split,
            "n_tokens": stats["features"].n_tokens, "n_contexts": corpus.n_contexts,
            "context_length": corpus.context_length, "histogram_log10_edges": histogram_edges(),
            "timings_s": timings, "kinds": kinds,
        }
        write_dashboard(out, data)
    atomic_write_text(out / "features.json", json.dumps(data))
    write_report(out, data)
    (out / STATE_FILE).unlink(missing_ok=True)
    log.info("analysis of %s written to %s (%s)", trained.name, out,
             ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return data


def unit_results(model: BaseLM, hook: str, units: dict[str, Units], stats: dict[str, UnitStats],
                 cfg: AnalyzeConfig) -> dict[str, KindResults]:
    """Logit effects, composition (features in neuron space only) and the units given pages."""
    readout_matrix = readout(model, hook)
    return {
        kind: KindResults(
            stats=stats[kind],
            logits=None if readout_matrix is None else logit_effects(u.directions, readout_matrix, cfg.logit_top_tokens),
            composition=neuron_composition(u.directions, TOP_NEURONS)
            if kind == "features" and has_composition(hook) else None,
            pages=page_units(stats[kind], cfg.n_features),
        )
        for kind, u in units.items()
    }


def example_requests(results: dict[str, KindResults], cfg: AnalyzeConfig, length: int) -> tuple[dict, dict]:
    """(examples each page shows, top examples each page ablates), as kind -> unit -> [(context, position)]."""
    shown = {
        kind: {u: [to_example(t, length) for t in shown_examples(r.stats, u)] for u in r.pages}
        for kind, r in results.items()
    }
    ablated = {
        kind: {u: [to_example(t, length) for t, _ in top_examples(r.stats, u)[: cfg.ablation_examples]]
               for u in r.pages}
        for kind, r in results.items()
    }
    return shown, ablated


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
