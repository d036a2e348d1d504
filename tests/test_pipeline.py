"""`sae run`: its summary and its report.md, with the stages themselves stubbed out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from framework import pipeline
from framework.artifacts import MARKER, fingerprint_digest, is_complete, mark_complete, stage_fingerprint
from framework.config import Recipe, RecipeError, load_recipe, with_overrides


@pytest.fixture
def stub_stages(monkeypatch):
    """Each stage writes only `{output}/report.md` with a heading naming it, then its COMPLETE
    marker, as the stages do."""
    directories = {"pretrain": "lm", "harvest": "activations", "train": "sae", "eval": "eval",
                   "analyze": "analysis", "export": "export"}

    def run_stage(stage: str, recipe: Recipe) -> Path:
        out = recipe.path(directories[stage])
        out.mkdir(parents=True, exist_ok=True)
        if stage in ("pretrain", "train", "eval", "analyze"):
            (out / "report.md").write_text(f"# {stage} report\n\nnumbers of {stage}\n")
        mark_complete(out, recipe, stage)
        return out

    monkeypatch.setattr(pipeline, "run_stage", run_stage)


def test_live_harvest_is_not_listed_as_a_directory(stub_stages, tmp_path, capsys):
    recipe = load_recipe(None, [f"workdir={tmp_path}", "harvest.mode=live", "run.stages=[harvest,train]"])
    pipeline.run(recipe)
    summary = capsys.readouterr().out
    assert "harvest   (live: generated while training)" in summary
    assert str(tmp_path / "activations") not in summary
    assert str(tmp_path / "activations") not in (tmp_path / "report.md").read_text()


def test_running_fewer_stages_keeps_the_earlier_stages_sections_of_report_md(stub_stages, tmp_path):
    pipeline.run(load_recipe(None, [f"workdir={tmp_path}"]))
    full = (tmp_path / "report.md").read_text()
    for stage in ("pretrain", "train", "eval", "analyze"):
        assert f"## {stage} report" in full
    pipeline.run(load_recipe(None, [f"workdir={tmp_path}", "run.stages=[eval]"]))
    report = (tmp_path / "report.md").read_text()
    for stage in ("pretrain", "train", "analyze"):
        assert f"## {stage} report\n\nnumbers of {stage}" in report
        assert f"| {stage} | `{tmp_path}/" in report
    assert report.count("| earlier run |") == 3
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections == ["## pretrain report", "## train report", "## eval report", "## analyze report"]


def test_report_md_leaves_out_an_earlier_stage_whose_output_is_not_complete_for_this_recipe(stub_stages, tmp_path):
    pipeline.run(load_recipe(None, [f"workdir={tmp_path}"]))
    (tmp_path / "sae" / MARKER).unlink()  # a re-train stopped after its report.md, before COMPLETE
    # eval and analyze ran with another eval / analyze setting: not this recipe's results
    pipeline.run(load_recipe(None, [f"workdir={tmp_path}", "eval.n_tokens=1000", "analyze.n_tokens=1000",
                                    "run.stages=[pretrain]"]))
    report = (tmp_path / "report.md").read_text()
    assert "## pretrain report" in report  # ran now
    for stage in ("train", "eval", "analyze"):
        assert f"## {stage} report" not in report and f"numbers of {stage}" not in report
    assert f"| train | `{tmp_path / 'sae'}` | incomplete (no COMPLETE marker): not reported |" in report
    assert f"| eval | `{tmp_path / 'eval'}` | made by a different recipe: not reported |" in report
    assert f"| analyze | `{tmp_path / 'analysis'}` | made by a different recipe: not reported |" in report
    assert "earlier run" not in report


def test_sae_run_names_its_report_once_and_only_on_the_first_rank(stub_stages, tmp_path, monkeypatch, capsys):
    from framework.cli import main

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"workdir: {tmp_path / 'run'}\n")
    assert main(["run", str(recipe_file)]) == 0
    report = tmp_path / "run" / "report.md"
    assert capsys.readouterr().out.count(str(report)) == 1
    report.unlink()
    monkeypatch.setenv("RANK", "1")  # another torchrun rank: it ran the stages, rank 0 reports
    assert main(["run", str(recipe_file)]) == 0
    assert str(report) not in capsys.readouterr().out and not report.exists()


def test_output_finished_before_a_key_became_volatile_is_still_this_recipes(tmp_path):
    """A COMPLETE marker written while analyze.autointerp was part of the analysis's fingerprint
    (as before it became volatile: autointerp adds to a finished analysis) still marks it
    complete for the recipe; a key that does change the output is still refused."""
    recipe = load_recipe(None, [f"workdir={tmp_path}"])
    out = tmp_path / "analysis"
    out.mkdir()
    marker = mark_complete(out, recipe, "analyze")
    saved = json.loads(marker.read_text())
    saved["fingerprint"]["analyze"].update(autointerp=False, autointerp_model="smollm2")
    saved["digest"] = fingerprint_digest(saved["fingerprint"])
    marker.write_text(json.dumps(saved))
    assert is_complete(out, load_recipe(None, [f"workdir={tmp_path}", "analyze.autointerp=true"]), "analyze")
    with pytest.raises(RecipeError, match=r"different recipe \(analyze.n_tokens: 200000 there, 1000 here\)"):
        is_complete(out, load_recipe(None, [f"workdir={tmp_path}", "analyze.n_tokens=1000"]), "analyze")

    # The same for the other analysis modes' markers (splitting, universality), which are redone
    # rather than refused when their recipe differs.
    from framework.analysis.markers import is_done, mark_done

    splitting = out / "splitting"
    splitting.mkdir()
    mark_done(splitting, recipe, {"feature": 3}, sae_weights=None)
    marker = splitting / MARKER
    saved = json.loads(marker.read_text())
    saved["fingerprint"]["analyze"].update(autointerp=False, autointerp_n_features=20)
    marker.write_text(json.dumps(saved))
    assert is_done(splitting, load_recipe(None, [f"workdir={tmp_path}", "analyze.autointerp=true"]), {"feature": 3})
    assert not is_done(splitting, load_recipe(None, [f"workdir={tmp_path}", "analyze.n_tokens=1000"]), {"feature": 3})


def test_keys_added_to_fingerprints_later_read_as_what_earlier_outputs_had(tmp_path):
    """The top-level seed picks the analysis's random examples (it was in no fingerprint: a run
    with another seed was skipped as complete); harvest.context_order is new. A marker written
    before either counts as seed 0 and source order, and anything else is refused naming them."""
    recipe = load_recipe(None, [f"workdir={tmp_path}", "harvest.context_order=source"])
    assert stage_fingerprint(recipe, "analyze") != stage_fingerprint(with_overrides(recipe, ["seed=1"]), "analyze")
    assert stage_fingerprint(recipe, "train") == stage_fingerprint(with_overrides(recipe, ["seed=1"]), "train")
    out = tmp_path / "analysis"
    out.mkdir()
    marker = mark_complete(out, recipe, "analyze")
    saved = json.loads(marker.read_text())
    del saved["fingerprint"]["seed"], saved["fingerprint"]["harvest"]["context_order"]
    saved["digest"] = fingerprint_digest(saved["fingerprint"])
    marker.write_text(json.dumps(saved))
    assert is_complete(out, recipe, "analyze")
    with pytest.raises(RecipeError, match=r"different recipe \(seed: 0 there, 1 here\)"):
        is_complete(out, with_overrides(recipe, ["seed=1"]), "analyze")
    with pytest.raises(RecipeError, match=r"harvest.context_order: 'source' there, 'shuffled' here"):
        is_complete(out, with_overrides(recipe, ["harvest.context_order=shuffled"]), "analyze")


def test_an_lm_pretrained_once_serves_recipes_of_any_lm_dtype(tmp_path):
    """Pretraining trains and saves in float32 whatever lm.dtype says; `sae run ... lm.dtype=bfloat16`
    after a float32 pretrain was refused as another recipe's (also by markers written before)."""
    recipe = load_recipe(None, [f"workdir={tmp_path}"])
    out = tmp_path / "lm"
    out.mkdir()
    marker = mark_complete(out, recipe, "pretrain")
    bf16 = with_overrides(recipe, ["lm.dtype=bfloat16"])
    assert is_complete(out, bf16, "pretrain")
    saved = json.loads(marker.read_text())
    saved["fingerprint"]["lm"]["dtype"] = "float32"  # as markers recorded it before
    saved["digest"] = fingerprint_digest(saved["fingerprint"])
    marker.write_text(json.dumps(saved))
    assert is_complete(out, bf16, "pretrain")
    assert stage_fingerprint(bf16, "harvest") != stage_fingerprint(recipe, "harvest")  # the harvest reads it


def test_the_workdirs_recipe_is_written_once_the_stages_are_done_not_by_a_refused_run(tmp_path):
    """`sae run` wrote {workdir}/recipe.yaml before any stage ran: a run that a stage then refused
    left its recipe there, and universality (analyze.other_workdir) read the wrong SAEs from it."""
    from framework.pipeline import run

    recipe = load_recipe(None, [f"workdir={tmp_path}", "run.stages=[train]"])
    (tmp_path / "sae").mkdir(parents=True)
    mark_complete(tmp_path / "sae", recipe, "train")
    run(recipe)
    assert load_recipe(tmp_path / "recipe.yaml").sae.n_features == recipe.sae.n_features
    with pytest.raises(RecipeError, match="different recipe"):
        run(with_overrides(recipe, ["sae.n_features=8192"]))
    assert load_recipe(tmp_path / "recipe.yaml").sae.n_features == recipe.sae.n_features


def test_a_recipe_saved_before_a_key_existed_loads_with_the_value_its_outputs_had(tmp_path):
    """A workdir's recipe.yaml from before harvest.context_order loaded with today's default
    (shuffled), and its own SAEs were then refused as another recipe's (universality's
    analyze.other_workdir, export's check of its own recipe.yaml)."""
    from framework.artifacts import load_saved_recipe
    from framework.config import recipe_to_yaml

    recipe = load_recipe(None, [f"workdir={tmp_path}", "harvest.context_order=source"])
    (tmp_path / "sae").mkdir()
    mark_complete(tmp_path / "sae", recipe, "train")
    old_yaml = recipe_to_yaml(recipe).replace("  context_order: source\n", "")
    assert "context_order" not in old_yaml
    (tmp_path / "recipe.yaml").write_text(old_yaml)
    saved = load_saved_recipe(tmp_path / "recipe.yaml")
    assert saved.harvest.context_order == "source" and is_complete(tmp_path / "sae", saved, "train")
    assert load_recipe(tmp_path / "recipe.yaml").harvest.context_order == "shuffled"  # what it was read as
