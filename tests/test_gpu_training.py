"""SAE training on CUDA: the fast paths against the plain path, and `sae train` in bf16.

Excluded from the default run by the `gpu` marker; run with `python -m pytest -m gpu` on a
machine with a GPU.
"""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from conftest import TINY_PRETRAIN

from framework.activations.harvest import harvest
from framework.config import SAEConfig, load_recipe
from framework.sae import build_sae
from framework.training.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("variant", ["paper", "topk", "batchtopk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_matches_the_plain_path_on_cuda(variant, dtype):
    torch.manual_seed(0)
    sae = build_sae(576, SAEConfig(variant=variant, n_features=4096, k=32, init="transpose")).cuda()
    x = torch.randn(1024, 576, device="cuda")
    sae.initialize_from_data(x)
    reference = copy.deepcopy(sae)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        fast_loss = sae(x).loss
        plain_loss = reference.forward_reference(x).loss
    fast_loss.backward()
    plain_loss.backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast_loss.float(), plain_loss.float(), rtol=tol, atol=tol)
    for (name, a), b in zip(sae.named_parameters(), reference.parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol * 10, atol=tol, msg=name)


def test_sae_train_runs_on_cuda_in_bf16_and_lowers_the_loss(pretrained_recipe, tmp_path):
    common = [*TINY_PRETRAIN, f"lm.path={pretrained_recipe.path('lm')}", f"workdir={tmp_path}",
              "lm.device=auto", "harvest.n_tokens=32768", "harvest.tokens_per_context=32",
              "harvest.shuffle_window=8192", "harvest.rows_per_shard=4096", "harvest.heldout_tokens=4096"]
    recipe = load_recipe(None, [*common, "sae.n_features=16384", "sae.init=data", "sae.init_target_l0=20",
                                "train.n_tokens=32768", "train.batch_size=2048", "train.precision=bf16-mixed",
                                "train.log_every=1", "train.resample=false"])
    harvest(recipe)
    out = train(recipe)
    name = recipe.sae_configs()[0].name
    assert json.loads((out / name / "metrics.json").read_text())["steps"] == 16
    rows = list(csv.DictReader(open(out / "logs" / "csv" / "metrics.csv")))
    mse = [float(r[f"{name}/mse"]) for r in rows if r.get(f"{name}/mse")]
    assert mse[-1] < 0.5 * mse[0]  # 16 steps at 16,384 features: far from converged, but learning
