"""Feature splitting: how a feature of a small dictionary divides among the features of larger ones.

The paper trains dictionaries of 512 to 131,072 features on the same activations and finds
that a feature of a small run "splits" into several, more specific features in a larger one
(its "base64" feature becomes three). Here a bank of SAEs of different sizes (recipes with
`train.bank`, e.g. recipes/paper/bank.yaml) is matched size to size, each dictionary against
the next larger one:

1. Candidates by decoder cosine. For each feature of the smaller dictionary, the
   `analyze.split_candidates` features of the larger one whose decoder directions are
   nearest. Computed in row chunks, so the full n_small x n_large matrix never exists.
2. Activation correlation on the same tokens, for those pairs only. Held-out tokens stream
   through the LM once; every SAE of the bank encodes them; `CandidateCorrelation` keeps
   per-pair sums, O(n_small x candidates) memory, not O(n_small x n_large).
3. Edges. A larger feature is a child of the smaller feature it correlates with best (among
   the pairs measured), if that correlation reaches `analyze.split_min_correlation`. Each
   feature has at most one parent, so the matches form trees: a feature of the smallest
   dictionary, its children in the next, theirs in the next.

The tree of `analyze.split_feature` (or, at -1, of the smallest dictionary's most-split
feature) is drawn as static HTML and as a PNG (split_render.py), each node with its density
and the tokens it fires on most; splitting.json holds every level's matches.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from framework.analysis import markers
from framework.analysis.collect import hook_rows
from framework.analysis.corpus import Corpus, analysis_corpus
from framework.analysis.correlation import MAX_PAIRS, CandidateCorrelation
from framework.analysis.examples import TopExamples
from framework.analysis.records import TokenNames
from framework.analysis.split_render import write_tree_html, write_tree_png
from framework.artifacts import atomic_write_text, trained_weights_digest
from framework.config import Recipe, RecipeError, save_recipe
from framework.lm import load_lm
from framework.lm.base import BaseLM
from framework.progress import Progress
from framework.saved import TrainedSAE, load_saes_for_lm

log = logging.getLogger(__name__)
TOP_EXAMPLES = 10  # top activations kept per feature, for each node's top tokens
TOP_TOKENS = 3  # tokens shown per node
MAX_CHILDREN = 8  # children drawn per node (all are in splitting.json)


@dataclass
class Level:
    """Matches from one dictionary (small) to the next larger one (large)."""

    candidates: torch.Tensor  # (n_small, k) nearest large features by decoder cosine
    cosine: torch.Tensor  # (n_small, k)
    correlation: torch.Tensor  # (n_small, k) activation correlation of each candidate pair
    min_correlation: float

    def parents(self) -> torch.Tensor:
        """(n_large,) the small feature each large one correlates with best among measured pairs; -1: none."""
        n_large = int(self.candidates.max()) + 1 if self.candidates.numel() else 0
        flat_large, flat_corr = self.candidates.flatten(), self.correlation.flatten().float()
        best = torch.full((n_large,), -float("inf")).scatter_reduce(0, flat_large, flat_corr, "amax")
        is_best = (flat_corr == best[flat_large]) & (flat_corr >= self.min_correlation)
        parent = torch.full((n_large,), -1, dtype=torch.long)
        small = torch.arange(self.candidates.shape[0]).repeat_interleave(self.candidates.shape[1])
        parent[flat_large[is_best]] = small[is_best]
        return parent

    def children(self) -> dict[int, list[tuple[int, float, float]]]:
        """small feature -> [(large feature, cosine, correlation)], best correlated first."""
        parent = self.parents()
        out: dict[int, list[tuple[int, float, float]]] = {}
        for i, row in enumerate(self.candidates.tolist()):
            kids = [(j, float(self.cosine[i, c]), float(self.correlation[i, c]))
                    for c, j in enumerate(row) if parent[j] == i]
            if kids:
                out[i] = sorted(kids, key=lambda kid: -kid[2])
        return out


def decoder_candidates(small: torch.Tensor, large: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_small, k) indices and cosines of each small direction's k nearest large directions."""
    small = torch.nn.functional.normalize(small.float(), dim=1)
    large = torch.nn.functional.normalize(large.float(), dim=1)
    k = min(k, large.shape[0])
    indices, values = [], []
    rows = max(1, MAX_PAIRS // large.shape[0])
    for start in range(0, small.shape[0], rows):
        top = torch.topk(small[start : start + rows] @ large.T, k, dim=1)  # (rows, k) of (rows, n_large)
        indices.append(top.indices)
        values.append(top.values)
    return torch.cat(indices), torch.cat(values)


@torch.no_grad()
def stream_split_stats(
    model: BaseLM, saes: list[TrainedSAE], candidates: list[torch.Tensor], corpus: Corpus, batch_size: int
) -> tuple[list[CandidateCorrelation], list[TopExamples]]:
    """One pass over the corpus: each level's candidate correlations and each SAE's top examples."""
    device = model.device
    hook = saes[0].hook_point
    trackers = [CandidateCorrelation(c.to(device), large.sae.W_dec.shape[0]) for c, large in zip(candidates, saes[1:])]
    tops = [TopExamples(s.sae.W_dec.shape[0], TOP_EXAMPLES, device) for s in saes]
    progress = Progress("splitting", corpus.n_batches(batch_size), unit="batches")
    for ids, tokens in corpus.batches(batch_size):
        acts, index = hook_rows(model, hook, corpus, ids, tokens)
        features = [s.features(acts) for s in saes]  # each (rows, n_features)
        for top, f in zip(tops, features):
            top.update(f, index)
        for level, tracker in enumerate(trackers):
            tracker.update(features[level], features[level + 1])
        progress.update(1)
    return trackers, tops


def build_tree(feature: int, depth: int, levels: list[dict[int, list]], describe, cosine=None, correlation=None) -> dict:
    """The nested tree of `feature` of dictionary `depth`: node info plus its children, recursively."""
    kids = levels[depth].get(feature, []) if depth < len(levels) else []
    return {
        **describe(depth, feature), "cosine": cosine, "correlation": correlation, "n_children": len(kids),
        "children": [build_tree(j, depth + 1, levels, describe, cos, corr) for j, cos, corr in kids[:MAX_CHILDREN]],
    }


def tree_size(feature: int, depth: int, levels: list[dict[int, list]]) -> int:
    kids = levels[depth].get(feature, []) if depth < len(levels) else []
    return 1 + sum(tree_size(j, depth + 1, levels) for j, _, _ in kids)


def split(recipe: Recipe) -> Path:
    """`sae analyze RECIPE analyze.mode=splitting`: match the bank's dictionary sizes, draw one tree."""
    cfg = recipe.analyze
    out = recipe.path("analysis") / "splitting"
    settings = {"split_feature": cfg.split_feature, "split_candidates": cfg.split_candidates,
                "split_min_correlation": cfg.split_min_correlation}
    if markers.is_done(out, recipe, settings):
        log.info("splitting in %s is complete; nothing to do", out)
        return out
    model = load_lm(recipe)
    weights = trained_weights_digest(recipe, "analyze")  # of the files about to be read
    saes = dictionaries_by_size(load_saes_for_lm(recipe, model))
    n_smallest = saes[0].sae.W_dec.shape[0]
    if cfg.split_feature >= n_smallest:
        raise RecipeError(f"analyze.split_feature={cfg.split_feature} is not a feature of {saes[0].name}, the "
                          f"smallest dictionary ({n_smallest} features): give 0 to {n_smallest - 1}, or -1 for "
                          f"its most-split feature")
    markers.start(out)  # inputs loaded and checked: only now does the previous output stop counting
    candidates, cosines = zip(*(decoder_candidates(s.sae.W_dec.detach(), b.sae.W_dec.detach(), cfg.split_candidates)
                                for s, b in zip(saes, saes[1:])))
    corpus = analysis_corpus(recipe.text, model.tokenizer, cfg.n_tokens, recipe.harvest.skip_first_tokens)
    trackers, tops = stream_split_stats(model, saes, list(candidates), corpus, cfg.batch_size)
    levels = [Level(c.cpu(), cos.cpu(), t.correlation().cpu(), cfg.split_min_correlation)
              for c, cos, t in zip(candidates, cosines, trackers)]
    densities = [t.a.density.cpu() for t in trackers] + [trackers[-1].b.density.cpu()]
    children = [level.children() for level in levels]
    root = cfg.split_feature if cfg.split_feature >= 0 else most_split(children, densities[0])
    describe = NodeDescriber(saes, densities, tops, corpus, TokenNames(model.tokenizer))
    tree = build_tree(root, 0, children, describe)
    data = {"saes": [s.name for s in saes], "n_features": [s.sae.W_dec.shape[0] for s in saes],
            "n_tokens": trackers[0].a.n, "split": corpus.split, "root": root, "tree": tree,
            "levels": [level_record(saes[i].name, saes[i + 1].name, lv, children[i], densities[i])
                       for i, lv in enumerate(levels)]}
    atomic_write_text(out / "splitting.json", json.dumps(data))
    write_tree_html(out / f"tree_{root}.html", data)
    write_tree_png(out / f"tree_{root}.png", data)
    remove_other_trees(out, root)
    atomic_write_text(out / "report.md", report_text(data))
    save_recipe(recipe, out)
    markers.mark_done(out, recipe, settings, weights)
    return out


def remove_other_trees(out: Path, root: int) -> None:
    """Delete the trees an earlier run drew of another root (another analyze.split_feature):
    they would sit beside this run's as if current. Only names this stage writes are touched
    (`tree_<feature>.html` / `.png`); any other file in the directory is left alone."""
    for path in out.glob("tree_*"):
        if re.fullmatch(r"tree_\d+\.(html|png)", path.name) and path.name not in (f"tree_{root}.html", f"tree_{root}.png"):
            path.unlink()


def dictionaries_by_size(bank: list[TrainedSAE]) -> list[TrainedSAE]:
    """The bank's SAEs ordered by size, one per size (the first listed), all on one hook point."""
    by_size: dict[int, TrainedSAE] = {}
    for trained in bank:
        by_size.setdefault(trained.sae.W_dec.shape[0], trained)
    saes = [by_size[n] for n in sorted(by_size)]
    if len(saes) < 2:
        raise RecipeError("analyze.mode=splitting needs a bank of at least two dictionary sizes "
                          "(train.bank, e.g. recipes/paper/bank.yaml); this bank has "
                          + ", ".join(f"{s.name} ({s.sae.W_dec.shape[0]})" for s in bank))
    if len({s.hook_point for s in saes}) > 1:
        raise RecipeError(f"splitting compares SAEs on one hook point; the bank reads {sorted({s.hook_point for s in saes})}")
    return saes


def most_split(children: list[dict[int, list]], density: torch.Tensor) -> int:
    """The smallest dictionary's feature with the largest tree (ties: the denser)."""
    n = len(density)
    return max(range(n), key=lambda f: (tree_size(f, 0, children), float(density[f]), -f))


class NodeDescriber:
    """A node's SAE, size, density and most frequent top-activation tokens."""

    def __init__(self, saes, densities, tops, corpus: Corpus, names: TokenNames):
        self.saes, self.densities, self.tops, self.corpus, self.names = saes, densities, tops, corpus, names

    def __call__(self, depth: int, feature: int) -> dict:
        top = self.tops[depth]
        fired = top.values[feature] > 0
        ids = self.corpus.token_ids(top.tokens[feature][fired].cpu()).tolist() if fired.any() else []
        common = Counter(ids).most_common(TOP_TOKENS)
        return {
            "sae": self.saes[depth].name, "n_features": self.saes[depth].sae.W_dec.shape[0], "feature": feature,
            "density": float(f"{float(self.densities[depth][feature]):.4g}"),
            "top_tokens": [[s, c] for s, (_, c) in zip(self.names([t for t, _ in common]), common)],
        }


def level_record(small: str, large: str, level: Level, children: dict[int, list], density: torch.Tensor) -> dict:
    """One level of splitting.json: every small feature's candidates, and summary numbers."""
    fired = density > 0
    best_corr = level.correlation.max(dim=1)
    # A best correlation of 0 or less says nothing about which candidate is nearest in activity
    # (0 is also what a candidate that never fired gets), so only features with a positively
    # correlated candidate count, and the rest are counted apart.
    correlated = fired & (best_corr.values > 0)
    agree = best_corr.indices == 0  # candidates are in cosine order: is the best correlated also the nearest?
    counts = torch.tensor([len(children.get(i, [])) for i in range(len(density))])
    return {
        "small": small, "large": large,
        "summary": {
            "small_features_fired": int(fired.sum()),
            "median_best_correlation": float(best_corr.values[fired].median()) if fired.any() else None,
            "median_best_cosine": float(level.cosine[:, 0][fired].median()) if fired.any() else None,
            "nearest_is_best_correlated": float(agree[correlated].float().mean()) if correlated.any() else None,
            "without_correlated_candidate": int((fired & ~correlated).sum()),
            "with_children": int((counts[fired] > 0).sum()),
            "split_in_two_or_more": int((counts[fired] > 1).sum()),
        },
        "candidates": level.candidates.tolist(),
        "cosine": [[round(v, 4) for v in row] for row in level.cosine.tolist()],
        "correlation": [[round(v, 4) for v in row] for row in level.correlation.tolist()],
    }


def report_text(data: dict) -> str:
    lines = [
        "# Feature splitting", "",
        f"{' → '.join(f'`{s}` ({n:,})' for s, n in zip(data['saes'], data['n_features']))}, "
        f"{data['n_tokens']:,} tokens of {data['split']} text.", "",
        "| from → to | features fired | median best correlation | median best decoder cosine | nearest is best correlated "
        "| no correlated candidate | with children | split in ≥ 2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in data["levels"]:
        s = level["summary"]
        lines.append(
            f"| `{level['small']}` → `{level['large']}` | {s['small_features_fired']:,} | "
            f"{_fmt(s['median_best_correlation'])} | {_fmt(s['median_best_cosine'])} | "
            f"{_fmt(s['nearest_is_best_correlated'])} | {s.get('without_correlated_candidate', 'n/a')} | "
            f"{s['with_children']:,} | {s['split_in_two_or_more']:,} |"
        )
    root = data["root"]
    lines += ["", f"Split tree of feature {root} of `{data['saes'][0]}`: [HTML](tree_{root}.html)", "",
              f"![split tree](tree_{root}.png)"]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
