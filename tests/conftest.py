"""Shared fixtures. Tests run offline: the HF hub is never contacted, W&B never goes online."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Read by huggingface_hub and wandb at import time, so set before any test imports them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402

from framework.config import Recipe, load_recipe  # noqa: E402

# A built-in LM small enough to pretrain in ~15 s on two cores, and still beat the unigram.
TINY_PRETRAIN = [
    "text.max_documents=200",
    "text.context_length=64",
    "harvest.tokens_per_context=32",
    "lm.builtin.vocab_size=1024",
    "lm.device=cpu",
    "pretrain.steps=250",
    "pretrain.batch_size=16",
    "pretrain.warmup_steps=20",
    "pretrain.val_every=125",
    "pretrain.val_batches=8",
    "train.wandb.mode=disabled",
]


def inject(patch, callback) -> None:
    """Add a Lightning callback to the Trainer that `sae train` builds (fault injection, nothing
    mocked); `patch` is pytest's monkeypatch or one of its contexts."""
    import framework.training.train as train_stage

    original = train_stage.build_trainer

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.callbacks.insert(0, callback)
        return trainer

    patch.setattr(train_stage, "build_trainer", build)


@pytest.fixture(scope="session", autouse=True)
def sae_cache_dir(tmp_path_factory):
    """The tests' own SAE_CACHE_DIR (SmolLM2's dequantised copy, ~540 MB): the first SmolLM2 load
    of the session reads the GGUF and writes the copy there, later ones (and `sae` subprocesses)
    read it; removed at the end rather than left in the user's cache or pytest's kept temp dirs."""
    directory = tmp_path_factory.mktemp("sae-cache")
    before = os.environ.get("SAE_CACHE_DIR")
    os.environ["SAE_CACHE_DIR"] = str(directory)
    yield directory
    if before is None:
        os.environ.pop("SAE_CACHE_DIR")
    else:
        os.environ["SAE_CACHE_DIR"] = before
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def pretrained_recipe(tmp_path_factory) -> Recipe:
    """A recipe whose built-in LM `sae pretrain` has trained (once per test session)."""
    from framework.lm.pretrain import pretrain

    recipe = load_recipe(None, [f"workdir={tmp_path_factory.mktemp('pretrained')}", *TINY_PRETRAIN])
    pretrain(recipe)
    return recipe


def copy_lm_with_other_weights(lm_dir: Path, to: Path) -> Path:
    """A copy of a pretrained built-in LM directory with one weight changed: a different LM that
    every recipe key (lm.path aside) still describes."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(lm_dir, to, ignore=shutil.ignore_patterns("checkpoints"))
    tensors = load_file(str(to / "model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] += 0.01
    save_file(tensors, str(to / "model.safetensors"))
    return to
