"""Universality: streamed correlations are exact; an SAE matches itself perfectly and a random one poorly."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_analysis import HOOK, TinySetup, build_tiny_setup

from framework.analysis import correlation
from framework.analysis.analyze import analyze
from framework.analysis.collect import hook_rows
from framework.analysis.correlation import CandidateCorrelation, PairCorrelation
from framework.analysis.universality import universality
from framework.config import SAEConfig, save_recipe
from framework.export import export_sae
from framework.lm import load_lm
from framework.sae import build_sae
from framework.sae.init import initialize_from_data
from framework.saved import TrainedSAE


def sparse_pair(rows: int = 900, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sets of sparse non-negative units, the first 10 of b tracking the first 10 of a."""
    g = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn(rows, 40, generator=g) - 1.8)
    b = torch.relu(torch.randn(rows, 30, generator=g) - 1.8)
    b[:, :10] = 2 * a[:, :10] + 0.3 * torch.rand(rows, 10, generator=g) * (a[:, :10] > 0)
    b[:, -1] = 0.0  # a unit that never fires has correlation 0 with everything
    return a, b


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    corr = torch.corrcoef(torch.cat([a, b], dim=1).T.double())[: a.shape[1], a.shape[1]:]
    return torch.nan_to_num(corr, nan=0.0)


@pytest.mark.parametrize("path", ["cofiring", "dense"])
def test_streamed_pair_correlation_equals_corrcoef_over_all_tokens(path, monkeypatch):
    a, b = sparse_pair()
    monkeypatch.setattr(correlation, "SPARSE_BELOW", 1.0 if path == "cofiring" else 0.0)
    monkeypatch.setattr(correlation, "MAX_PAIRS", 97)  # many small chunks
    tracker = PairCorrelation(40, 30)
    for start in range(0, len(a), 128):
        tracker.update(a[start : start + 128], b[start : start + 128])
    best, match = tracker.best_match()
    expected = reference(a, b)
    assert torch.allclose(best, expected.max(dim=1).values, atol=1e-9)
    assert torch.equal(match[:10], torch.arange(10))


def test_candidate_correlation_equals_corrcoef_of_the_candidate_pairs(monkeypatch):
    a, b = sparse_pair(seed=1)
    monkeypatch.setattr(correlation, "MAX_PAIRS", 50)
    candidates = torch.randint(0, 30, (40, 3), generator=torch.Generator().manual_seed(2))
    tracker = CandidateCorrelation(candidates, 30)
    for start in range(0, len(a), 200):
        tracker.update(a[start : start + 200], b[start : start + 200])
    assert torch.allclose(tracker.correlation(), reference(a, b).gather(1, candidates), atol=1e-9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinySetup:
    return build_tiny_setup(tmp_path_factory.mktemp("tiny_universality"))


def data_sae(tiny: TinySetup, n_features: int, seed: int) -> TrainedSAE:
    """An SAE whose features are activation samples firing on ~2 tokens in 100: sparse and data-shaped."""
    ids, tokens = next(tiny.corpus.batches(24))
    sample, _ = hook_rows(tiny.model, HOOK, tiny.corpus, ids, tokens)
    sae = build_sae(sample.shape[1], SAEConfig(n_features=n_features, init="data", init_target_l0=0.02 * n_features,
                                               seed=seed))
    initialize_from_data(sae, sample)
    return TrainedSAE(f"data{seed}", sae.eval(), HOOK, 1.0)


def test_an_sae_compared_with_itself_is_perfectly_universal(tiny: TinySetup):
    sae = data_sae(tiny, 96, seed=0)
    results = universality((tiny.model, sae), (tiny.model, sae), tiny.corpus, batch_size=8)
    fired = results["features"].density > 0
    assert fired.sum() > 48
    assert torch.allclose(results["features"].best[fired], torch.ones(int(fired.sum()), dtype=torch.float64))
    assert results["features"].summary(-4.0)["all"]["median"] == pytest.approx(1.0)
    assert results["neurons"].summary(-4.0)["all"]["median"] == pytest.approx(1.0)  # the same model's neurons


def test_an_sae_compared_with_a_random_sae_is_not(tiny: TinySetup):
    sae = data_sae(tiny, 96, seed=0)
    random_sae = TrainedSAE("random", build_sae(sae.sae.d_in, SAEConfig(n_features=96, seed=7)).eval(), HOOK, 1.0)
    results = universality((tiny.model, sae), (tiny.model, random_sae), tiny.corpus, batch_size=8, ceiling=sae)
    assert results["features"].summary(-4.0)["all"]["median"] < 0.5
    assert results["ceiling"].summary(-4.0)["all"]["median"] == pytest.approx(1.0)


def test_universality_mode_compares_two_runs_and_writes_its_report(pretrained_recipe, tmp_path):
    model = load_lm(pretrained_recipe)
    width = model.hook_points()[HOOK]
    runs = {}
    for name, seed in (("a", 0), ("b", 1)):
        sae = build_sae(width, SAEConfig(n_features=64, init="transpose", seed=seed))
        export_sae(TrainedSAE(f"sae_{name}", sae.eval(), HOOK, 1.0), tmp_path / name / "export")
        recipe = copy.deepcopy(pretrained_recipe)
        recipe.workdir = str(tmp_path / name)
        recipe.lm.path = str(pretrained_recipe.path("lm"))
        recipe.eval.sae_path = str(tmp_path / name / "export")
        recipe.analyze.n_tokens = 1500
        save_recipe(recipe, tmp_path / name)
        runs[name] = recipe
    recipe = runs["a"]
    recipe.analyze.mode, recipe.analyze.other_workdir = "universality", str(tmp_path / "b")
    out = analyze(recipe)
    assert out == tmp_path / "a" / "analysis" / "universality"
    data = json.loads((out / "universality.json").read_text())
    assert data["b"]["sae"] == "sae_b" and data["paper_median"] == 0.72
    assert set(data["comparisons"]) == {"features", "neurons"}
    assert len(data["comparisons"]["features"]["best"]) == 64
    assert (out / "universality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0.72" in (out / "report.md").read_text()
    written = (out / "universality.json").stat().st_mtime_ns
    assert analyze(recipe) == out and (out / "universality.json").stat().st_mtime_ns == written
    assert Path(out / "COMPLETE").is_file()

    # Either run's SAE made again with other weights: the comparison is made again.
    for name, seed in (("b", 2), ("a", 3)):
        sae = build_sae(width, SAEConfig(n_features=64, init="transpose", seed=seed))
        shutil.rmtree(tmp_path / name / "export")
        export_sae(TrainedSAE(f"sae_{name}", sae.eval(), HOOK, 1.0), tmp_path / name / "export")
        assert analyze(recipe) == out and (out / "universality.json").stat().st_mtime_ns > written
        written = (out / "universality.json").stat().st_mtime_ns
        assert analyze(recipe) == out and (out / "universality.json").stat().st_mtime_ns == written


def test_universality_without_trained_saes_leaves_no_output_directory(pretrained_recipe, tmp_path):
    from framework.errors import CheckpointError

    recipe = copy.deepcopy(pretrained_recipe)
    recipe.workdir = str(tmp_path / "a")
    recipe.lm.path = str(pretrained_recipe.path("lm"))
    save_recipe(recipe, tmp_path / "b")
    recipe.analyze.mode, recipe.analyze.other_workdir = "universality", str(tmp_path / "b")
    with pytest.raises(CheckpointError, match="no trained SAE"):
        analyze(recipe)
    assert not (tmp_path / "a" / "analysis").exists()


def test_an_unknown_other_sae_name_is_reported_under_its_own_key(pretrained_recipe, tmp_path):
    from framework.config import RecipeError

    model = load_lm(pretrained_recipe)
    width = model.hook_points()[HOOK]
    runs = {}
    for name in ("a", "b"):
        sae = build_sae(width, SAEConfig(n_features=16, init="transpose"))
        export_sae(TrainedSAE(f"sae_{name}", sae.eval(), HOOK, 1.0), tmp_path / name / "export")
        recipe = copy.deepcopy(pretrained_recipe)
        recipe.workdir = str(tmp_path / name)
        recipe.lm.path = str(pretrained_recipe.path("lm"))
        recipe.eval.sae_path = str(tmp_path / name / "export")
        save_recipe(recipe, tmp_path / name)
        runs[name] = recipe
    recipe = runs["a"]
    recipe.analyze.mode, recipe.analyze.other_workdir = "universality", str(tmp_path / "b")
    recipe.analyze.other_sae_name = "nope"
    with pytest.raises(RecipeError, match=r"^analyze\.other_sae_name='nope' is not a trained SAE; the bank has sae_b"):
        analyze(recipe)
    assert not (tmp_path / "a" / "analysis").exists()


def test_a_ceiling_sae_given_as_a_directory_is_part_of_what_a_finished_comparison_was_made_from(tmp_path):
    """Trained again, it made no difference to the skip check: the comparison stayed as it was."""
    from framework.analysis.universality import _settings
    from framework.config import load_recipe

    ceiling = tmp_path / "ceiling"
    ceiling.mkdir()
    (ceiling / "config.json").write_text("{}")
    (ceiling / "sae.safetensors").write_bytes(b"weights")
    recipe = load_recipe(None, [f"workdir={tmp_path / 'a'}", f"analyze.ceiling_sae={ceiling}"])
    other = load_recipe(None, [f"workdir={tmp_path / 'b'}"])
    before = _settings(recipe, other)
    (ceiling / "sae.safetensors").write_bytes(b"other weights")
    after = _settings(recipe, other)
    assert before["ceiling_weights"] and after["ceiling_weights"] and before != after
    bank_name = load_recipe(None, [f"workdir={tmp_path / 'a'}", "analyze.ceiling_sae=A_512"])
    assert _settings(bank_name, other)["ceiling_weights"] is None  # a bank SAE: in the marker's own digest
