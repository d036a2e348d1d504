"""`sae eval` on real components: a pretrained tiny LM, harvested shards, SAEs trained by `sae train`.

The spliced metrics are pinned by SAEs whose weights are set by hand so the answer is known:
the identity (two ReLU features per dimension, relu(x) - relu(-x) = x, exact in floats), the
zero map and the constant mean. The activation metrics are checked on hand-made rows. The stage
itself runs end to end on a trained SAE and on its SAELens export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRETRAIN
from safetensors.torch import load_file, save_file

from framework.activations.harvest import harvest
from framework.activations.reader import ActivationStore, ActivationStream, sub_store
from framework.analysis.analyze import analyze_features
from framework.artifacts import is_complete
from framework.cli import STAGES, main
from framework.config import SAEConfig, load_recipe, save_recipe
from framework.errors import CheckpointError, DataError, RecipeError
from framework.evaluation import evaluate as eval_stage
from framework.evaluation.metrics import DensityCounter, density_summary, evaluate_sae
from framework.evaluation.spliced import hook_mean, spliced_metrics
from framework.export import export, export_sae
from framework.lm import load_lm
from framework.sae import build_sae
from framework.saved import TrainedSAE, load_framework_sae, load_trained_saes
from framework.text import iter_context_batches
from framework.training.train import train

HOOK = "blocks.0.mlp.hook_post"  # the default hook point: the paper's MLP neurons
HELDOUT_ROWS = 2048
STORE = [
    "harvest.n_tokens=8192",
    "harvest.tokens_per_context=32",
    "harvest.shuffle_window=4096",
    "harvest.rows_per_shard=2048",
    "harvest.rows_per_sample=512",
    f"harvest.heldout_tokens={HELDOUT_ROWS}",
    "harvest.dtype=float32",
]
TRAIN = [
    "sae.n_features=256",
    "sae.init=data",
    "sae.init_target_l0=10",
    "sae.l1_coefficient=1e-3",
    "train.n_tokens=8192",
    "train.batch_size=512",
    "train.lr=3e-3",
    "train.log_every=4",
    "train.density_window=4",
    "train.resample_sample_size=2048",
    "train.eval_batches=1",
    # input_scale != 1, so the export's folding of the scale and eval's MSE units are exercised
    "train.normalize_activations=norm",
    "train.wandb.mode=disabled",
]
# eval.n_tokens stays at its default (65,536): more than the held-out store's 2,048 rows.
EVAL = ["eval.n_contexts=8", "eval.batch_size=4"]


def make_recipe(pretrained_recipe, workdir: Path, *extra: str):
    return load_recipe(None, [*TINY_PRETRAIN, f"workdir={workdir}", f"lm.path={pretrained_recipe.path('lm')}",
                              *STORE, *TRAIN, *EVAL, *extra])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_stage")


@pytest.fixture(scope="module")
def trained_recipe(pretrained_recipe, workdir):
    """A recipe whose store is harvested and whose SAE `sae train` has trained."""
    recipe = make_recipe(pretrained_recipe, workdir)
    harvest(recipe)
    train(recipe)
    return recipe


@pytest.fixture(scope="module")
def evaluated(trained_recipe) -> Path:
    return eval_stage.evaluate(trained_recipe)


@pytest.fixture(scope="module")
def model(pretrained_recipe):
    return load_lm(pretrained_recipe)


@pytest.fixture(scope="module")
def token_batches(pretrained_recipe, model) -> list[torch.Tensor]:
    """Held-out contexts of the tiny LM: 3 batches (4 + 4 + 2 contexts of 64 tokens)."""
    batches = [t for _, t in iter_context_batches(pretrained_recipe.text, model.tokenizer, "heldout", 4, 0, 10)]
    assert [len(b) for b in batches] == [4, 4, 2]
    return batches


def hand_set_sae(d: int, n: int, W_enc=None, b_enc=None, W_dec=None, b_dec=None, name: str = "hand"):
    """A real paper SAE with the given weights (zeros where none is given)."""
    sae = build_sae(d, SAEConfig(variant="paper", name=name, n_features=n, hook_point=HOOK))
    given = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    with torch.no_grad():
        for key, value in given.items():
            getattr(sae, key).copy_(torch.zeros_like(getattr(sae, key)) if value is None else value)
    return sae.eval()


def identity_sae(d: int):
    """relu(x) W + relu(-x) (-W): reconstructs x exactly, with one feature firing per nonzero x_i."""
    eye = torch.eye(d)
    return hand_set_sae(d, 2 * d, W_enc=torch.cat([eye, -eye], 1), W_dec=torch.cat([eye, -eye], 0), name="identity")


def width(model) -> int:
    return model.hook_points()[HOOK]


# --------------------------------------------------------------------------------------------
# Spliced metrics: loss explained, mean ablation and KL against SAEs with known answers


def test_perfect_reconstruction_explains_all_the_loss_and_zero_reconstruction_none(model, token_batches):
    d = width(model)
    perfect = spliced_metrics(model, TrainedSAE("identity", identity_sae(d), HOOK, 1.0), token_batches)
    zero = spliced_metrics(model, TrainedSAE("zero", hand_set_sae(d, 8), HOOK, 1.0), token_batches)

    # the clean loss is the LM's own next-token cross-entropy over every predicted token
    n_tokens = sum(t.shape[0] * (t.shape[1] - 1) for t in token_batches)
    clean = sum(model.next_token_loss(t, reduction="none").sum().item() for t in token_batches) / n_tokens
    zeroed = sum(model.next_token_loss(t, splice={HOOK: torch.zeros_like}, reduction="none").sum().item()
                 for t in token_batches) / n_tokens
    for m in (perfect, zero):
        assert m["eval_tokens"] == n_tokens == 10 * 63
        assert m["loss_clean"] == pytest.approx(clean, rel=1e-6)
        assert m["loss_zero_ablated"] == pytest.approx(zeroed, rel=1e-6)
    # the ratio means something: ablating the MLP neurons hurts, and so does mean ablation (less)
    assert perfect["loss_zero_ablated"] > perfect["loss_mean_ablated"] + 0.05 > perfect["loss_clean"] + 0.1

    assert perfect["loss_sae"] == pytest.approx(perfect["loss_clean"], abs=1e-6)
    assert perfect["loss_explained"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["loss_explained_vs_mean"] == pytest.approx(1.0, abs=1e-6)
    assert abs(perfect["kl_sae"]) < 1e-6
    assert perfect["kl_zero_ablated"] > 0.05

    assert zero["loss_sae"] == pytest.approx(zero["loss_zero_ablated"], abs=1e-6)
    assert zero["loss_explained"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_sae"] == pytest.approx(zero["kl_zero_ablated"], rel=1e-6)
    assert zero["loss_explained_vs_mean"] < 0  # zeroing is worse than the mean


def test_reconstruction_returns_to_the_activation_scale_before_splicing(model, token_batches):
    """The SAE sees x * input_scale; what is spliced back must be divided by it again."""
    identity = TrainedSAE("identity", identity_sae(width(model)), HOOK, 2.5)
    m = spliced_metrics(model, identity, token_batches)
    assert m["loss_explained"] == pytest.approx(1.0, abs=1e-5)
    assert abs(m["kl_sae"]) < 1e-5


def test_splices_leave_the_positions_before_skip_first_tokens_clean(model, token_batches):
    """The SAE never trained on positions below harvest.skip_first_tokens: every splice (and the
    mean of mean ablation) starts at that position; every prediction is still scored."""
    d, skip = width(model), 2
    zero = TrainedSAE("zero", hand_set_sae(d, 8), HOOK, 1.0)
    m = spliced_metrics(model, zero, token_batches, skip_first_tokens=skip)

    def zero_from_skip(a):
        out = a.clone()
        out[:, skip:] = 0
        return out

    n_tokens = sum(t.shape[0] * (t.shape[1] - 1) for t in token_batches)
    by_hand = sum(model.next_token_loss(t, splice={HOOK: zero_from_skip}, reduction="none").sum().item()
                  for t in token_batches) / n_tokens
    assert m["eval_tokens"] == n_tokens
    assert m["loss_sae"] == pytest.approx(by_hand, rel=1e-6) and m["loss_zero_ablated"] == pytest.approx(by_hand, rel=1e-6)
    everywhere = spliced_metrics(model, zero, token_batches)
    assert abs(everywhere["loss_sae"] - by_hand) > 1e-3  # the first positions do change the loss

    acts = torch.cat([model.run(t, capture=[HOOK]).activations[HOOK][:, skip:].reshape(-1, d) for t in token_batches])
    torch.testing.assert_close(hook_mean(model, HOOK, token_batches, skip), acts.mean(0), rtol=1e-5, atol=1e-6)
    perfect = spliced_metrics(model, TrainedSAE("identity", identity_sae(d), HOOK, 1.0), token_batches, skip)
    assert perfect["loss_explained"] == pytest.approx(1.0, abs=1e-6) and abs(perfect["kl_sae"]) < 1e-6


def test_heldout_rows_from_the_lm_start_at_skip_first_tokens(pretrained_recipe, model, tmp_path):
    """Without a held-out store (live training, or none harvested) the rows come from the LM,
    from the first position the SAE trained on."""
    recipe = make_recipe(pretrained_recipe, tmp_path, "harvest.skip_first_tokens=3")
    rows = eval_stage.heldout_activations(recipe, model, HOOK, 100)
    _, tokens = next(iter(iter_context_batches(recipe.text, model.tokenizer, "heldout", recipe.eval.batch_size)))
    acts = model.run(tokens, capture=[HOOK]).activations[HOOK]
    torch.testing.assert_close(torch.cat(rows), acts[:, 3:].reshape(-1, acts.shape[-1])[:100].float())


def test_batchtopk_is_evaluated_by_its_threshold_also_while_training():
    """Held-out metrics during training (HeldoutEval) describe the SAE as it is used, by its
    learned threshold, not by the batch's top k·batch (whose L0 is k by construction)."""
    torch.manual_seed(0)
    sae = build_sae(16, SAEConfig(variant="batchtopk", name="b", n_features=64, hook_point=HOOK, k=4))
    x = [torch.randn(128, 16) for _ in range(2)]
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    in_use = evaluate_sae(sae.eval(), x)
    sae.train()
    assert evaluate_sae(sae, x) == in_use and sae.training
    assert in_use["l0"] != pytest.approx(4.0)


def test_sae_that_outputs_the_mean_explains_nothing_against_mean_ablation(model, token_batches):
    d = width(model)
    mean = hook_mean(model, HOOK, token_batches)
    # the mean over every token position of the evaluation batches, by hand
    acts = torch.cat([model.run(t, capture=[HOOK]).activations[HOOK].reshape(-1, d) for t in token_batches])
    torch.testing.assert_close(mean, acts.mean(0), rtol=1e-5, atol=1e-6)

    m = spliced_metrics(model, TrainedSAE("mean", hand_set_sae(d, 8, b_dec=mean), HOOK, 1.0), token_batches)
    assert m["loss_sae"] == pytest.approx(m["loss_mean_ablated"], abs=1e-6)
    assert m["loss_explained_vs_mean"] == pytest.approx(0.0, abs=1e-6)
    # against zero ablation, the mean recovers part of the loss
    expected = (m["loss_zero_ablated"] - m["loss_mean_ablated"]) / (m["loss_zero_ablated"] - m["loss_clean"])
    assert m["loss_explained"] == pytest.approx(expected, rel=1e-5) and 0 < m["loss_explained"] < 1


# --------------------------------------------------------------------------------------------
# Activation metrics on hand-made rows

ROWS = torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.0, 3.0], [-1.0, 0.0, 0.0]])


def test_exact_reconstruction_has_zero_error_and_counts_the_features_that_fire():
    m = evaluate_sae(identity_sae(3), [ROWS[:2], ROWS[2:]])
    assert m["mse"] == 0 and m["fvu"] == 0
    assert m["l0"] == pytest.approx(4 / 3)  # rows fire 2, 1 and 1 features: one per nonzero entry
    assert m["l1"] == pytest.approx((3 + 3 + 1) / 3)  # sum of |x| per row
    # features ±x_1 never fire (column 1 is always 0); the other four do
    assert m["dead_fraction_heldout"] == pytest.approx(2 / 6)


def test_predicting_the_mean_has_fvu_one_and_no_feature_fires():
    mean = ROWS.mean(0)
    m = evaluate_sae(hand_set_sae(3, 4, b_dec=mean), [ROWS[:1], ROWS[1:]])
    total_var = (ROWS - mean).pow(2).sum().item()  # 2 + 0 + 114/9, columns 0, 1, 2
    assert m["fvu"] == pytest.approx(1.0, abs=1e-6)
    assert m["mse"] == pytest.approx(total_var / 9, rel=1e-6)
    assert m["l0"] == 0 and m["l1"] == 0 and m["dead_fraction_heldout"] == 1


def test_fvu_is_the_error_over_the_variance_around_the_mean():
    """Reconstructing zeros: error sum(x²), variance sum((x - mean)²) over all batches together."""
    m = evaluate_sae(hand_set_sae(3, 4), [ROWS[:2], ROWS[2:]])
    assert m["mse"] == pytest.approx(ROWS.pow(2).sum().item() / 9)
    assert m["fvu"] == pytest.approx(15 / (15 - 3 * ROWS.mean(0).pow(2).sum().item()))


def test_density_counter_is_each_features_firing_fraction():
    counter = DensityCounter(4)
    counter.update(torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, -1.0, 3.0]]))
    counter.update(torch.tensor([[0.0, 5.0, 0.0, 1.0]]))
    assert counter.rows == 3
    torch.testing.assert_close(counter.density(), torch.tensor([0, 2 / 3, 0, 1], dtype=torch.float64))
    assert DensityCounter(4).density().sum() == 0  # no rows: no division by zero


def test_density_summary_sorts_features_into_dead_ultralow_and_dense():
    density = torch.tensor([0.0, 0.0, 5e-6, 0.05, 0.5, 1.0], dtype=torch.float64)
    s = density_summary(density)
    assert s["dead_fraction"] == pytest.approx(2 / 6)
    assert s["ultralow_fraction"] == pytest.approx(1 / 6)
    assert s["dense_fraction"] == pytest.approx(2 / 6)
    assert s["median_log10_density"] == pytest.approx(math.log10(0.05))  # lower middle of 4 alive
    assert density_summary(torch.zeros(3, dtype=torch.float64)) == {
        "dead_fraction": 1.0, "ultralow_fraction": 0.0, "dense_fraction": 0.0, "median_log10_density": -math.inf}


# --------------------------------------------------------------------------------------------
# The stage end to end


def test_cli_eval_calls_the_stage_function():
    assert STAGES["eval"][:2] == ("framework.evaluation.evaluate", "evaluate")


def test_eval_writes_metrics_report_density_plot_and_marker(trained_recipe, evaluated):
    name = trained_recipe.sae_configs()[0].name
    assert evaluated == trained_recipe.path("eval")
    results = json.loads((evaluated / "metrics.json").read_text())
    assert list(results) == [name]
    m = results[name]
    assert all(math.isfinite(v) for v in m.values()), m
    assert 0 < m["loss_explained"] <= 1 and m["loss_explained_vs_mean"] <= 1
    assert m["loss_clean"] < m["loss_sae"] < m["loss_zero_ablated"]
    assert 0 < m["kl_sae"] < m["kl_zero_ablated"]
    assert 0 < m["fvu"] < 1 and m["mse"] > 0
    assert 0 < m["l0"] < 256 and m["l1"] > 0
    for key in ("dead_fraction", "dead_fraction_heldout", "ultralow_fraction", "dense_fraction"):
        assert 0 <= m[key] < 1, key
    assert m["dead_fraction"] == m["dead_fraction_heldout"]  # same rows, same firing rule
    assert m["eval_tokens"] == 8 * (trained_recipe.text.context_length - 1)  # eval.n_contexts contexts

    report = (evaluated / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
    assert f"{m['fvu']:.3f}" in row and f"{m['loss_explained']:.1%}" in row and f"{m['l0']:.1f}" in row
    assert f"]({name}_density.png)" in report
    assert (evaluated / f"{name}_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (evaluated / "COMPLETE").is_file()
    assert load_recipe(evaluated / "recipe.yaml") == trained_recipe


def test_eval_metrics_are_those_of_every_heldout_row_in_activation_units(trained_recipe, evaluated):
    """Recomputed here from the store's whole held-out split (smaller than eval.n_tokens) and the
    trained SAE: MSE in the activations' own units, FVU and L0 scale-free."""
    store = ActivationStore(sub_store(trained_recipe.store_location(), "heldout"))
    x = torch.cat([rows.acts[0] for rows in ActivationStream(store, 512, shuffle=False).iter_rows()]).float()
    assert len(x) == HELDOUT_ROWS < trained_recipe.eval.n_tokens
    trained = load_framework_sae(trained_recipe.path("sae") / trained_recipe.sae_configs()[0].name)
    assert trained.input_scale != pytest.approx(1.0, abs=0.1)
    err = (trained.reconstruct(x) - x).pow(2)
    m = json.loads((evaluated / "metrics.json").read_text())[trained.name]
    assert m["mse"] == pytest.approx(err.mean().item(), rel=1e-4)
    assert m["fvu"] == pytest.approx(err.sum().item() / (x - x.mean(0)).pow(2).sum().item(), rel=1e-4)
    features = trained.features(x)
    assert m["l0"] == pytest.approx((features > 0).sum(1).float().mean().item(), rel=1e-4)
    assert m["dead_fraction"] == pytest.approx(1 - (features > 0).any(0).float().mean().item())


def test_training_reports_its_heldout_mse_in_the_units_eval_does(trained_recipe, evaluated):
    """Both metrics.json files hold `mse` in the activations' own units, not the SAE's scaled
    ones (train.normalize_activations=norm here); their held-out rows differ (training's first
    batch against eval's whole split), so they agree only roughly, far closer than input_scale²."""
    name = trained_recipe.sae_configs()[0].name
    scale = load_framework_sae(trained_recipe.path("sae") / name).input_scale
    during_training = json.loads((trained_recipe.path("sae") / name / "metrics.json").read_text())["mse"]
    after = json.loads((evaluated / "metrics.json").read_text())[name]["mse"]
    assert abs(math.log(during_training / after)) < abs(math.log(scale**2)) / 2, (during_training, after, scale)


def test_eval_records_the_heldout_rows_it_used_and_warns_when_fewer_than_asked(trained_recipe, evaluated, model,
                                                                               token_batches, caplog):
    name = trained_recipe.sae_configs()[0].name
    assert json.loads((evaluated / "metrics.json").read_text())[name]["heldout_rows"] == HELDOUT_ROWS
    trained = load_framework_sae(trained_recipe.path("sae") / name)
    with caplog.at_level("WARNING", logger=eval_stage.__name__):
        eval_stage.evaluate_one(trained_recipe, model, trained, token_batches[:1])
    assert f"eval.n_tokens={trained_recipe.eval.n_tokens}, but the held-out split has only {HELDOUT_ROWS} rows" \
        in caplog.text
    caplog.clear()
    fewer = dataclasses.replace(trained_recipe, eval=dataclasses.replace(trained_recipe.eval, n_tokens=1000))
    with caplog.at_level("WARNING", logger=eval_stage.__name__):
        result = eval_stage.evaluate_one(fewer, model, trained, token_batches[:1])
    assert result["metrics"]["heldout_rows"] == 1000 and "held-out split" not in caplog.text


def test_rerunning_a_complete_eval_does_nothing(trained_recipe, evaluated, monkeypatch):
    files = {p: p.stat().st_mtime_ns for p in evaluated.iterdir()}

    def no_lm(*args, **kwargs):
        raise AssertionError("a complete evaluation loaded the LM again")

    monkeypatch.setattr(eval_stage, "load_lm", no_lm)
    assert eval_stage.evaluate(trained_recipe) == evaluated
    assert {p: p.stat().st_mtime_ns for p in evaluated.iterdir()} == files


def test_output_of_saes_trained_again_is_made_again_and_of_the_same_weights_kept(pretrained_recipe, trained_recipe,
                                                                               evaluated, tmp_path, caplog):
    """eval and export record a digest of the weights they read: SAEs trained again under the
    same fingerprint (another train.devices, or their directory deleted and trained again) make
    the earlier output unfinished; the same weights written again (a deterministic retrain) do not."""
    shutil.copytree(trained_recipe.path("sae"), tmp_path / "sae")
    recipe = make_recipe(pretrained_recipe, Path(trained_recipe.workdir), f"train.output_dir={tmp_path / 'sae'}",
                         f"eval.output_dir={tmp_path / 'eval'}", f"export.output_dir={tmp_path / 'export'}")
    name = recipe.sae_configs()[0].name
    weights = tmp_path / "sae" / name / "sae.safetensors"
    eval_dir, export_dir = eval_stage.evaluate(recipe), export(recipe)
    before = json.loads((eval_dir / "metrics.json").read_text())[name]
    assert json.loads((eval_dir / "metrics.json").read_text()) == json.loads((evaluated / "metrics.json").read_text())

    save_file(load_file(str(weights)), str(weights))  # the same tensors, a new file
    assert is_complete(eval_dir, recipe, "eval") and is_complete(export_dir, recipe, "export")

    state = load_file(str(weights))
    state["W_dec"] = state["W_dec"] * 0.5
    save_file(state, str(weights))
    imported = make_recipe(pretrained_recipe, Path(trained_recipe.workdir), f"eval.sae_path={export_dir / name}",
                           f"eval.output_dir={tmp_path / 'eval_imported'}")
    assert is_complete(eval_stage.evaluate(imported), imported, "eval")
    with caplog.at_level(logging.WARNING):
        assert not is_complete(eval_dir, recipe, "eval") and not is_complete(export_dir, recipe, "export")
    assert "output of SAE weights that have changed since (trained again): it counts as unfinished" in caplog.text
    after = json.loads((eval_stage.evaluate(recipe) / "metrics.json").read_text())[name]
    assert after["fvu"] != pytest.approx(before["fvu"]) and is_complete(eval_dir, recipe, "eval")
    assert is_complete(imported.path("eval"), imported, "eval")  # its SAELens directory is as it was
    export(recipe)
    assert is_complete(export_dir, recipe, "export")
    assert not is_complete(imported.path("eval"), imported, "eval")  # exported again: new weights there
    scale = json.loads((weights.parent / "config.json").read_text())["input_scale"]
    exported = load_file(str(export_dir / name / "sae_weights.safetensors"))
    assert torch.allclose(exported["W_dec"] * scale, state["W_dec"])  # the new weights


def test_eval_of_another_recipe_into_a_complete_directory_is_refused(pretrained_recipe, trained_recipe, evaluated):
    other = make_recipe(pretrained_recipe, Path(trained_recipe.workdir), "eval.n_contexts=4")
    with pytest.raises(RecipeError, match=r"different recipe.*eval\.n_contexts"):
        eval_stage.evaluate(other)


def test_saelens_export_evaluated_through_sae_path_scores_the_same(pretrained_recipe, trained_recipe, evaluated):
    name = trained_recipe.sae_configs()[0].name
    exported = export(trained_recipe) / name
    assert (exported / "cfg.json").is_file()
    imported = make_recipe(pretrained_recipe, Path(trained_recipe.workdir), f"eval.sae_path={exported}",
                           f"eval.output_dir={Path(trained_recipe.workdir) / 'eval_imported'}")
    [loaded] = load_trained_saes(imported)
    assert loaded.input_scale == 1.0  # the scale is folded into the exported weights
    out = eval_stage.evaluate(imported)
    direct = json.loads((evaluated / "metrics.json").read_text())[name]
    via_export = json.loads((out / "metrics.json").read_text())
    assert list(via_export) == [name]
    assert via_export[name].keys() == direct.keys()
    for key, value in direct.items():
        assert via_export[name][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert (out / "COMPLETE").is_file() and (out / f"{name}_density.png").is_file()


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("stage", [eval_stage.evaluate, export])
def test_saes_trained_by_another_recipe_are_refused_naming_what_differs(pretrained_recipe, trained_recipe, tmp_path,
                                                                        stage):
    """eval and export would otherwise record this recipe's train settings for SAEs trained with
    others; eval.sae_path still takes an SAE from anywhere."""
    other = make_recipe(pretrained_recipe, Path(trained_recipe.workdir), "train.lr=1e-3",
                        f"eval.output_dir={tmp_path / 'eval'}", f"export.output_dir={tmp_path / 'export'}")
    with pytest.raises(CheckpointError, match=r"trained by a different recipe \(train.lr: 0.003 there, 0.001 here\)"
                                              r".*recipe.yaml.*eval.sae_path"):
        stage(other)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "export").exists()

    name = trained_recipe.sae_configs()[0].name
    imported = dataclasses.replace(other, eval=dataclasses.replace(other.eval, sae_path=str(export(trained_recipe) / name)))
    assert [s.name for s in load_trained_saes(imported)] == [name]


def test_eval_before_training_names_the_command_to_run(pretrained_recipe, trained_recipe, tmp_path, capsys):
    recipe = make_recipe(pretrained_recipe, tmp_path, f"harvest.output_dir={trained_recipe.path('activations')}")
    with pytest.raises(CheckpointError, match=r"no trained SAE \['paper_256_l1_1e-03'\].*run `sae train RECIPE`"):
        eval_stage.evaluate(recipe)
    assert not recipe.path("eval").exists()

    # what a user sees: one line on stderr, exit status 2, no traceback
    yaml = save_recipe(recipe, tmp_path / "recipe")
    assert main(["eval", str(yaml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae eval: error: no trained SAE") and "sae train RECIPE" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("stage", [eval_stage.evaluate, analyze_features])
def test_contexts_longer_than_the_lm_reads_are_refused_when_the_lm_loads(pretrained_recipe, tmp_path, stage):
    recipe = make_recipe(pretrained_recipe, tmp_path, "text.context_length=128")
    with pytest.raises(RecipeError, match=r"text.context_length=128 .*n_ctx is 64 .*text.context_length=64 or less"):
        stage(recipe)
    assert not recipe.path("eval").exists() and not recipe.path("analysis").exists()


@pytest.mark.parametrize("stage", [eval_stage.evaluate, analyze_features])
@pytest.mark.parametrize("hook, d_in, message", [
    (HOOK, 128, rf"d_in=128, but hook point '{HOOK}' of the LM \(builtin\) is 512 wide"),
    ("blocks.3.mlp.hook_post", 512, r"reads hook point 'blocks.3.mlp.hook_post', which the LM \(builtin\) does not have"),
])
def test_an_sae_that_does_not_fit_the_lms_hook_point_is_refused_when_loaded(pretrained_recipe, tmp_path, stage,
                                                                            hook, d_in, message):
    """An SAE made for another model (here through eval.sae_path) is named with its width and
    hook, before any activation reaches it."""
    cfg = SAEConfig(variant="paper", name="elsewhere", n_features=64, hook_point=hook)
    sae_dir = export_sae(TrainedSAE("elsewhere", build_sae(d_in, cfg), hook, 1.0), tmp_path / "elsewhere")
    recipe = make_recipe(pretrained_recipe, tmp_path, f"eval.sae_path={sae_dir}")
    with pytest.raises(CheckpointError, match=rf"SAE 'elsewhere' \(eval.sae_path=.*elsewhere\) .*{message}.*"
                                              rf"Point eval.sae_path at an SAE trained on '{hook}' of this LM"):
        stage(recipe)
    assert not recipe.path("eval").exists() and not recipe.path("analysis").exists()


def test_an_unreadable_heldout_split_is_an_error_not_a_quiet_switch_to_the_lm(pretrained_recipe, trained_recipe,
                                                                             tmp_path):
    """A held-out store that is there but damaged: `sae eval` ran the LM over held-out text
    instead, without a word (training and `sae harvest --verify` refuse it)."""
    store = tmp_path / "activations"
    shutil.copytree(trained_recipe.path("activations"), store)
    (store / "heldout" / "manifest.json").write_text("xx{")
    recipe = make_recipe(pretrained_recipe, Path(trained_recipe.workdir), f"harvest.output_dir={store}",
                         f"eval.output_dir={tmp_path / 'eval'}")
    with pytest.raises(DataError, match=r"cannot read .*heldout/manifest.json .*Run `sae harvest RECIPE`"):
        eval_stage.evaluate(recipe)
    assert not (tmp_path / "eval" / "COMPLETE").exists()


def test_eval_of_a_directory_that_is_no_saelens_sae_is_refused(pretrained_recipe, trained_recipe, tmp_path):
    recipe = make_recipe(pretrained_recipe, tmp_path, f"eval.sae_path={trained_recipe.path('sae')}")
    with pytest.raises(CheckpointError, match=r"not an SAELens SAE directory: cfg\.json is missing"):
        eval_stage.evaluate(recipe)


def test_a_stage_stopped_by_sigterm_exits_non_zero_saying_so(monkeypatch, capsys):
    """Lightning turns SIGTERM into SystemExit(None): a preempted job must not look finished."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import framework.cli as cli

    def preempted(*args, **kwargs):
        raise SIGTERMException

    monkeypatch.setattr(cli, "_call_stage", preempted)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    assert main(["train", str(recipe)]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
