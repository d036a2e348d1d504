"""Export to SAELens's format and import from it: SAELens itself must compute what we compute."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from framework.artifacts import mark_complete
from framework.config import SAEConfig, load_recipe
from framework.errors import CheckpointError, RecipeError
from framework.export import ARCHITECTURE, export, export_sae, load_saelens_sae
from framework.sae import VARIANTS, build_sae
from framework.saved import TrainedSAE, load_framework_sae, load_trained_saes
from framework.training.train import save_sae

sae_lens = pytest.importorskip("sae_lens")

D_IN, N_FEATURES, K = 32, 64, 8
HOOK = "blocks.0.mlp.hook_post"
SCALE = 2.5  # not a power of two, so folding it really changes the weights' bits


def randomized(sae):
    """Random weights everywhere, nonzero biases, thresholds that some pre-activations pass."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if sae.variant == "jumprelu":
            sae.log_threshold.copy_(torch.randn(N_FEATURES, generator=g) * 0.5)  # θ around 1
        if sae.variant == "batchtopk":
            sae.threshold.fill_(1.5)
    return sae


def activations(rows: int = 16) -> torch.Tensor:
    return torch.randn(rows, D_IN, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def recipe(tmp_path):
    return load_recipe(None, [f"workdir={tmp_path}", "lm.name=builtin", "text.context_length=96"])


def trained(variant: str, recipe, directory: Path) -> TrainedSAE:
    """A random SAE of `variant` saved in the framework's format and loaded back, as `sae train`'s."""
    cfg = SAEConfig(variant=variant, name=f"{variant}_test", n_features=N_FEATURES, k=K, hook_point=HOOK)
    sae = randomized(build_sae(D_IN, cfg))
    return load_framework_sae(save_sae(sae, cfg.name, HOOK, SCALE, recipe, directory / cfg.name))


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saelens_computes_our_features_and_reconstruction_from_raw_activations(variant, recipe, tmp_path):
    ours = trained(variant, recipe, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(export_sae(ours, tmp_path / "export" / ours.name))
    x = activations()
    features = ours.features(x)
    assert 0 < (features > 0).sum() < features.numel()  # the test means something: some fire, some not
    with torch.no_grad():
        assert_same(theirs.encode(x), features)
        assert_same(theirs.decode(theirs.encode(x)), ours.reconstruct(x))
        assert_same(theirs(x), ours.reconstruct(x))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cfg_json_names_the_matching_architecture_hook_and_model(variant, recipe, tmp_path):
    ours = trained(variant, recipe, tmp_path / "sae")
    cfg = json.loads((export_sae(ours, tmp_path / "out", {"model_name": "builtin"}) / "cfg.json").read_text())
    assert cfg["architecture"] == ARCHITECTURE[variant]
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"]) == (D_IN, N_FEATURES, "none")
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "builtin"
    assert cfg.get("k", K) == K


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_through_saelens_format_keeps_variant_and_features(variant, recipe, tmp_path):
    ours = trained(variant, recipe, tmp_path / "sae")
    back = load_saelens_sae(export_sae(ours, tmp_path / "export" / ours.name))
    assert (back.name, back.sae.variant, back.hook_point, back.input_scale) == (ours.name, variant, HOOK, 1.0)
    x = activations()
    assert_same(back.features(x), ours.features(x))
    assert_same(back.reconstruct(x), ours.reconstruct(x))


def saelens_sae(architecture: str, **options):
    """An SAE built and saved by SAELens itself, with random weights."""
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = sae_lens.registry.get_sae_class(architecture)
    cfg = cfg_cls(d_in=D_IN, d_sae=N_FEATURES, metadata=SAEMetadata(hook_name=HOOK), **options)
    sae = cls(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.5 if name == "threshold" else 0))
    return sae


@pytest.mark.parametrize(
    "architecture, options, variant",
    [
        ("standard", {}, "april2024"),
        ("standard", {"apply_b_dec_to_input": False}, "april2024"),
        ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}, "topk"),
        ("jumprelu", {"apply_b_dec_to_input": False}, "jumprelu"),
        ("gated", {"apply_b_dec_to_input": False}, "gated"),
    ],
)
def test_sae_saved_by_saelens_imports_with_the_same_features(architecture, options, variant, tmp_path):
    theirs = saelens_sae(architecture, **options)
    theirs.save_model(tmp_path / "theirs")
    ours = load_saelens_sae(tmp_path / "theirs")
    assert (ours.sae.variant, ours.hook_point, ours.name) == (variant, HOOK, "theirs")
    x = activations()
    with torch.no_grad():
        assert_same(ours.features(x), theirs.encode(x))
        assert_same(ours.reconstruct(x), theirs(x))


def test_jumprelu_thresholds_at_or_below_zero_import_as_plain_relu(tmp_path):
    theirs = saelens_sae("jumprelu")
    with torch.no_grad():
        theirs.threshold[: N_FEATURES // 2] = -1.0
        theirs.threshold[N_FEATURES // 2 :] = 0.0
    theirs.save_model(tmp_path / "theirs")
    x = activations()
    with torch.no_grad():
        assert_same(load_saelens_sae(tmp_path / "theirs").features(x), theirs.encode(x))


@pytest.fixture
def exported(recipe, tmp_path) -> Path:
    return export_sae(trained("jumprelu", recipe, tmp_path / "sae"), tmp_path / "export" / "jumprelu_test")


def edit_cfg(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "cfg.json").read_text())
    (directory / "cfg.json").write_text(json.dumps(cfg | changes))


def test_an_imported_sae_trained_on_other_inputs_is_evaluated_with_a_warning_naming_them(exported, recipe, caplog):
    """Contexts here never start with BOS and have text.context_length tokens: an SAE whose
    cfg.json records other inputs is scored on inputs it never saw, and the log says which."""
    cfg = json.loads((exported / "cfg.json").read_text())
    here = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, sae_path=str(exported)))
    # The same inputs, or more than this recipe's (longer contexts, from position 0): no warning.
    for trained_on in ({"prepend_bos": False, "context_size": 96, "seqpos_slice": [1, None]},
                       {"prepend_bos": False, "context_size": 1024, "seqpos_slice": [0, None]}):
        edit_cfg(exported, metadata=cfg["metadata"] | trained_on)
        with caplog.at_level("WARNING", logger="framework.export"):
            load_trained_saes(here)
        assert "trained on other inputs" not in caplog.text
    edit_cfg(exported, metadata=cfg["metadata"] | {"prepend_bos": True, "context_size": 64, "seqpos_slice": [4, None]})
    with caplog.at_level("WARNING", logger="framework.export"):
        (imported,) = load_trained_saes(here)
    assert imported.name == "jumprelu_test"
    assert re.search(r"trained on other inputs than this recipe evaluates it on: prepend_bos True \(this recipe: "
                     r"False\); context_size 64 \(this recipe: text.context_length=96\); seqpos_slice from position "
                     r"4 \(this recipe: harvest.skip_first_tokens=1\)", caplog.text)


@pytest.mark.parametrize("missing", ["cfg.json", "sae_weights.safetensors"])
def test_import_names_the_missing_file(exported, missing):
    (exported / missing).unlink()
    with pytest.raises(CheckpointError, match=missing):
        load_saelens_sae(exported)


@pytest.mark.parametrize("broken", ["cfg.json", "sae_weights.safetensors"])
def test_import_names_the_unreadable_file(exported, broken):
    (exported / broken).write_bytes(b"{")
    with pytest.raises(CheckpointError, match=f"cannot (parse|read) .*{broken}"):
        load_saelens_sae(exported)


@pytest.mark.parametrize("text", [b"[1, 2]", b'{"metadata": 3}', b"\xff\xfe{}"])
def test_import_names_a_cfg_json_that_is_not_an_saelens_config(exported, text):
    (exported / "cfg.json").write_bytes(text)
    with pytest.raises(CheckpointError, match=r"cfg.json(: | is not an SAELens config)"):
        load_saelens_sae(exported)


def test_import_of_unknown_architecture_names_the_supported_ones(exported):
    edit_cfg(exported, architecture="matching_pursuit")
    with pytest.raises(CheckpointError, match="matching_pursuit.*standard, topk, jumprelu, gated"):
        load_saelens_sae(exported)


def test_import_refuses_weights_whose_shape_disagrees_with_cfg(exported):
    edit_cfg(exported, d_sae=N_FEATURES * 2)
    with pytest.raises(CheckpointError, match=r"W_enc has shape \(32, 64\).*needs \(32, 128\)"):
        load_saelens_sae(exported)


def test_import_refuses_weights_of_another_architecture(exported):
    weights = load_file(str(exported / "sae_weights.safetensors"))
    del weights["threshold"]
    save_file(weights, str(exported / "sae_weights.safetensors"))
    with pytest.raises(CheckpointError, match=r"not hold a jumprelu SAE: missing \['threshold'\]"):
        load_saelens_sae(exported)


@pytest.mark.parametrize("norm", ["expected_average_only_in", "layer_norm", "constant_norm_rescale"])
def test_import_refuses_activation_normalisation(exported, norm):
    edit_cfg(exported, normalize_activations=norm)
    with pytest.raises(CheckpointError, match=f"normalize_activations='{norm}' is not supported"):
        load_saelens_sae(exported)


def test_import_refuses_pre_6_config_without_architecture(exported):
    cfg = json.loads((exported / "cfg.json").read_text())
    del cfg["architecture"]
    (exported / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="SAELens < 6"):
        load_saelens_sae(exported)


@pytest.mark.parametrize("changes, why", [
    # SAELens 3-5 wrote `architecture` too: a TopK SAE as 'standard' with activation_fn_str 'topk',
    # which was imported as a ReLU SAE (its features all wrong)
    ({"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 8}},
     r"it sets activation_fn_str='topk'"),
    ({"sae_lens_training_version": "5.3.0"}, r"sae_lens_training_version 5.3.0"),
])
def test_import_refuses_a_config_of_saelens_before_6_that_names_an_architecture(exported, changes, why):
    edit_cfg(exported, **changes)
    with pytest.raises(CheckpointError, match=rf"written by SAELens < 6 \({why}\).*save_model"):
        load_saelens_sae(exported)


def test_import_refuses_a_topk_config_without_k(tmp_path):
    saelens_sae("topk", k=4).save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["k"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"a topk SAE without `k`"):
        load_saelens_sae(tmp_path)


BANK_RECIPE = f"""
sae: {{hook_point: {HOOK}, n_features: {N_FEATURES}, k: {K}}}
train:
  bank:
    - {{variant: topk, name: topk_small}}
    - {{variant: gated, name: gated_small}}
    - {{variant: batchtopk, name: batchtopk_small}}
"""


def test_export_stage_writes_every_sae_of_the_bank_once(tmp_path):
    (tmp_path / "recipe.yaml").write_text(BANK_RECIPE)
    recipe = load_recipe(tmp_path / "recipe.yaml", [f"workdir={tmp_path / 'run'}"])
    for cfg in recipe.sae_configs():  # stands in for `sae train`
        save_sae(
            randomized(build_sae(D_IN, cfg)), cfg.name, HOOK, SCALE, recipe, recipe.path("sae") / cfg.name
        )
    out = export(recipe)
    assert out == recipe.path("export") and (out / "COMPLETE").is_file()
    x = activations()
    for cfg in recipe.sae_configs():
        theirs = sae_lens.SAE.load_from_disk(out / cfg.name)
        with torch.no_grad():
            assert_same(theirs.encode(x), load_framework_sae(recipe.path("sae") / cfg.name).features(x))
    written = (out / "topk_small" / "sae_weights.safetensors").stat().st_mtime_ns
    assert export(recipe) == out
    assert (out / "topk_small" / "sae_weights.safetensors").stat().st_mtime_ns == written


def test_export_stage_without_trained_saes_says_to_train(recipe):
    with pytest.raises(CheckpointError, match="sae train") as caught:
        export(recipe)
    assert "eval.sae_path" not in str(caught.value)  # export ignores it


def bank_recipe(tmp_path: Path, *overrides: str):
    """The three-SAE bank recipe with its SAEs saved as `sae train` would."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "recipe.yaml").write_text(BANK_RECIPE)
    recipe = load_recipe(tmp_path / "recipe.yaml", [f"workdir={tmp_path / 'run'}", *overrides])
    for cfg in recipe.sae_configs():
        save_sae(randomized(build_sae(D_IN, cfg)), cfg.name, HOOK, SCALE, recipe, recipe.path("sae") / cfg.name)
    return recipe


def test_export_replaces_its_own_earlier_export_of_the_same_recipe(tmp_path):
    recipe = bank_recipe(tmp_path)
    out = export(recipe)
    (out / "COMPLETE").unlink()  # interrupted before the marker: the SAEs written are its own
    assert export(recipe) == out and (out / "COMPLETE").is_file()
    assert load_saelens_sae(out / "topk_small").sae.variant == "topk"


def test_an_export_that_saes_were_trained_again_during_is_made_again(tmp_path, monkeypatch):
    """The marker recorded the weights' digest when it was written: SAEs trained again while the
    export ran made a stale export count as made from the new weights."""
    import framework.export as export_module

    recipe = bank_recipe(tmp_path)
    read = export_module.load_trained_saes

    def retrained_after_the_read(*args, **kwargs):
        saes = read(*args, **kwargs)
        for cfg in recipe.sae_configs():  # `sae train` of the same recipe, in another process: other weights
            sae = randomized(build_sae(D_IN, cfg))
            with torch.no_grad():
                sae.W_enc.mul_(-1)
            save_sae(sae, cfg.name, HOOK, SCALE, recipe, recipe.path("sae") / cfg.name)
        return saes

    monkeypatch.setattr(export_module, "load_trained_saes", retrained_after_the_read)
    out = export(recipe)
    monkeypatch.setattr(export_module, "load_trained_saes", read)
    stale = (out / "topk_small" / "sae_weights.safetensors").read_bytes()
    assert export(recipe) == out  # made again, from the weights there now
    assert (out / "topk_small" / "sae_weights.safetensors").read_bytes() != stale
    x = activations()
    with torch.no_grad():
        assert_same(sae_lens.SAE.load_from_disk(out / "topk_small").encode(x),
                    load_framework_sae(recipe.path("sae") / "topk_small").features(x))


def test_sae_files_of_another_sae_under_a_recipes_name_are_refused(tmp_path):
    """Without a COMPLETE marker nothing tied the files to the recipe: a gated SAE of 128
    features saved as topk_small was exported as this recipe's topk_small."""
    recipe = bank_recipe(tmp_path)
    other = SAEConfig(variant="gated", n_features=2 * N_FEATURES, hook_point=HOOK)
    save_sae(randomized(build_sae(D_IN, other)), "topk_small", HOOK, SCALE, recipe, recipe.path("sae") / "topk_small")
    with pytest.raises(CheckpointError, match=r"topk_small holds another SAE than this recipe's 'topk_small' "
                                              r"\(variant 'gated' there, 'topk' here; n_features 128 there, 64 here"):
        export(recipe)
    assert not recipe.path("export").exists()


def test_a_stage_pointed_at_another_stages_output_says_so_and_never_to_delete_it(tmp_path):
    recipe = bank_recipe(tmp_path, f"export.output_dir={tmp_path / 'run' / 'sae'}")
    mark_complete(recipe.path("sae"), recipe, "train")
    with pytest.raises(RecipeError, match=r"holds the output of `train`, not of `export`: give `export` a "
                                          r"directory of its own") as refused:
        export(recipe)
    assert "delete" not in str(refused.value)


@pytest.mark.parametrize("contents", ["notes", "their_saelens_sae", "half_written_cfg", "other_recipe"])
def test_export_refuses_to_delete_a_directory_it_did_not_write(tmp_path, contents):
    recipe = bank_recipe(tmp_path)
    target = recipe.path("export") / "gated_small"
    target.mkdir(parents=True)
    if contents == "notes":
        (target / "notes.md").write_text("mine")
    elif contents == "their_saelens_sae":
        export_sae(trained("gated", recipe, tmp_path / "elsewhere"), target)  # named gated_test inside
    elif contents == "half_written_cfg":
        (target / "cfg.json").write_text("{")
    else:  # our export of this SAE, by a recipe with another sae.k
        other = bank_recipe(tmp_path / "other", f"sae.k={K + 1}")
        other_out = export(other)
        target.rmdir()
        (other_out / "gated_small").rename(target)
    before = sorted((p.name, p.read_bytes()) for p in target.iterdir())
    with pytest.raises(RecipeError, match=rf"{target}.*export.output_dir.*move"):
        export(recipe)
    assert sorted((p.name, p.read_bytes()) for p in target.iterdir()) == before


@pytest.mark.parametrize("contents", ["notes", "other_recipe", "broken_yaml"])
def test_export_refuses_to_overwrite_a_recipe_yaml_it_did_not_write(tmp_path, contents):
    from framework.config import recipe_to_yaml

    recipe = bank_recipe(tmp_path)
    out = recipe.path("export")
    out.mkdir(parents=True)
    other = bank_recipe(tmp_path / "other", f"sae.k={K + 1}")
    text = {"notes": "my notes: the 4k run\n", "broken_yaml": "train: [unclosed\n",
            "other_recipe": recipe_to_yaml(other)}[contents]  # (as an export saves it)
    (out / "recipe.yaml").write_text(text)
    with pytest.raises(RecipeError, match=rf"{out / 'recipe.yaml'} exists and was not written by an export of this "
                                          rf"recipe.*export.output_dir"):
        export(recipe)
    assert (out / "recipe.yaml").read_text() == text and sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]


def test_an_interrupted_export_with_its_recipe_written_is_finished(tmp_path):
    recipe = bank_recipe(tmp_path)
    out = export(recipe)
    (out / "COMPLETE").unlink()  # stopped between writing recipe.yaml and the marker
    assert export(recipe) == out and (out / "COMPLETE").is_file()


def test_export_names_an_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    recipe = bank_recipe(tmp_path, f"export.output_dir={tmp_path / 'afile'}")
    with pytest.raises(RecipeError, match=rf"{tmp_path / 'afile'} is a file"):
        export(recipe)
    assert (tmp_path / "afile").read_text() == "x"


def test_export_metadata_names_its_recipe_by_the_digest_of_the_complete_marker(tmp_path):
    from framework.artifacts import fingerprint_digest, stage_fingerprint

    recipe = bank_recipe(tmp_path)
    out = export(recipe)
    marker = json.loads((out / "COMPLETE").read_text())
    for cfg in recipe.sae_configs():
        metadata = json.loads((out / cfg.name / "cfg.json").read_text())["metadata"]
        assert metadata["framework_export"] == marker["digest"] == fingerprint_digest(stage_fingerprint(recipe, "export"))
    # The value earlier versions wrote: markers and exports already on disk keep matching.
    fingerprint = {"train": {"lr": 0.001, "bank": [{"name": "a"}]}, "lm": {"name": "builtin"}, "path": Path("/x")}
    assert fingerprint_digest(fingerprint) == "c9ba1996e0b4ab7e"


def test_an_sae_path_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'nope'} does not exist or is not a directory: "
                                              r"eval.sae_path names an SAELens SAE directory"):
        load_saelens_sae(tmp_path / "nope")
