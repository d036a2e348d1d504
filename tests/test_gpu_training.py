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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphed_topk_steps_match_eager_steps(dtype):
    """train.cuda_graphs' replayed forward and backward give the eager step's losses, firing
    counts and, after Adam, weights; latents go dead mid-run, so both AuxK graphs are recorded."""
    from framework.sae.kernels import normalize_rows_, remove_parallel_component_
    from framework.training.cuda_graphs import GraphedSAE

    torch.manual_seed(0)
    cfg = SAEConfig(variant="topk", n_features=4096, k=32, init="transpose", dead_steps_threshold=3)
    eager = build_sae(576, cfg).cuda()
    data = [torch.randn(1024, 576, device="cuda") for _ in range(3)]
    eager.initialize_from_data(torch.cat(data))
    graphed_sae = copy.deepcopy(eager)
    graphed = GraphedSAE(graphed_sae)
    runs = []
    for sae, call in ((eager, lambda x: eager(x)), (graphed_sae, graphed)):
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
        losses, counts = [], []
        for step in range(8):
            if step == 4:  # a quarter of the latents silent for long enough: AuxK from here on
                sae.steps_since_fired[:1024] = 10
                sae.silent_counts_changed()
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                out = call(data[step % 3])
            out.loss.backward()
            remove_parallel_component_(sae.W_dec.grad, sae.W_dec)
            optimizer.step()
            normalize_rows_(sae.W_dec)
            optimizer.zero_grad(set_to_none=True)
            losses.append(torch.stack([out.losses[k].float() for k in ("loss", "mse", "auxk")]).cpu())
            counts.append(out.fire_counts().cpu())
        runs.append((losses, counts))
    assert len(graphed._recorded) == 2 and runs[0][0][4][2] > 0  # with and without AuxK
    # Until step 4 both run the same kernels (float atomics may order sums differently). From
    # there eager AuxK takes dense products over the dead columns (in bf16 under autocast) where
    # the recorded one reuses the encoder GEMM's values: same math, other rounding.
    for step, ((a, ca), (b, cb)) in enumerate(zip(zip(*runs[0]), zip(*runs[1]))):
        rtol = 1e-5 if step < 4 else (1e-4 if dtype == torch.float32 else 2e-2)
        torch.testing.assert_close(b, a, rtol=rtol, atol=1e-6, msg=f"step {step}")
        assert (ca - cb).abs().sum() <= 0.01 * ca.sum(), f"step {step}"  # a near tie may break apart
    for (name, a), b in zip(eager.named_parameters(), graphed_sae.parameters()):
        error = ((b - a).norm() / a.norm()).item()
        assert error < (1e-4 if dtype == torch.float32 else 5e-3), f"{name}: relative difference {error:.3g}"


def test_sae_train_with_cuda_graphs_matches_the_eager_run(pretrained_recipe, tmp_path):
    common = [*TINY_PRETRAIN, f"lm.path={pretrained_recipe.path('lm')}", f"workdir={tmp_path}",
              "lm.device=auto", "harvest.n_tokens=32768", "harvest.tokens_per_context=32",
              "harvest.shuffle_window=8192", "harvest.rows_per_shard=4096", "harvest.heldout_tokens=4096",
              "sae.variant=topk", "sae.n_features=4096", "sae.k=16", "sae.dead_steps_threshold=4",
              "train.n_tokens=32768", "train.batch_size=2048", "train.precision=bf16-mixed",
              "train.log_every=1"]
    harvest(load_recipe(None, common))
    results = {}
    for graphs in (False, True):
        recipe = load_recipe(None, [*common, f"train.output_dir={tmp_path}/sae-{graphs}",
                                    f"train.cuda_graphs={str(graphs).lower()}"])
        out = train(recipe)
        name = recipe.sae_configs()[0].name
        results[graphs] = json.loads((out / name / "metrics.json").read_text())
    for key in ("mse", "fvu", "l0"):
        a, b = results[False][key], results[True][key]
        assert abs(a - b) <= 0.02 * abs(a) + 1e-6, (key, a, b)


def test_a_recorded_step_owns_its_memory_whatever_runs_eagerly_in_between():
    """An eager forward of another dtype between replays (the held-out evaluation in float32
    while training runs in bf16) leaves the recorded graphs' results and others' memory alone:
    the graphs own their pre-activation buffer instead of sharing the eager path's."""
    from framework.training.cuda_graphs import GraphedSAE

    torch.manual_seed(0)
    sae = build_sae(576, SAEConfig(variant="topk", n_features=4096, k=32, init="transpose")).cuda()
    x = torch.randn(1024, 576, device="cuda")
    sae.initialize_from_data(x)
    graphed = GraphedSAE(sae)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        first = graphed(x).loss.item()
    with torch.no_grad():  # eager, training mode, float32: the workspace's buffers change dtype
        sae(torch.randn(2048, 576, device="cuda"))
    torch.cuda.empty_cache()
    sentinels = [torch.full((1024, 4096), 7.0, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        again = graphed(x).loss.item()
    assert again == first
    assert all(bool((s == 7.0).all()) for s in sentinels)
