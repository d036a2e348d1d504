"""`sae pretrain`: a real Lightning run that beats the unigram baseline and writes a loadable LM."""

from __future__ import annotations

import csv
import itertools
import json
import shutil

import pytest
import torch

from framework.config import load_recipe, with_overrides
from framework.errors import DataError, RecipeError
from framework.lm import BuiltinLM, load_lm
from framework.lm.baselines import bigram_loss, unigram_loss
from framework.lm.pretrain import pretrain
from framework.text import load_contexts


def test_pretraining_lowers_heldout_loss_below_the_unigram_baseline(pretrained_recipe):
    metrics = json.loads((pretrained_recipe.path("lm") / "metrics.json").read_text())
    assert metrics["heldout_loss"] < metrics["unigram_heldout_loss"] - 0.5
    assert metrics["bigram_heldout_loss"] < metrics["unigram_heldout_loss"]
    assert metrics["steps"] == 250 and metrics["heldout_tokens"] > 1000


def test_pretrain_writes_every_artifact_and_marks_the_directory_complete(pretrained_recipe):
    out = pretrained_recipe.path("lm")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "recipe.yaml", "metrics.json",
                 "report.md", "COMPLETE", "checkpoints/last.ckpt"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*tmp"))
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 2 and val[-1] < val[0]  # validated every 125 of 250 steps, improving


def test_pretrain_skips_a_complete_directory(pretrained_recipe):
    weights = pretrained_recipe.path("lm") / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert pretrain(pretrained_recipe) == pretrained_recipe.path("lm")
    assert weights.stat().st_mtime_ns == before


@torch.no_grad()
def test_load_lm_reads_the_pretrained_builtin_model(pretrained_recipe):
    lm = load_lm(pretrained_recipe)
    assert isinstance(lm, BuiltinLM) and not lm.training
    assert lm.tokenizer.vocab_size == 1024 and lm.tokenizer.eos_id is not None
    assert lm.identity["name"] == "builtin" and len(lm.identity["weights_sha256"]) == 64
    heldout = load_contexts(pretrained_recipe.text, lm.tokenizer, "heldout", stop=16)
    metrics = json.loads((pretrained_recipe.path("lm") / "metrics.json").read_text())
    assert lm.next_token_loss(heldout).item() < metrics["unigram_heldout_loss"]


def test_a_builtin_lm_of_another_shape_than_the_recipes_is_refused_naming_both(pretrained_recipe, tmp_path):
    """lm.path at another recipe's LM (or a config.json edited by hand, which the weights hash
    leaves out): every output would record the recipe's shape for rows of another model."""
    other = with_overrides(pretrained_recipe, ["lm.builtin.n_heads=8", f"lm.path={pretrained_recipe.path('lm')}"])
    with pytest.raises(RecipeError, match=r"not the shape this recipe's lm.builtin describes \(n_heads: 4 there, "
                                          r"8 here; from its config.json\)"):
        load_lm(other)
    edited = tmp_path / "lm"
    shutil.copytree(pretrained_recipe.path("lm"), edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(config | {"n_heads": 2}))
    with pytest.raises(RecipeError, match=r"n_heads: 2 there, 4 here"):
        load_lm(with_overrides(pretrained_recipe, [f"lm.path={edited}"]))


def test_a_builtin_lm_pretrained_on_another_split_of_the_corpus_is_refused_and_another_corpus_is_not(
        pretrained_recipe, tmp_path):
    """`sae harvest RECIPE text.seed=5` (or another heldout_fraction) loaded the LM as it was:
    the held-out store, eval and dashboards then held documents the LM and its tokenizer trained on."""
    lm = f"lm.path={pretrained_recipe.path('lm')}"
    for key, value in (("seed", 5), ("heldout_fraction", 0.5)):
        with pytest.raises(RecipeError, match=rf"pretrained on another split of this recipe's corpus \(text.{key}: "
                                              rf".* there, {value} here\).*not be held out"):
            load_lm(with_overrides(pretrained_recipe, [lm, f"text.{key}={value}"]))
    (tmp_path / "doc.txt").write_text("another corpus " * 200)
    other = with_overrides(pretrained_recipe, [lm, f"text.source={tmp_path}", "text.seed=5"])
    assert load_lm(other).name == "builtin"  # another experiment, not a leak


def test_a_stage_run_by_another_python_than_pretraining_is_warned(pretrained_recipe, monkeypatch, caplog):
    """text.source=stdlib is the running Python's standard library (734 files on one 3.11, 638 on
    Debian's): the LM records which it was pretrained on, and a stage run by another Python (the
    Docker image's, not the host's) says so."""
    import logging

    import framework.text
    from framework.text import stdlib_identity

    marker = json.loads((pretrained_recipe.path("lm") / "COMPLETE").read_text())
    assert marker["corpus"] == stdlib_identity() and marker["corpus"]["files"] > 100
    with caplog.at_level(logging.WARNING, logger="framework.lm"):
        load_lm(pretrained_recipe)
        assert "standard library" not in caplog.text
        monkeypatch.setattr(framework.text, "stdlib_identity", lambda: {"python": "3.0.1", "files": 5, "sha256": "0"})
        load_lm(pretrained_recipe)
    assert f"pretrained on the standard library of Python {marker['corpus']['python']}" in caplog.text
    assert "this process reads that of Python 3.0.1 (5 files)" in caplog.text


def test_pretrain_of_a_ready_made_lm_does_nothing_and_says_so(tmp_path):
    # The text matches no file: pretraining anything would fail on it at once.
    recipe = load_recipe(None, [f"workdir={tmp_path}", "lm.name=smollm2", f"text.source={tmp_path}/none/*.txt"])
    result = pretrain(recipe)
    assert "nothing to pretrain: lm.name='smollm2' is loaded ready-made" in result
    assert list(tmp_path.iterdir()) == []  # no built-in LM trained into {workdir}/lm


def test_a_text_source_that_is_not_there_is_named_before_pretrain_writes_anything(tmp_path):
    from framework.text import TextSourceError

    recipe = load_recipe(None, [f"workdir={tmp_path}", f"text.source={tmp_path}/none/*.txt"])
    with pytest.raises(TextSourceError, match="matches no .txt/.jsonl/.parquet files"):
        pretrain(recipe)
    assert not recipe.path("lm").exists()  # it held a started-marker and nothing else
    (tmp_path / "blank.jsonl").write_text("\n\n")  # there, but no document in it
    recipe = load_recipe(None, [f"workdir={tmp_path}", f"text.source={tmp_path}/blank.jsonl"])
    with pytest.raises(TextSourceError, match="holds no documents: nothing to pretrain on"):
        pretrain(recipe)
    assert not recipe.path("lm").exists()


def test_loading_the_builtin_lm_before_pretraining_says_to_run_sae_pretrain(tmp_path):
    recipe = load_recipe(None, [f"workdir={tmp_path}"])
    with pytest.raises(DataError, match="no pretrained built-in LM.*sae pretrain RECIPE"):
        load_lm(recipe)


def test_baselines_score_a_perfectly_predictable_sequence_better_as_bigram():
    train = torch.tensor([0, 1, 2, 3] * 500)
    heldout = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    assert unigram_loss(train, heldout, vocab_size=4) == pytest.approx(torch.tensor(4.0).log().item(), abs=1e-3)
    assert bigram_loss(train, heldout, vocab_size=4) < 0.05


def test_an_interrupted_pretrain_resumes_from_its_checkpoint(tmp_path, monkeypatch, caplog):
    import framework.lm.pretrain as stage

    recipe = load_recipe(None, [
        f"workdir={tmp_path}", "text.max_documents=40", "text.heldout_fraction=0.2", "text.context_length=32",
        "harvest.tokens_per_context=16", "lm.builtin.vocab_size=300", "lm.device=cpu", "pretrain.steps=20",
        "pretrain.batch_size=8", "pretrain.warmup_steps=5", "pretrain.val_every=10", "pretrain.val_batches=2",
        "train.wandb.mode=disabled",
    ])

    def crash(*args, **kwargs):
        raise RuntimeError("killed after training, before the model was written")

    monkeypatch.setattr(stage, "_metrics", crash)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(recipe)
    out = recipe.path("lm")
    assert not (out / "COMPLETE").exists() and (out / "checkpoints" / "last.ckpt").is_file()
    monkeypatch.undo()

    with caplog.at_level("INFO", logger="framework.lm.pretrain"):
        pretrain(recipe)
    assert "resuming" in caplog.text and (out / "COMPLETE").is_file()
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 20
    assert torch.equal(load_lm(recipe).embed.weight, checkpoint["state_dict"]["model.embed.weight"])


TINY = [
    "text.max_documents=40", "text.heldout_fraction=0.2", "text.context_length=32", "harvest.tokens_per_context=16",
    "lm.builtin.vocab_size=300", "lm.device=cpu", "pretrain.steps=20", "pretrain.batch_size=8",
    "pretrain.warmup_steps=5", "pretrain.val_every=10", "pretrain.val_batches=2", "train.wandb.mode=disabled",
]


def interrupt_at(monkeypatch, step: int) -> None:
    """Make the next `pretrain` die as a killed run would, just before training step `step`
    (after the checkpoints of the steps before it)."""
    import framework.lm.pretrain as stage

    class Killed(stage.LogProgress):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == step:
                raise RuntimeError(f"killed before step {step}")

    monkeypatch.setattr(stage, "LogProgress", Killed)


def test_an_interrupted_pretrain_of_another_recipe_is_refused_not_deleted(tmp_path, monkeypatch, caplog):
    from framework.errors import CheckpointError

    recipe = load_recipe(None, [f"workdir={tmp_path}", *TINY])
    interrupt_at(monkeypatch, 15)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(recipe)
    monkeypatch.undo()
    last = recipe.path("lm") / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    assert torch.load(last, weights_only=False)["global_step"] == 10

    other = load_recipe(None, [f"workdir={tmp_path}", *TINY, "pretrain.lr=1e-3"])
    with pytest.raises(CheckpointError, match=r"different recipe \(pretrain\.lr: 0\.003 there, 0\.001 here\)"
                                              r".*settings it was started with.*delete .*checkpoints"):
        pretrain(other)
    assert last.read_bytes() == saved and not (recipe.path("lm") / "COMPLETE").exists()

    with caplog.at_level("INFO", logger="framework.lm.pretrain"):
        pretrain(recipe)  # the original settings resume it
    assert "resuming" in caplog.text and (recipe.path("lm") / "COMPLETE").is_file()


@pytest.mark.parametrize(("every", "killed_at"), [(7, 12), (5, 13)])  # resumed mid-epoch; at an epoch's end
def test_a_resumed_pretrain_trains_the_same_lm_as_an_uninterrupted_one(tmp_path, monkeypatch, recwarn, every,
                                                                       killed_at):
    """Five batches an epoch (43 training contexts, batches of 8), 18 steps, a checkpoint every
    `every` steps, killed at `killed_at`: the resumed run skips the batches its epoch trained on
    before the checkpoint and draws the later epochs' orders as the whole run does, so the two
    LMs are bit for bit the same (a DataLoader replays the epoch from its start instead)."""
    from safetensors.torch import load_file

    import framework.lm.pretrain as stage

    contexts = stage._contexts

    def few_contexts(recipe, tokenizer):
        train, heldout = contexts(recipe, tokenizer)
        return train[:43], heldout

    monkeypatch.setattr(stage, "_contexts", few_contexts)
    settings = [*TINY, "pretrain.steps=18", f"pretrain.val_every={every}"]
    whole = load_recipe(None, [f"workdir={tmp_path / 'whole'}", *settings])
    pretrain(whole)
    resumed = load_recipe(None, [f"workdir={tmp_path / 'resumed'}", *settings])
    with monkeypatch.context() as patch:
        interrupt_at(patch, killed_at)
        with pytest.raises(RuntimeError, match="killed"):
            pretrain(resumed)
    recwarn.clear()
    pretrain(resumed)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]
    expected = load_file(str(whole.path("lm") / "model.safetensors"))
    got = load_file(str(resumed.path("lm") / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_the_batch_order_is_the_shuffling_dataloaders_and_starts_at_any_step():
    """Each epoch the order DataLoader(shuffle=True, drop_last=True, generator seeded) gives as
    Lightning reads it, which pretraining used before (so its results stay reproducible); started at step k it gives the
    batches from the k-th on, whichever epoch k falls in."""
    from torch.utils.data import DataLoader

    from framework.lm.pretrain import BatchOrder

    loader = DataLoader(torch.arange(43), 8, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(7))
    # Lightning takes len(loader) batches an epoch; running the iterator out would draw once more.
    expected = [batch.tolist() for _ in range(4) for batch in itertools.islice(loader, len(loader))]
    order = BatchOrder(43, 8, seed=7)
    assert len(order) == 5 and [batch for _ in range(4) for batch in order] == expected
    for start in (0, 3, 5, 12):
        order = BatchOrder(43, 8, seed=7)
        order.start = start
        assert [batch for _ in range(4) for batch in order][: 20 - start] == expected[start:20]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_loss_is_cross_entropy_with_its_gradient(dtype):
    """The in-place loss gives F.cross_entropy's value and gradient, ignored targets included,
    for logits that come out of a model and reach it through a view, as in PretrainModule.loss."""
    from torch.nn import functional as F

    from framework.lm.pretrain import IGNORED, next_token_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 24, 16, generator=g)
    unembed = (torch.randn(300, 16, generator=g) * 3).requires_grad_()  # peaked: large logits
    targets = torch.randint(0, 300, (4, 24), generator=g)
    targets[:, -1] = IGNORED
    targets[2] = IGNORED  # a whole context without targets

    def loss_and_grad(loss_fn):
        logits = (hidden @ unembed.T).to(dtype)  # (batch, seq, vocab)
        loss = loss_fn(logits.flatten(0, 1), targets.flatten())
        (grad,) = torch.autograd.grad(loss, unembed)
        return loss, grad

    expected, expected_grad = loss_and_grad(lambda x, t: F.cross_entropy(x.float(), t, ignore_index=IGNORED))
    loss, grad = loss_and_grad(next_token_loss)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert loss.dtype == torch.float32


def test_next_token_loss_of_only_ignored_targets_is_zero_with_zero_gradient():
    from framework.lm.pretrain import IGNORED, next_token_loss

    logits = torch.randn(5, 7, requires_grad=True)
    loss = next_token_loss(logits * 1, torch.full((5,), IGNORED))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros(5, 7))


def test_on_a_terminal_pretraining_shows_the_time_throttled_progress_bar(tmp_path, monkeypatch):
    """Lightning's own bar redraws after every step; `sae pretrain` uses the throttled one."""
    import sys

    from framework.training.callbacks import ProgressBar

    class Terminal:
        def __init__(self, stream):
            self.stream = stream

        def isatty(self):
            return True

        def __getattr__(self, name):
            return getattr(self.stream, name)

    bars = []
    ends = ProgressBar.on_train_end
    monkeypatch.setattr(ProgressBar, "on_train_end", lambda self, *a: (bars.append(self), ends(self, *a)))
    monkeypatch.setattr(sys, "stderr", Terminal(sys.stderr))
    recipe = load_recipe(None, [
        f"workdir={tmp_path}", "text.max_documents=40", "text.heldout_fraction=0.2", "text.context_length=32",
        "harvest.tokens_per_context=16", "lm.builtin.vocab_size=300", "lm.device=cpu", "pretrain.steps=6",
        "pretrain.batch_size=8", "pretrain.warmup_steps=2", "pretrain.val_every=3", "pretrain.val_batches=1",
        "train.wandb.mode=disabled",
    ])
    pretrain(recipe)
    assert len(bars) == 1 and bars[0].trainer.global_step == 6
