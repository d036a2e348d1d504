"""Universality: do two models trained from different seeds learn the same features?

The paper trains transformers A and B that differ only in their initialisation seed, an SAE on
each, and for every feature of A finds its highest activation correlation with any feature of
B on the same tokens: the median is 0.72, against much lower values for A's neurons matched
to B's neurons. Here, for the recipe's own run (A) and `analyze.other_workdir` (B):

    features  A's SAE features vs B's SAE features      the paper's statistic
    neurons   A's MLP neurons vs B's MLP neurons        the baseline (mlp.hook_post SAEs only)
    ceiling   A's SAE vs a second SAE on A's own activations from another seed
              (`analyze.ceiling_sae`): how universal features can look when the model is shared

Each comparison is reported for every unit that fired, and split by the unit's density on the
analysed tokens into the "high density cluster" and the "ultralow density cluster" (below
`analyze.ultralow_log10_density`): the paper's ultralow features are mostly artefacts and
should not be expected to match.

The tokens are held-out text, run through both LMs once per batch (early exit at the hook);
the correlations stream with bounded memory (correlation.py). "Same tokens" needs the same
tokenizer, which is checked: the built-in LMs train their BPE deterministically on the same
text, so runs that differ only in `lm.builtin.seed` share it.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from framework.analysis import markers
from framework.analysis.analyze import pick_sae
from framework.analysis.collect import hook_rows
from framework.analysis.corpus import Corpus, analysis_corpus
from framework.analysis.correlation import PairCorrelation
from framework.artifacts import (
    SAE_FILES,
    atomic_save_figure,
    atomic_write_text,
    files_digest,
    load_saved_recipe,
    trained_weights_digest,
)
from framework.config import Recipe, RecipeError, save_recipe
from framework.lm import load_lm
from framework.lm.base import BaseLM, parse_hook
from framework.progress import Progress
from framework.saved import TrainedSAE, load_framework_sae, load_saes_for_lm

log = logging.getLogger(__name__)
PAPER_MEDIAN = 0.72  # A/1 features vs B/1 features, "Towards Monosemanticity"
HISTOGRAM_BINS = 20  # of [0, 1]


@dataclass
class Comparison:
    """For each unit of A: its best correlation with a unit of the other set, which one, how dense."""

    best: torch.Tensor  # (n_a,)
    match: torch.Tensor  # (n_a,)
    density: torch.Tensor  # (n_a,) fraction of analysed tokens the unit of A fired on

    def summary(self, ultralow_log10_density: float) -> dict[str, dict]:
        fired = self.density > 0
        ultralow = fired & (self.density < 10**ultralow_log10_density)
        groups = {"all": fired, "high_density": fired & ~ultralow, "ultralow_density": ultralow}
        return {name: _describe(self.best[mask].tolist()) for name, mask in groups.items()}


@torch.no_grad()
def universality(
    a: tuple[BaseLM, TrainedSAE],
    b: tuple[BaseLM, TrainedSAE],
    corpus: Corpus,
    batch_size: int,
    ceiling: TrainedSAE | None = None,
) -> dict[str, Comparison]:
    """Best-match correlations of A's features with B's (and neurons, and the ceiling)."""
    (model_a, sae_a), (model_b, sae_b) = a, b
    hook = sae_a.hook_point
    if sae_b.hook_point != hook or (ceiling is not None and ceiling.hook_point != hook):
        raise RecipeError(f"universality compares SAEs on one hook point; got {sae_a.hook_point}, "
                          f"{sae_b.hook_point}" + (f", {ceiling.hook_point}" if ceiling else ""))
    device = model_a.device
    trackers = {"features": PairCorrelation(sae_a.sae.W_dec.shape[0], sae_b.sae.W_dec.shape[0], device)}
    if parse_hook(hook)[1] == "mlp.hook_post":
        trackers["neurons"] = PairCorrelation(sae_a.sae.d_in, sae_b.sae.d_in, device)
    if ceiling is not None:
        trackers["ceiling"] = PairCorrelation(sae_a.sae.W_dec.shape[0], ceiling.sae.W_dec.shape[0], device)
    progress = Progress("universality", corpus.n_batches(batch_size), unit="batches")
    for ids, tokens in corpus.batches(batch_size):
        acts_a, _ = hook_rows(model_a, hook, corpus, ids, tokens)  # (rows, d_in)
        acts_b, _ = hook_rows(model_b, hook, corpus, ids, tokens.to(model_b.device))
        features_a = sae_a.features(acts_a)  # (rows, n_a)
        trackers["features"].update(features_a, sae_b.features(acts_b.to(device)))
        if "neurons" in trackers:
            trackers["neurons"].update(acts_a.float(), acts_b.to(device).float())
        if ceiling is not None:
            trackers["ceiling"].update(features_a, ceiling.features(acts_a))
        progress.update(1)
    results = {}
    for name, tracker in trackers.items():
        best, match = tracker.best_match()
        results[name] = Comparison(best.cpu(), match.cpu(), tracker.a.density.cpu())
    return results


def compare_universality(recipe: Recipe) -> Path:
    """`sae analyze RECIPE analyze.mode=universality analyze.other_workdir=RUN_B`."""
    cfg = recipe.analyze
    if not cfg.other_workdir:
        raise RecipeError("analyze.mode=universality needs analyze.other_workdir: the workdir of the run to "
                          "compare with (model B), e.g. analyze.other_workdir=runs/quickstart-B")
    other = _other_recipe(cfg.other_workdir)
    out = recipe.path("analysis") / "universality"
    settings = _settings(recipe, other)
    if markers.is_done(out, recipe, settings):
        log.info("universality in %s is complete; nothing to do", out)
        return out
    model_a = load_lm(recipe)
    weights = trained_weights_digest(recipe, "analyze")  # of the files about to be read
    bank = load_saes_for_lm(recipe, model_a)
    sae_a = pick_sae(bank, cfg.sae_name)
    model_b = load_lm(other)
    sae_b = pick_sae(load_saes_for_lm(other, model_b, device=model_a.device), cfg.other_sae_name,
                     "analyze.other_sae_name")
    if model_a.tokenizer.fingerprint != model_b.tokenizer.fingerprint:
        raise RecipeError(f"{cfg.other_workdir}'s LM tokenizes differently from this recipe's, so the two "
                          f"cannot be compared on the same tokens; compare runs with the same text and vocabulary")
    ceiling = _ceiling_sae(cfg.ceiling_sae, bank, model_a.device)
    markers.start(out)  # inputs loaded and checked: only now does the previous output stop counting
    corpus = analysis_corpus(recipe.text, model_a.tokenizer, cfg.n_tokens, recipe.harvest.skip_first_tokens)
    results = universality((model_a, sae_a), (model_b, sae_b), corpus, cfg.batch_size, ceiling)
    data = {
        "paper_median": PAPER_MEDIAN, "n_tokens": corpus.n_contexts * (corpus.context_length - corpus.skip_first_tokens),
        "split": corpus.split, "hook_point": sae_a.hook_point,
        "a": {"workdir": recipe.workdir, "sae": sae_a.name, "lm_seed": recipe.lm.builtin.seed},
        "b": {"workdir": cfg.other_workdir, "sae": sae_b.name, "lm_seed": other.lm.builtin.seed},
        "ceiling": cfg.ceiling_sae or None,  # as given: a bank name or a directory
        "ultralow_log10_density": cfg.ultralow_log10_density,
        "comparisons": {name: _comparison_record(c, cfg.ultralow_log10_density) for name, c in results.items()},
    }
    atomic_write_text(out / "universality.json", json.dumps(data))
    write_plot(out / "universality.png", results)
    atomic_write_text(out / "report.md", report_text(data))
    save_recipe(recipe, out)
    markers.mark_done(out, recipe, settings, weights)
    return out


def _other_recipe(workdir: str) -> Recipe:
    path = Path(workdir) / "recipe.yaml"
    if not path.is_file():
        raise RecipeError(f"analyze.other_workdir={workdir!r} holds no recipe.yaml; point it at a run's workdir "
                          f"(`sae run` writes one there)")
    return load_saved_recipe(path)


def _settings(recipe: Recipe, other: Recipe) -> dict:
    """What the output depends on beyond the analyze fingerprint: the other run's trained SAEs,
    and a ceiling SAE given as a directory (this run's bank is in the marker's weights digest)."""
    cfg = recipe.analyze
    return {
        "other_workdir": cfg.other_workdir, "other_sae_name": cfg.other_sae_name, "ceiling_sae": cfg.ceiling_sae,
        "ultralow_log10_density": cfg.ultralow_log10_density,
        "other_sae": trained_weights_digest(other, "analyze"),
        "ceiling_weights": files_digest([Path(cfg.ceiling_sae) / name for name in SAE_FILES]) if cfg.ceiling_sae else None,
    }


def _ceiling_sae(spec: str, bank: list[TrainedSAE], device: torch.device) -> TrainedSAE | None:
    """`analyze.ceiling_sae`: empty (no ceiling), the name of an SAE of this bank, or a directory."""
    if not spec:
        return None
    for trained in bank:
        if trained.name == spec:
            return trained
    if Path(spec).is_dir():
        return load_framework_sae(spec, device)
    raise RecipeError(f"analyze.ceiling_sae={spec!r} is neither an SAE of this bank "
                      f"({', '.join(s.name for s in bank)}) nor a trained SAE directory")


def _describe(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "median": None, "mean": None, "q25": None, "q75": None, "histogram": [0] * HISTOGRAM_BINS}
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    counts = torch.histc(torch.tensor(values).clamp(0, 1), bins=HISTOGRAM_BINS, min=0, max=1)
    return {"n": len(values), "median": statistics.median(values), "mean": statistics.fmean(values),
            "q25": quartiles[0], "q75": quartiles[2], "histogram": [int(c) for c in counts]}


def _comparison_record(c: Comparison, ultralow_log10_density: float) -> dict:
    return {
        "summary": c.summary(ultralow_log10_density),
        "best": [round(v, 4) for v in c.best.tolist()],
        "match": c.match.tolist(),
        "density": [float(f"{d:.4g}") for d in c.density.tolist()],
    }


LABELS = {
    "features": "features: A's SAE vs B's SAE",
    "neurons": "neurons: A's MLP vs B's MLP (baseline)",
    "ceiling": "ceiling: A's SAE vs a second SAE on A (another seed)",
}


def report_text(data: dict) -> str:
    a, b = data["a"], data["b"]
    lines = [
        "# Universality", "",
        f"`{data['hook_point']}`, {data['n_tokens']:,} tokens of {data['split']} text. A: `{a['workdir']}` "
        f"(SAE `{a['sae']}`, LM seed {a['lm_seed']}); B: `{b['workdir']}` (SAE `{b['sae']}`, LM seed {b['lm_seed']})"
        + (f"; ceiling: `{data['ceiling']}`." if data["ceiling"] else "."), "",
        "For each unit of A that fired, its highest activation correlation (Pearson, over tokens) with any unit "
        f"of the other set. The paper's median for features: **{data['paper_median']}**. Ultralow density: "
        f"log10 density < {data['ultralow_log10_density']}.", "",
        "| comparison | units | median | mean | IQR | high-density median (units) | ultralow median (units) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, record in data["comparisons"].items():
        s = record["summary"]
        everything, high, low = s["all"], s["high_density"], s["ultralow_density"]
        lines.append(
            f"| {LABELS[name]} | {everything['n']:,} | {_fmt(everything['median'])} | {_fmt(everything['mean'])} | "
            f"{_fmt(everything['q25'])}–{_fmt(everything['q75'])} | {_fmt(high['median'])} ({high['n']:,}) | "
            f"{_fmt(low['median'])} ({low['n']:,}) |"
        )
    lines += ["", "![best-match correlations](universality.png)"]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def write_plot(path: Path, results: dict[str, Comparison]) -> Path:
    """Histograms of the best-match correlation per comparison, the paper's median marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = torch.linspace(0, 1, HISTOGRAM_BINS + 1).tolist()
    for name, c in results.items():
        values = c.best[c.density > 0].clamp(0, 1).tolist()
        ax.hist(values, bins=bins, histtype="step", linewidth=1.8, density=True,
                label=f"{LABELS[name]} (median {statistics.median(values):.2f})" if values else LABELS[name])
    ax.axvline(PAPER_MEDIAN, color="k", linestyle="--", linewidth=1, label=f"paper's feature median {PAPER_MEDIAN}")
    ax.set_xlabel("best activation correlation with the other set")
    ax.set_ylabel("density of units")
    ax.set_title("Universality (units of A that fired)")
    ax.legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=120)
