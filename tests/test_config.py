"""The recipe schema: loading, inheritance, overrides, and errors that name the problem."""

from pathlib import Path

import pytest

from framework.config import RecipeError, load_recipe, recipe_from_dict, recipe_to_dict

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_loads():
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.sae_configs(), path


def test_override_from_command_line_wins():
    recipe = load_recipe(REPO / "recipes/quickstart.yaml", ["sae.n_features=8192", "train.lr=2e-3"])
    assert recipe.sae.n_features == 8192
    assert recipe.train.lr == pytest.approx(2e-3)


def test_base_recipe_is_inherited_and_overridden(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nsae:\n  n_features: 1024\n  l1_coefficient: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: child\nsae:\n  n_features: 2048\n")
    recipe = load_recipe(tmp_path / "child.yaml")
    assert (recipe.name, recipe.sae.n_features, recipe.sae.l1_coefficient) == ("child", 2048, 0.5)


def test_workdir_interpolates_the_name():
    assert load_recipe(None, ["name=abc"]).workdir == "runs/abc"


def test_unknown_key_names_key_section_and_nearest_valid_key():
    with pytest.raises(RecipeError, match=r"unknown key 'n_featres' in section 'sae'.*did you mean 'n_features'"):
        load_recipe(None, ["sae.n_featres=3"])


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    (tmp_path / "r.yaml").write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(RecipeError, match=r"'learning_rate' in section 'train'"):
        load_recipe(tmp_path / "r.yaml")


def test_wrong_type_names_field_value_and_expected_type():
    with pytest.raises(RecipeError, match=r"'sae.n_features': got 'many', expected int"):
        load_recipe(None, ["sae.n_features=many"])


@pytest.mark.parametrize("override, message", [
    ("train.wandb=disabled", r"'train.wandb' is a section, not a single value: got 'disabled'.*"
                             r"e.g. train.wandb.mode=disabled \(keys of train.wandb: enabled, project"),
    ("sae=5", r"'sae' is a section, not a single value: got 5.*e.g. sae.KEY=5 \(keys of sae: name, variant"),
    ("text=[a, b]", r"'text' is a section, not a single value: got a list.*text.KEY=VALUE"),
    ("harvest.hook_points=x", r"'harvest.hook_points' is a list, got 'x'.*e.g. harvest.hook_points=\[x\]"),
    ("harvest.hook_points={a: 1}", r"'harvest.hook_points' is a list, got a mapping"),
    ("train.bank=5", r"'train.bank' is a list, got 5.*e.g. train.bank=\[\{KEY: VALUE\}\]"),
])
def test_a_value_where_a_section_or_list_belongs_names_the_key_and_the_expected_form(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override])


def test_a_value_where_a_section_belongs_in_a_yaml_file_names_the_key(tmp_path):
    (tmp_path / "r.yaml").write_text("train:\n  wandb: offline\n")
    with pytest.raises(RecipeError, match=r"'train.wandb' is a section.*train.wandb.mode=offline"):
        load_recipe(tmp_path / "r.yaml")


def test_value_outside_choices_lists_the_choices():
    with pytest.raises(RecipeError, match=r"sae.variant='topkk' is not one of .*did you mean 'topk'"):
        load_recipe(None, ["sae.variant=topkk"])


def test_missing_recipe_file_names_the_path(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match=rf"^{tmp_path} is a directory, not a recipe file$"):
        load_recipe(tmp_path)


def test_missing_base_file_names_the_path_and_the_recipe_naming_it(tmp_path):
    (tmp_path / "child.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(RecipeError, match=rf"recipe file not found: {tmp_path}/gone.yaml \(the `base:` of "
                                          rf"{tmp_path}/child.yaml\)"):
        load_recipe(tmp_path / "child.yaml")


def test_bank_entries_override_the_sae_section_and_get_names():
    recipe = load_recipe(None, ["train.bank=[{n_features: 512}, {n_features: 1024, l1_coefficient: 0.01}]"])
    configs = recipe.sae_configs()
    assert [c.n_features for c in configs] == [512, 1024]
    assert configs[1].l1_coefficient == 0.01 and configs[0].l1_coefficient == recipe.sae.l1_coefficient
    assert len({c.name for c in configs}) == 2


def test_an_override_that_bank_entries_mask_is_refused_and_one_that_reaches_them_applies():
    """`sae run recipes/paper/bank.yaml sae.n_features=1024` trained the bank's sizes and recorded
    1,024 in every output's fingerprint."""
    with pytest.raises(RecipeError, match=r"override sae.n_features does not reach the SAEs: every train.bank entry "
                                          r"\(\[0, 1, 2, 3\]\) sets n_features itself"):
        load_recipe(REPO / "recipes/paper/bank.yaml", ["sae.n_features=1024"])
    recipe = load_recipe(REPO / "recipes/paper/bank.yaml", ["sae.l1_coefficient=0.002"])
    assert {c.l1_coefficient for c in recipe.sae_configs()} == {0.002}
    # one that some entries leave to the sae section reaches those
    recipe = load_recipe(None, ["train.bank=[{n_features: 64}, {n_features: 128, k: 16}]", "sae.variant=topk", "sae.k=8"])
    assert [c.k for c in recipe.sae_configs()] == [8, 16]


def test_a_secret_read_through_oc_env_is_refused_and_a_path_is_resolved(monkeypatch, tmp_path):
    """`${oc.env:...}` is resolved and saved like any value: a key read that way reached
    recipe.yaml and W&B's config."""
    monkeypatch.setenv("SCRATCH", str(tmp_path))
    monkeypatch.setenv("SERVICE_TOKEN", "s3cr3t")
    assert load_recipe(None, ["workdir=${oc.env:SCRATCH}/runs"]).workdir == f"{tmp_path}/runs"
    (tmp_path / "r.yaml").write_text("harvest:\n  output_dir: 'pipe:curl -H \"X: ${oc.env:SERVICE_TOKEN}\" {name}'\n")
    with pytest.raises(RecipeError, match=r"harvest.output_dir reads \$\{oc.env:SERVICE_TOKEN\}.*saved") as refused:
        load_recipe(tmp_path / "r.yaml")
    assert "s3cr3t" not in str(refused.value)
    # the variable's name computed from another value hid it from the check
    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t")
    for computed in ("${oc.env:${name}}", "${oc.env:MY_${name}}"):
        (tmp_path / "r.yaml").write_text(f"name: SERVICE_TOKEN\ntrain:\n  wandb:\n    entity: {computed}\n")
        with pytest.raises(RecipeError, match=r"train.wandb.entity reads an environment variable whose name is "
                                              r"itself computed") as refused:
            load_recipe(tmp_path / "r.yaml")
        assert "s3cr3t" not in str(refused.value)


def test_bank_entry_with_unknown_key_is_refused():
    with pytest.raises(RecipeError, match=r"'n_featurs' in section 'train.bank\[0\]'"):
        load_recipe(None, ["train.bank=[{n_featurs: 512}]"])


def test_resolved_recipe_round_trips_through_a_dict():
    recipe = load_recipe(REPO / "recipes/quickstart.yaml")
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_harvest_positions_must_fit_in_a_context():
    with pytest.raises(RecipeError, match="tokens_per_context"):
        load_recipe(None, ["text.context_length=16", "harvest.tokens_per_context=64"])


def test_retired_shuffle_buffer_is_refused_unless_at_its_old_default():
    """train.shuffle_buffer never did anything: setting it must not look like it does, while the
    recipes saved beside earlier runs (which carry the default) still load."""
    with pytest.raises(RecipeError, match=r"train.shuffle_buffer=4096 has no effect.*harvest.shuffle_window"):
        load_recipe(None, ["train.shuffle_buffer=4096"])
    saved = recipe_to_dict(load_recipe(None))
    assert saved["train"]["shuffle_buffer"] == 16
    assert recipe_from_dict(saved).train.shuffle_buffer == 16


@pytest.mark.parametrize("override, message", [
    ("train.adam_betas=[a,b]", r"wrong type for 'train.adam_betas\[0\]': got 'a', expected float"),
    ("train.resample_steps=[a]", r"wrong type for 'train.resample_steps\[0\]': got 'a', expected int"),
    ("sae.n_features={a: 1}", r"wrong type for 'sae.n_features': got \{'a': 1\}, expected int"),
])
def test_a_wrong_type_names_the_key_the_value_and_the_type_expected(override, message):
    """A list's element read "expected TrainConfig"; a mapping was shown as '{'."""
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override])


@pytest.mark.parametrize("override, message", [
    ("sae.n_features=0", r"sae.n_features=0: an SAE needs at least one feature"),
    ("train.batch_size=0", r"train.batch_size=0 must be at least 1"),
    ("train.n_tokens=-5", r"train.n_tokens=-5 must be at least 1"),
    ("train.num_workers=-1", r"train.num_workers=-1 must be at least 0"),
    ("train.lr=-1", r"train.lr=-1.0 must be a positive finite number"),
    ("train.lr=inf", r"train.lr=inf must be a positive finite number"),
    ("sae.l1_coefficient=nan", r"sae.l1_coefficient=nan must be a finite number \(weight of the L1"),
    ("train.bank=[{l1_coefficient: inf}]", r"train.bank\[0\].l1_coefficient=inf must be a finite number"),
    ("pretrain.steps=0", r"pretrain.steps=0 must be at least 1"),
    # positions counted from the end of the context, clipping silently off, a division by zero:
    ("harvest.skip_first_tokens=-3", r"harvest.skip_first_tokens=-3 must be at least 0"),
    ("train.grad_clip=-1", r"train.grad_clip=-1.0 must be at least 0 \(largest gradient norm; 0 = no clipping\)"),
    ("train.lr_warmup_steps=-1", r"train.lr_warmup_steps=-1 must be at least 0"),
    ("pretrain.val_every=0", r"pretrain.val_every=0 must be at least 1"),
    ("train.num_nodes=0", r"train.num_nodes=0 must be at least 1"),
    ("analyze.n_tokens=0", r"analyze.n_tokens=0 must be at least 1"),
    ("analyze.n_features=0", r"analyze.n_features=0 must be a positive count .* or -1 for every feature"),
    ("text.heldout_fraction=2", r"text.heldout_fraction=2.0 must lie in \[0, 1\)"),
])
def test_numbers_a_run_cannot_use_are_refused_when_the_recipe_loads(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override])


@pytest.mark.parametrize("word", ["off", "no", "false"])
def test_a_choice_that_yaml_reads_as_a_boolean_names_the_key_the_reading_and_the_choices(word, tmp_path):
    """Unquoted off/no/false reach a string field as "False"; "'False' is not one of" hid why."""
    message = (r"train.wandb.mode: YAML read the value as the boolean false .*not as one of the choices "
               r"'auto', 'online', 'offline', 'disabled'; use disabled \(train.wandb.mode=disabled\)")
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [f"train.wandb.mode={word}"])
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"train:\n  wandb:\n    mode: {word}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(recipe_file))
    with pytest.raises(RecipeError, match=r"sae.variant: YAML read the value as the boolean true .*'paper', .*"
                                          r"'gated'; set one of them"):
        load_recipe(None, ["sae.variant=yes"])


@pytest.mark.parametrize("word", ["off", "no", "true"])
def test_a_text_that_yaml_reads_as_a_boolean_is_refused_naming_the_key(word, tmp_path):
    """OmegaConf stores a boolean given to a text field as "False"/"True": a W&B project named
    False. Refused with the key and how to quote the word; quoted, the word is kept."""
    message = r"train.wandb.project: YAML read the value as the boolean .*quote the word you meant"
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [f"train.wandb.project={word}"])
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"train:\n  wandb:\n    project: {word}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(recipe_file))
    with pytest.raises(RecipeError, match=r"train.bank\[0\].name: YAML read the value as the boolean"):
        load_recipe(None, [f"train.bank=[{{variant: topk, name: {word}}}]"])
    assert load_recipe(None, [f"train.wandb.project='{word}'"]).train.wandb.project == word
    recipe_file.write_text(f"train:\n  wandb:\n    project: \"{word}\"\n")
    assert load_recipe(str(recipe_file)).train.wandb.project == word


def test_fewer_training_tokens_than_one_batch_are_refused_naming_both_values():
    """Training takes n_tokens // batch_size steps, at least one: fewer tokens than a batch
    would train one whole batch, not what was asked for."""
    with pytest.raises(RecipeError, match=r"train.n_tokens=1,000 is less than one batch \(train.batch_size=4,096\).*"
                                          r"train.n_tokens to at least 4096.*train.batch_size to at most 1000"):
        load_recipe(None, ["train.n_tokens=1000", "train.batch_size=4096"])
    assert load_recipe(None, ["train.n_tokens=4096", "train.batch_size=4096"]).train.n_tokens == 4096


@pytest.mark.parametrize("entry, message", [
    ("{variant: topkk}", r"train.bank\[1\].variant='topkk' is not one of .*did you mean 'topk'"),
    ("{init: dat}", r"train.bank\[1\].init='dat' is not one of"),
    ("{n_features: 0}", r"train.bank\[1\].n_features=0"),
])
def test_a_bank_entry_is_checked_like_the_sae_section(entry, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [f"train.bank=[{{}}, {entry}]"])


@pytest.mark.parametrize("override, message", [
    ("train.resample_sample_size=0", r"train.resample_sample_size=0 must be at least 1 \(rows drawn.*set "
                                     r"train.resample_sample_size to 1 or more"),
    ("train.log_every=0", r"train.log_every=0 must be at least 1 \(steps between logged metrics\)"),
    ("train.density_window=0", r"train.density_window=0 must be at least 1 \(steps over which feature density"),
    ("train.checkpoint_every=-1", r"train.checkpoint_every=-1 must be at least 0 \(.*0 = only at the end\)"),
    ("train.eval_every=-3", r"train.eval_every=-3 must be at least 0 \(.*held-out evaluations; 0 = only at the end\)"),
    ("train.dead_window=-2", r"train.dead_window=-2 must be at least 0 \(.*silent to count as dead"),
    ("train.epochs=0", r"train.epochs=0 must be at least 1"),
    ("harvest.tokens_per_context=0", r"harvest.tokens_per_context=0 must be at least 1"),
    ("harvest.rows_per_sample=0", r"harvest.rows_per_sample=0 must be at least 1"),
    ("harvest.rows_per_shard=-3", r"harvest.rows_per_shard=-3 must be at least 1"),
    ("eval.n_tokens=0", r"eval.n_tokens=0 must be at least 1"),
    ("eval.batch_size=0", r"eval.batch_size=0 must be at least 1"),
    ("eval.n_contexts=0", r"eval.n_contexts=0 must be at least 1"),
    ("sae.l1_coefficient=-0.1", r"sae.l1_coefficient=-0.1 must be at least 0 \(weight of the L1"),
    ("train.lr_decay_fraction=1.5", r"train.lr_decay_fraction=1.5 must lie in \[0, 1\]"),
    ("train.lr_decay_fraction=-0.1", r"train.lr_decay_fraction=-0.1 must lie in \[0, 1\]"),
    ("train.adam_betas=[0.9]", r"train.adam_betas=\[0.9\] must be two numbers in \[0, 1\).*train.adam_betas=\[0.9,0.999\]"),
    ("train.adam_betas=[0.9,1.0]", r"train.adam_betas=\[0.9, 1.0\] must be two numbers in \[0, 1\)"),
    ("train.adam_betas=[-0.1,0.9]", r"train.adam_betas=\[-0.1, 0.9\] must be two numbers"),
    ("text.context_length=32769", r"text.context_length \(32769\) exceeds 32768: activation shards store each "
                                  r"row's position as int16"),
    ("harvest.split=heldout", r"harvest.split=heldout with harvest.heldout_tokens > 0: the held-out store would "
                              r"repeat the first rows.*Set harvest.heldout_tokens=0"),
    ("train.strategy=deepspeed train.precision=16-mixed train.grad_clip=1",
     r"train.grad_clip with train.strategy=deepspeed and train.precision=16-mixed would clip gradients still "
     r"multiplied by the loss scale; use train.precision=bf16-mixed"),
    # checked when `sae harvest` planned its windows, after the recipe had loaded (and the LM too)
    ("harvest.rows_per_shard=1000", r"harvest.shuffle_window \(65536\) must be a multiple of harvest.rows_per_shard "
                                    r"\(1000\), which must be a multiple of harvest.tokens_per_context \(64\)"),
    ("harvest.rows_per_shard=65560", r"harvest.rows_per_shard \(65560\), which must be a multiple of "
                                     r"harvest.tokens_per_context \(64\)"),
])
def test_more_numbers_a_run_cannot_use_are_refused_naming_key_value_and_meaning(override, message):
    """Each of these was accepted and then crashed the run (a division by zero, an empty
    resampling draw) or silently did something else."""
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, override.split())


def test_the_edges_of_the_numbers_checked_are_accepted():
    recipe = load_recipe(None, ["train.checkpoint_every=0", "sae.l1_coefficient=0", "train.lr_decay_fraction=0",
                                "train.adam_betas=[0,0.5]", "sae.variant=topk", "sae.n_features=64", "sae.k=64",
                                "sae.aux_k=1000"])
    assert recipe.train.checkpoint_every == 0 and recipe.sae.k == 64
    assert load_recipe(None, ["train.lr_decay_fraction=1"]).train.lr_decay_fraction == 1
    assert load_recipe(None, ["harvest.split=heldout", "harvest.heldout_tokens=0"]).harvest.split == "heldout"
    assert load_recipe(None, ["text.context_length=32768"]).text.context_length == 32768


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
@pytest.mark.parametrize("setting, message", [
    ("k: 0", r"{where}.k=0 must be at least 1 \(features active per row\)"),
    ("k: 65", r"{where}.k=65 exceeds {where}.n_features=64: a {variant} SAE keeps the k largest.*"
              r"Set {where}.k to at most 64"),
    ("aux_k: 0", r"{where}.aux_k=0 must be at least 1 \(.*aux_k_coefficient=0\)"),
])
def test_a_topk_sparsity_a_run_cannot_use_is_refused_in_the_sae_section_and_in_bank_entries(variant, setting, message):
    key, _, value = setting.partition(": ")
    for where, overrides in [
        ("sae", [f"sae.variant={variant}", "sae.n_features=64", f"sae.{key}={value}"]),
        (r"train.bank\[1\]", [f"train.bank=[{{}}, {{variant: {variant}, n_features: 64, {setting}}}]"]),
    ]:
        with pytest.raises(RecipeError, match=message.format(where=where, variant=variant)):
            load_recipe(None, overrides)
    # the other variants ignore k and aux_k
    assert load_recipe(None, ["sae.variant=paper", f"sae.{key}=0"]).sae.variant == "paper"


def test_resample_steps_outside_the_run_are_refused_naming_them_and_the_run_length():
    """A listed step the run never reaches was skipped without a word: no resampling happened."""
    run = ["train.n_tokens=40960", "train.batch_size=4096"]  # 10 steps
    with pytest.raises(RecipeError, match=r"train.resample_steps lists \[0, 10, 11, 25\], outside the run: it trains "
                                          r"10 steps \(train.n_tokens=40,960 // train.batch_size=4,096\).*steps 1 to "
                                          r"9 \(after the last, the new features would be saved untrained"):
        load_recipe(None, [*run, "train.resample_steps=[25,5,0,11,10]"])
    assert load_recipe(None, [*run, "train.resample_steps=[1,9]"]).train.resample_steps == [1, 9]
    # with resampling off the list is never read
    assert load_recipe(None, [*run, "train.resample=false", "train.resample_steps=[25]"]).train.resample is False


def test_a_hook_point_listed_twice_is_refused():
    """Each listed hook is harvested: a repeat doubled the store on disk."""
    with pytest.raises(RecipeError, match=r"harvest.hook_points=\['a', 'b', 'a'\] names a more than once.*"
                                          r"harvest.hook_points=\[a,b\]"):
        load_recipe(None, ["harvest.hook_points=[a,b,a]"])


@pytest.mark.parametrize("base, shown", [("5", "5"), ("[a.yaml, 3]", r"\['a.yaml', 3\]"), ("{a: 1}", r"\{'a': 1\}")])
def test_a_base_that_is_not_a_file_name_is_refused_naming_it(base, shown, tmp_path):
    """`base: 5` gave "TypeError: 'int' object is not iterable"."""
    (tmp_path / "r.yaml").write_text(f"base: {base}\nname: child\n")
    with pytest.raises(RecipeError, match=rf"r.yaml: `base: {shown}` must name the recipe file this one extends"):
        load_recipe(tmp_path / "r.yaml")


def test_a_sweep_point_that_is_not_a_mapping_is_refused_when_the_recipe_loads():
    """sweep.points=[5] loaded, then the sweep failed with a TypeError."""
    with pytest.raises(RecipeError, match=r"sweep.points\[1\]=5 is not a mapping.*sweep.points=\[\{train.lr: 0.002\}\]"):
        load_recipe(None, ["sweep.points=[{train.lr: 0.002}, 5]"])
