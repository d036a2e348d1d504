"""`sae sweep`: points in their own directories, re-runs finish only what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_PRETRAIN, inject
from lightning.pytorch.callbacks import Callback

import framework.sweep as sweep_module
from framework.config import load_recipe, with_overrides
from framework.errors import FrameworkError, RecipeError, TrainingError
from framework.sweep import _apply, expand_points, point_name, point_stages, sweep

SMALL = [
    "harvest.n_tokens=8192", "harvest.tokens_per_context=32", "harvest.shuffle_window=4096",
    "harvest.rows_per_shard=2048", "harvest.rows_per_sample=512", "harvest.heldout_tokens=2048",
    "sae.n_features=128", "sae.init=data", "sae.init_target_l0=8", "train.n_tokens=4096",
    "train.batch_size=512", "train.wandb.mode=disabled", "train.eval_batches=2",
    "train.resample_sample_size=1024", "eval.n_tokens=2048", "eval.n_contexts=8",
]


def sweep_recipe(pretrained_recipe, tmp_path: Path, sweep_yaml: str):
    (tmp_path / "sweep.yaml").write_text(sweep_yaml)
    return load_recipe(tmp_path / "sweep.yaml", [*TINY_PRETRAIN, f"workdir={tmp_path}",
                                                 f"lm.path={pretrained_recipe.path('lm')}", *SMALL])


class FailOnFit(Callback):
    """Raises `error` as the `nth` training run it is injected into starts."""

    def __init__(self, nth: int, error: Exception):
        self.nth, self.error, self.fits = nth, error, 0

    def on_fit_start(self, trainer, module):
        self.fits += 1
        if self.fits == self.nth:
            raise self.error


def test_grid_expands_to_the_product_and_validates_keys(pretrained_recipe, tmp_path):
    recipe = sweep_recipe(pretrained_recipe, tmp_path, "sweep:\n  grid:\n    sae.n_features: [64, 128]\n"
                                                       "    train.lr: [0.001, 0.002, 0.004]\n")
    points = expand_points(recipe)
    assert len(points) == 6 and points[0] == {"sae.n_features": 64, "train.lr": 0.001}
    bad = sweep_recipe(pretrained_recipe, tmp_path, "sweep:\n  grid:\n    sae.n_featurs: [64]\n")
    with pytest.raises(RecipeError, match="n_featurs"):
        expand_points(bad)


def test_points_that_change_harvest_harvest_their_own_store(pretrained_recipe, tmp_path):
    recipe = sweep_recipe(pretrained_recipe, tmp_path, "sweep:\n  points:\n    - {harvest.tokens_per_context: 16}\n"
                                                       "    - {train.lr: 0.002}\n")
    own, shared = expand_points(recipe)
    assert point_stages(recipe, own)[0] == "harvest" and "pretrain" not in point_stages(recipe, own)
    assert point_stages(recipe, shared) == ["train", "eval"]


def test_interrupted_sweep_rerun_finishes_only_missing_points(pretrained_recipe, tmp_path, monkeypatch):
    recipe = sweep_recipe(pretrained_recipe, tmp_path, "sweep:\n  grid:\n    train.lr: [0.002, 0.004]\n"
                                                       "  stages: [train, eval]\n")
    with monkeypatch.context() as patch:
        inject(patch, FailOnFit(2, RuntimeError("injected interruption")))
        with pytest.raises(RuntimeError, match="injected interruption"):
            sweep(recipe)
    first, second = (tmp_path / "sweep" / point_name(p) for p in expand_points(recipe))
    assert (first / "eval" / "COMPLETE").is_file() and not (second / "sae" / "COMPLETE").exists()
    finished = (first / "sae" / "COMPLETE").stat().st_mtime

    root = sweep(recipe)
    assert (first / "sae" / "COMPLETE").stat().st_mtime == finished  # not redone
    assert (second / "eval" / "COMPLETE").is_file()
    summary = (root / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("point,train.lr,l0,fvu") and len(summary) == 3
    assert all(row.split(",")[2] for row in summary[1:])  # every point has its L0
    assert (root / "summary.md").is_file() and (root / "pareto.png").stat().st_size > 1000


def test_sweep_over_sae_keys_trains_one_bank_in_one_pass(pretrained_recipe, tmp_path):
    recipe = sweep_recipe(pretrained_recipe, tmp_path, "sweep:\n  grid:\n    sae.l1_coefficient: [0.0003, 0.003]\n"
                                                       "  stages: [train]\n")
    root = sweep(recipe)
    bank = root / "bank" / "sae"
    names = [point_name(p) for p in expand_points(recipe)]
    assert json.loads((bank / "COMPLETE").read_text())["saes"] == names
    l0 = [json.loads((bank / n / "metrics.json").read_text())["l0"] for n in names]
    assert l0[0] > l0[1]  # the stronger L1 penalty gives the sparser codes
    assert "l1_coefficient" in (root / "summary.md").read_text()

    # One point again on its own (as a SLURM array task would): the other point's row keeps the
    # bank's metrics, where it was left blank.
    sweep(recipe, point_index=1)
    rows = {row.split(",")[0]: row.split(",") for row in (root / "summary.csv").read_text().splitlines()[1:]}
    header = (root / "summary.csv").read_text().splitlines()[0].split(",")
    assert float(rows[names[0]][header.index("l0")]) == pytest.approx(l0[0])
    (own_metrics,) = (root / names[1] / "sae").glob("*/metrics.json")
    own = json.loads(own_metrics.read_text())["l0"]
    assert float(rows[names[1]][header.index("l0")]) == pytest.approx(own)


def test_a_bank_sweep_analyses_each_points_sae_in_a_directory_of_its_own(tmp_path, monkeypatch):
    """The analysis reads one SAE, the bank's first unless analyze.sae_name says: a bank sweep
    with analyze among its stages analysed its first point only."""
    recipe = load_recipe(None, [f"workdir={tmp_path}", "lm.name=smollm2", "harvest.mode=live",
                                "sweep.grid={sae.l1_coefficient: [0.001, 0.002]}", "sweep.stages=[train, analyze]"])
    calls = []
    monkeypatch.setattr(sweep_module, "run_stage", lambda stage, r: calls.append((stage, r.analyze.sae_name, r.path("analysis"))))
    sweep(recipe)
    bank = tmp_path / "sweep" / "bank"
    assert calls == [("train", "", bank / "analysis"),
                     ("analyze", "l1_coefficient=0p001", bank / "analysis" / "l1_coefficient=0p001"),
                     ("analyze", "l1_coefficient=0p002", bank / "analysis" / "l1_coefficient=0p002")]


def test_the_summary_shows_only_metrics_this_sweeps_recipe_finished(tmp_path):
    """After the sweep's recipe changed, a `--point` run rewrote the summary with the other
    points' metrics of the old recipe."""
    from framework.artifacts import mark_complete
    from framework.sweep import _point_results

    recipe = load_recipe(None, [f"workdir={tmp_path}", "lm.name=smollm2", "harvest.mode=live",
                                "sweep.grid={train.lr: [0.001, 0.002]}", "sweep.stages=[train, eval]"])
    root = tmp_path / "sweep"
    for point, l0 in zip(expand_points(recipe), (11.0, 22.0)):
        point_recipe = _apply(recipe, point, root / point_name(point))
        (eval_dir := point_recipe.path("eval")).mkdir(parents=True)
        (eval_dir / "metrics.json").write_text(json.dumps({point_recipe.sae_configs()[0].name: {"l0": l0}}))
        mark_complete(eval_dir, point_recipe if l0 == 11.0 else with_overrides(point_recipe, ["eval.n_tokens=99"]), "eval")
    assert [m.get("l0") for _, _, m in _point_results(recipe, expand_points(recipe), root)] == [11.0, None]


def test_a_swept_sae_key_that_bank_entries_set_is_refused(tmp_path):
    """The bank entry overrides `sae`: both points trained the bank's L1 under different labels."""
    bank = "train.bank=[{name: a, l1_coefficient: 0.01}, {name: b, n_features: 64}]"
    recipe = load_recipe(None, [bank, "sweep.grid={sae.l1_coefficient: [0.001, 0.002]}"])
    with pytest.raises(RecipeError, match=r"sweep key sae.l1_coefficient is overridden by train.bank entries \[0\], "
                                          r"which set l1_coefficient themselves.*remove train.bank"):
        expand_points(recipe)
    # a key no entry sets reaches every entry, and is swept
    swept = load_recipe(None, [bank, "sweep.grid={sae.k: [8, 16]}", "sae.variant=topk"])
    points = expand_points(swept)
    assert [[c.k for c in _apply(swept, p).sae_configs()] for p in points] == [[8, 8], [16, 16]]


def test_point_values_keep_their_yaml_types(tmp_path):
    """Points were turned back into `key=value` text and read again: null became "None", a
    quoted "off" the boolean false, "1e3" the number 1000.0."""
    (tmp_path / "sweep.yaml").write_text('sweep:\n  grid:\n    train.resample_steps: [null, [5, 9]]\n'
                                         '    train.wandb.project: ["off", "1e3"]\n')
    recipe = load_recipe(tmp_path / "sweep.yaml")
    points = [_apply(recipe, p) for p in expand_points(recipe)]
    assert [(r.train.resample_steps, r.train.wandb.project) for r in points] == [
        (None, "off"), (None, "1e3"), ([5, 9], "off"), ([5, 9], "1e3")]


def test_a_point_that_changes_the_harvest_makes_its_own_store_even_when_the_base_reads_a_url(tmp_path):
    recipe = load_recipe(None, [f"workdir={tmp_path}", "harvest.output_dir=https://example.com/stores/base",
                                "sweep.points=[{harvest.tokens_per_context: 32}, {train.lr: 0.002}]"])
    own, shared = expand_points(recipe)
    root = tmp_path / "sweep"
    assert _apply(recipe, own, root / point_name(own)).store_location() == str(root / "tokens_per_context=32" / "activations")
    assert _apply(recipe, shared, root / point_name(shared)).store_location() == "https://example.com/stores/base"


def test_a_point_runs_the_stages_its_own_recipe_needs(tmp_path):
    live = load_recipe(None, ["harvest.mode=live", "sweep.points=[{harvest.mode: shards}]"])
    assert point_stages(live, expand_points(live)[0])[0] == "harvest"
    hub = load_recipe(None, ["lm.name=smollm2", "sweep.points=[{lm.name: builtin}]"])
    assert point_stages(hub, expand_points(hub)[0])[:2] == ["pretrain", "harvest"]


def test_points_that_change_the_lm_pretrain_and_harvest_their_own(tmp_path):
    """A point with its own LM trained on the base store, which is refused for other LM weights:
    it pretrains and harvests in its own directory, never in the base recipe's."""
    recipe = load_recipe(None, [f"workdir={tmp_path}", f"lm.path={tmp_path}/base_lm",
                                f"harvest.output_dir={tmp_path}/base_store",
                                "sweep.points=[{pretrain.steps: 7}, {train.lr: 0.002}]"])
    own, shared = expand_points(recipe)
    assert point_stages(recipe, own) == ["pretrain", "harvest", "train", "eval"]
    assert point_stages(recipe, shared) == ["train", "eval"]
    root = tmp_path / "sweep"
    own_recipe = _apply(recipe, own, root / point_name(own))
    assert own_recipe.path("lm") == root / "steps=7" / "lm"
    assert own_recipe.path("activations") == root / "steps=7" / "activations"
    shared_recipe = _apply(recipe, shared, root / point_name(shared))
    assert (shared_recipe.path("lm"), shared_recipe.path("activations")) == (tmp_path / "base_lm", tmp_path / "base_store")


def test_point_names_keep_colliding_keys_apart_and_repeated_points_are_refused():
    """point_name kept the last part of each key: train.n_tokens and eval.n_tokens shared one
    directory; a grid [1.0e-3, 0.001] gave one point twice, and failed after pretrain and harvest."""
    recipe = load_recipe(None, ["sweep.points=[{train.n_tokens: 8192}, {eval.n_tokens: 8192}]"])
    points = expand_points(recipe)
    keys = ["train.n_tokens", "eval.n_tokens"]
    assert [point_name(p, keys) for p in points] == ["train-n_tokens=8192", "eval-n_tokens=8192"]
    assert point_name({"sae.l1_coefficient": 0.001, "train.lr": 0.002}) == "l1_coefficient=0p001_lr=0p002"
    repeated = load_recipe(None, ["sweep.grid={sae.l1_coefficient: [1.0e-3, 0.001]}"])
    with pytest.raises(RecipeError, match=r"the sweep has the point \{'sae.l1_coefficient': 0.001\} twice "
                                          r"\(points 0 and 1\).*Remove the repeated value"):
        expand_points(repeated)


def test_a_failed_point_stops_neither_the_others_nor_the_summary(pretrained_recipe, tmp_path, monkeypatch):
    """The first point's failure stopped the sweep: later points never ran, and no summary was
    written, not even for the points that had finished."""
    recipe = sweep_recipe(pretrained_recipe, tmp_path, "sweep:\n  grid:\n    train.lr: [0.002, 0.004]\n"
                                                       "  stages: [train]\n")
    inject(monkeypatch, FailOnFit(1, TrainingError("injected divergence")))
    with pytest.raises(FrameworkError, match=r"1 of 2 sweep points failed \(lr=0p002: injected divergence\)"):
        sweep(recipe)
    root = tmp_path / "sweep"

    def statuses():
        header, *rows = (root / "summary.csv").read_text().splitlines()
        return [row.split(",")[header.split(",").index("status")] for row in rows]

    assert statuses() == ["failed: injected divergence", "done"]
    assert (root / "lr=0p004" / "sae" / "COMPLETE").is_file() and (root / "pareto.png").is_file()
    # another array task summarising later still knows why the point failed
    sweep_module.summarise(recipe, expand_points(recipe), root)
    assert statuses() == ["failed: injected divergence", "done"]


@pytest.mark.parametrize("overrides, error", [
    (["sweep.grid={train.lr: [0.001, 0.002]}", "sweep.points=[{train.lr: 0.003}]"],
     r"sweep.points\[0\] sets train.lr, which sweep.grid sweeps too"),
    (["sweep.points=[{sae.name: a}, {sae.name: b}]"], "sae.name cannot be swept"),
    (["sweep.grid={sae.n_features: [many]}"], r"sweep point 0 .*wrong type for .sae.n_features."),
])
def test_sweeps_that_would_not_train_what_they_say_are_refused(overrides, error):
    with pytest.raises(RecipeError, match=error):
        expand_points(load_recipe(None, overrides))


def test_a_nested_grid_is_read_as_dotted_keys_and_an_empty_point_is_the_base(tmp_path):
    (tmp_path / "sweep.yaml").write_text("sweep:\n  grid:\n    sae:\n      l1_coefficient: [0.001, 0.002]\n"
                                         "  points: [{}, {train.lr: 0.002}]\n")
    points = expand_points(load_recipe(tmp_path / "sweep.yaml"))
    assert points[0] == {"sae.l1_coefficient": 0.001} and points[2] == {"train.lr": 0.002, "sae.l1_coefficient": 0.001}
    assert point_name({}) == "base"
    same = expand_points(load_recipe(None, ["sweep.grid.sae.l1_coefficient=[0.001, 0.002]"]))
    assert same == [{"sae.l1_coefficient": 0.001}, {"sae.l1_coefficient": 0.002}]


def test_a_command_line_override_of_a_swept_key_is_refused(tmp_path, capsys):
    from framework.cli import main

    (tmp_path / "sweep.yaml").write_text("sweep:\n  grid:\n    sae.n_features: [64, 128]\n")
    assert main(["sweep", str(tmp_path / "sweep.yaml"), f"workdir={tmp_path}", "sae.n_features=8192"]) == 2
    assert "sae.n_features is swept (sweep.grid / sweep.points)" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()
    # a key only some points set still reaches the others
    some = load_recipe(None, ["sweep.points=[{sae.l1_coefficient: 0.002}, {train.lr: 0.001}]", "train.lr=0.0005"])
    sweep_module.check_overrides_not_swept(some, ["train.lr=0.0005"])


@pytest.mark.parametrize("value", ["[1]", "5"])
def test_a_grid_that_is_not_a_mapping_is_refused_with_its_form(value):
    with pytest.raises(RecipeError, match=r"'sweep.grid' maps dotted recipe keys to lists of values.*sae.l1_coefficient"):
        load_recipe(None, [f"sweep.grid={value}"])


def test_array_tasks_write_the_summary_one_at_a_time(tmp_path):
    """Each `--point N` task read every point's metrics and renamed its summary into place: a
    task that read before another's point finished put back a summary without it."""
    import fcntl
    import threading

    from framework.locks import lock_path
    from framework.sweep import summarise

    recipe = load_recipe(None, [f"workdir={tmp_path}", "sweep.grid={train.lr: [0.001, 0.002]}"])
    root = tmp_path / "sweep"
    root.mkdir()
    with open(lock_path(root / "summary.csv"), "w") as held:  # another task summarising
        fcntl.flock(held, fcntl.LOCK_EX)
        task = threading.Thread(target=summarise, args=(recipe, expand_points(recipe), root))
        task.start()
        task.join(timeout=1.0)
        assert task.is_alive() and not (root / "summary.csv").exists()  # waits its turn
    task.join(timeout=30)
    assert not task.is_alive() and len((root / "summary.csv").read_text().splitlines()) == 3


def test_a_bank_sweep_whose_points_changed_says_what_to_do_in_a_sweep(tmp_path, monkeypatch):
    """Adding a grid value changes the bank: training refused the bank trained for the old
    points, advising an output_dir, which a sweep sets itself."""
    from framework.artifacts import mark_complete
    from framework.sweep import _bank_recipe

    monkeypatch.setattr(sweep_module, "run_stage", lambda stage, r: None)
    before = load_recipe(None, [f"workdir={tmp_path}", "lm.name=smollm2", "harvest.mode=live",
                                "sweep.grid={sae.l1_coefficient: [0.001, 0.002]}", "sweep.stages=[train]"])
    trained = _bank_recipe(before, expand_points(before), tmp_path / "sweep" / "bank")
    trained.path("sae").mkdir(parents=True)
    mark_complete(trained.path("sae"), trained, "train")
    after = with_overrides(before, ["sweep.grid={sae.l1_coefficient: [0.001, 0.002, 0.004]}"])
    with pytest.raises(RecipeError, match=r"the sweep's bank in .*bank was trained by another version of this sweep "
                                          r"\(train.bank: .*\).*delete .*bank to train it again, or give this version"):
        sweep(after)
    sweep(before)  # the same points: the bank is theirs


def test_a_sweep_over_a_bank_recipe_summarises_every_sae_of_each_point(tmp_path):
    """Only the bank's first SAE of each point reached the summary."""
    from framework.artifacts import mark_complete
    from framework.sweep import summarise

    recipe = load_recipe(None, [f"workdir={tmp_path}", "lm.name=smollm2", "harvest.mode=live",
                                "train.bank=[{name: small, n_features: 64}, {name: large, n_features: 128}]",
                                "sweep.grid={train.lr: [0.001, 0.002]}", "sweep.stages=[train, eval]"])
    root = tmp_path / "sweep"
    for i, point in enumerate(expand_points(recipe)):
        point_recipe = _apply(recipe, point, root / point_name(point))
        (eval_dir := point_recipe.path("eval")).mkdir(parents=True)
        (eval_dir / "metrics.json").write_text(json.dumps({"small": {"l0": 10.0 + i}, "large": {"l0": 20.0 + i}}))
        mark_complete(eval_dir, point_recipe, "eval")
    summarise(recipe, expand_points(recipe), root)
    header, *rows = [row.split(",") for row in (root / "summary.csv").read_text().splitlines()]
    assert header[:4] == ["point", "train.lr", "sae", "l0"]
    assert [(r[0], r[2], float(r[3])) for r in rows] == [("lr=0p001", "small", 10.0), ("lr=0p001", "large", 20.0),
                                                        ("lr=0p002", "small", 11.0), ("lr=0p002", "large", 21.0)]


def test_a_point_that_fails_before_writing_anything_keeps_its_reason(tmp_path, monkeypatch):
    def run_stage(stage, point_recipe):
        if "0p001" in str(point_recipe.workdir):
            raise TrainingError("refused at once")

    monkeypatch.setattr(sweep_module, "run_stage", run_stage)
    recipe = load_recipe(None, [f"workdir={tmp_path}", "lm.name=smollm2", "harvest.mode=live",
                                "sweep.grid={train.lr: [0.001, 0.002]}", "sweep.stages=[train]"])
    with pytest.raises(FrameworkError, match=r"1 of 2 sweep points failed \(lr=0p001: refused at once\)"):
        sweep(recipe)
    assert (tmp_path / "sweep" / "lr=0p001" / "FAILED").read_text() == "refused at once"
    assert "failed: refused at once" in (tmp_path / "sweep" / "summary.md").read_text()
