"""Feature splitting: planted splits are recovered, and the stage draws a split tree as HTML and PNG."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_analysis import HOOK, TinySetup, build_tiny_setup

from framework.analysis.analyze import analyze
from framework.analysis.collect import hook_rows
from framework.analysis.corpus import analysis_corpus
from framework.analysis.dashboard import chip
from framework.analysis.splitting import (
    Level,
    build_tree,
    decoder_candidates,
    level_record,
    report_text,
    stream_split_stats,
)
from framework.config import SAEConfig
from framework.lm import load_lm
from framework.sae import SAE, build_sae
from framework.sae.init import initialize_from_data
from framework.saved import TrainedSAE

COPIES = 3  # each feature reappears in the next dictionary: itself and two perturbed copies


def data_sae(sample: torch.Tensor, n_features: int) -> SAE:
    """Features that are activation samples, each firing on ~3% of tokens."""
    sae = build_sae(sample.shape[1], SAEConfig(n_features=n_features, init="data", init_target_l0=0.03 * n_features))
    initialize_from_data(sae, sample)
    return sae.eval()


@torch.no_grad()
def split_planted(small: SAE, n_silent: int, seed: int, noise: float = 0.3) -> tuple[SAE, dict[int, set[int]]]:
    """A larger SAE holding each small feature three times (exact, then two copies perturbed by
    `noise` in norm), plus features that never fire, in shuffled order; returns it and small
    feature -> its copies."""
    g = torch.Generator().manual_seed(seed)
    n, d = small.n_features, small.d_in
    noise = torch.randn(n, COPIES, d, generator=g) * (noise / d**0.5)
    noise[:, 0] = 0.0
    W_dec = torch.nn.functional.normalize(small.W_dec[:, None, :] + noise, dim=-1).reshape(n * COPIES, d)
    W_enc = (small.W_enc.T[:, None, :] + noise).reshape(n * COPIES, d)
    b_enc = small.b_enc.repeat_interleave(COPIES)
    W_dec = torch.cat([W_dec, torch.nn.functional.normalize(torch.randn(n_silent, d, generator=g), dim=1)])
    W_enc = torch.cat([W_enc, torch.randn(n_silent, d, generator=g)])
    b_enc = torch.cat([b_enc, torch.full((n_silent,), -1e4)])
    order = torch.randperm(len(W_dec), generator=g)
    large = build_sae(d, SAEConfig(n_features=len(W_dec)))
    large.W_dec.copy_(W_dec[order])
    large.W_enc.copy_(W_enc[order].T)
    large.b_enc.copy_(b_enc[order])
    large.b_dec.copy_(small.b_dec)
    position = torch.argsort(order)  # where row r of the unshuffled matrix went
    planted = {i: set(position[i * COPIES : (i + 1) * COPIES].tolist()) for i in range(n)}
    return large.eval(), planted


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinySetup:
    return build_tiny_setup(tmp_path_factory.mktemp("tiny_splitting"))


def test_planted_splits_are_recovered_as_a_tree_across_three_sizes(tiny: TinySetup):
    ids, tokens = next(tiny.corpus.batches(24))
    sample, _ = hook_rows(tiny.model, HOOK, tiny.corpus, ids, tokens)
    small = data_sae(sample, 12)
    medium, planted_medium = split_planted(small, n_silent=10, seed=1)
    # Copies in the largest dictionary stay closer to their parent than siblings are to each other.
    large, planted_large = split_planted(medium, n_silent=20, seed=2, noise=0.05)
    saes = [TrainedSAE(name, sae, HOOK, 1.0) for name, sae in (("s", small), ("m", medium), ("l", large))]
    candidates = [decoder_candidates(a.sae.W_dec, b.sae.W_dec, k=5) for a, b in zip(saes, saes[1:])]
    trackers, tops = stream_split_stats(tiny.model, saes, [c for c, _ in candidates], tiny.corpus, batch_size=8)
    levels = [Level(c, cos, t.correlation(), 0.5) for (c, cos), t in zip(candidates, trackers)]
    children = [level.children() for level in levels]
    for planted, found, tracker in ((planted_medium, children[0], trackers[0]), (planted_large, children[1], trackers[1])):
        fired = (tracker.a.density > 0).nonzero().flatten().tolist()
        assert len(fired) >= len(planted) // 2
        for feature in fired:
            assert {j for j, _, _ in found[feature]} == planted[feature], feature
    root = next(f for f in range(12) if trackers[0].a.density[f] > 0)
    tree = build_tree(root, 0, children, lambda depth, f: {"depth": depth, "feature": f})
    assert {c["feature"] for c in tree["children"]} == planted_medium[root]
    assert all({g["feature"] for g in c["children"]} == planted_large[c["feature"]] for c in tree["children"])
    assert tops[2].values.shape == (large.n_features, 10)


def test_a_feature_whose_candidates_never_correlate_does_not_count_as_its_nearest_being_best():
    # Feature 0's candidates never fired with it (correlations all 0), feature 1's best is its
    # second nearest, feature 2's its nearest, feature 3 never fired.
    level = Level(candidates=torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 3, 6]]),
                  cosine=torch.tensor([[0.9, 0.8, 0.7]] * 4),
                  correlation=torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.8, 0.1], [0.9, 0.3, -0.1], [0.0, 0.0, 0.0]]),
                  min_correlation=0.3)
    record = level_record("s", "l", level, level.children(), density=torch.tensor([0.1, 0.2, 0.3, 0.0]))
    summary = record["summary"]
    assert summary["small_features_fired"] == 3
    assert summary["nearest_is_best_correlated"] == 0.5  # feature 2 of features 1 and 2
    assert summary["without_correlated_candidate"] == 1
    table = report_text({"saes": ["s", "l"], "n_features": [4, 9], "n_tokens": 10, "split": "heldout", "root": 0,
                         "levels": [record]})
    assert "| `s` → `l` | 3 | 0.800 | 0.900 | 0.500 | 1 |" in table


def planted_bank(pretrained_recipe, tmp_path):
    """A splitting recipe over a saved bank of two sizes whose larger SAE splits each feature of
    the smaller in three; returns it and small feature -> its copies."""
    from framework.training.train import save_sae

    model = load_lm(pretrained_recipe)
    recipe = copy.deepcopy(pretrained_recipe)
    recipe.train.output_dir = str(tmp_path / "sae")
    recipe.train.bank = [{"name": "small", "n_features": 16}, {"name": "large", "n_features": 56}]
    recipe.analyze.output_dir = str(tmp_path / "analysis")
    recipe.analyze.mode, recipe.analyze.n_tokens = "splitting", 2000
    corpus = analysis_corpus(recipe.text, model.tokenizer, 4000, recipe.harvest.skip_first_tokens)
    ids, tokens = next(corpus.batches(64))
    sample, _ = hook_rows(model, HOOK, corpus, ids, tokens)
    small = data_sae(sample, 16)
    large, planted = split_planted(small, n_silent=8, seed=3)
    for name, sae in (("small", small), ("large", large)):
        save_sae(sae, name, HOOK, 1.0, recipe, tmp_path / "sae" / name)
    return recipe, planted


def test_splitting_mode_draws_the_tree_as_escaped_html_and_png(pretrained_recipe, tmp_path):
    recipe, planted = planted_bank(pretrained_recipe, tmp_path)
    out = analyze(recipe)
    data = json.loads((out / "splitting.json").read_text())
    root = data["root"]
    assert {c["feature"] for c in data["tree"]["children"]} == planted[root]
    page = (out / f"tree_{root}.html").read_text()
    assert page.count('class="node"') == 1 + len(planted[root])
    assert "<script" not in page and "http" not in page  # static, self-contained
    for node in [data["tree"], *data["tree"]["children"]]:
        assert node["top_tokens"]
        for token, _ in node["top_tokens"]:
            assert chip(token) in page  # escaped, whitespace drawn
    assert (out / f"tree_{root}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"tree_{root}.png" in (out / "report.md").read_text()


def test_a_run_with_another_split_feature_leaves_only_its_own_tree(pretrained_recipe, tmp_path):
    recipe, _ = planted_bank(pretrained_recipe, tmp_path)
    out = analyze(recipe)
    first = json.loads((out / "splitting.json").read_text())["root"]
    foreign = {"tree_notes.html": "mine", "notes.md": "mine", "tree_7.txt": "mine"}  # not the stage's names
    for name, text in foreign.items():
        (out / name).write_text(text)
    recipe.analyze.split_feature = (first + 1) % 16
    assert analyze(recipe) == out
    second = json.loads((out / "splitting.json").read_text())["root"]
    assert second == recipe.analyze.split_feature != first
    trees = sorted(p.name for p in out.glob("tree_*") if p.name not in foreign)
    assert trees == [f"tree_{second}.html", f"tree_{second}.png"]
    assert all((out / name).read_text() == text for name, text in foreign.items())
    assert f"tree_{second}.html" in (out / "report.md").read_text()


def test_an_out_of_range_split_feature_is_refused_before_any_work_and_keeps_the_last_output(
        pretrained_recipe, tmp_path, monkeypatch):
    from framework.analysis import splitting
    from framework.artifacts import MARKER
    from framework.config import RecipeError
    from framework.training.train import save_sae

    width = load_lm(pretrained_recipe).hook_points()[HOOK]
    recipe = copy.deepcopy(pretrained_recipe)
    recipe.train.output_dir = str(tmp_path / "sae")
    recipe.train.bank = [{"name": "small", "n_features": 16}, {"name": "large", "n_features": 32}]
    recipe.analyze.output_dir = str(tmp_path / "analysis")
    recipe.analyze.mode, recipe.analyze.split_feature = "splitting", 9999
    for name, n in (("small", 16), ("large", 32)):
        save_sae(build_sae(width, SAEConfig(n_features=n)).eval(), name, HOOK, 1.0, recipe, tmp_path / "sae" / name)
    previous = tmp_path / "analysis" / "splitting"
    previous.mkdir(parents=True)
    for name in (MARKER, "splitting.json", "tree_3.html"):
        (previous / name).write_text("{}")  # the last run's output, made with other settings

    def no_corpus(*args, **kwargs):
        raise AssertionError("the corpus was read before split_feature was checked")

    monkeypatch.setattr(splitting, "analysis_corpus", no_corpus)
    with pytest.raises(RecipeError, match=r"analyze.split_feature=9999 .*smallest dictionary \(16 features\).* 0 to 15"):
        analyze(recipe)
    assert sorted(p.name for p in previous.iterdir()) == sorted([MARKER, "splitting.json", "tree_3.html"])


def test_splitting_without_trained_saes_leaves_no_output_directory(pretrained_recipe, tmp_path):
    from framework.errors import CheckpointError

    recipe = copy.deepcopy(pretrained_recipe)
    recipe.train.output_dir = str(tmp_path / "sae")
    recipe.train.bank = [{"name": "small", "n_features": 16}, {"name": "large", "n_features": 32}]
    recipe.analyze.output_dir = str(tmp_path / "analysis")
    recipe.analyze.mode = "splitting"
    with pytest.raises(CheckpointError, match="no trained SAE"):
        analyze(recipe)
    assert not (tmp_path / "analysis").exists()
