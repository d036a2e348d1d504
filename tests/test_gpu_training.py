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


@pytest.mark.parametrize("variant", ["paper", "topk"])  # (BatchTopK's selection needs its candidates' count)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_on_cuda_never_waits_for_the_gpu(variant, dtype):
    # Forward, backward, the decoder constraint and fused Adam queue kernels without reading any
    # value back (the paper SAE's next path is read at the next forward, from a copy made
    # without blocking): torch raises on every synchronising call in this mode.
    torch.manual_seed(0)
    sae = build_sae(576, SAEConfig(variant=variant, n_features=4096, k=32, init="transpose")).cuda()
    x = torch.randn(1024, 576, device="cuda")
    sae.initialize_from_data(x)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = sae(x).loss
        loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first forward looks at its codes before choosing a path
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if variant == "paper":
        assert sae.sparse_codes is False  # half the features fire: the dense path, read back afterwards


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


@pytest.mark.parametrize("variant", ["topk", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recorded_whole_steps_match_the_modules_eager_steps(dtype, variant):
    """train.cuda_graphs replays the whole step (forward, statistics, backward, gradient projection
    and clipping, Adam at the scheduled rate, renormalisation): the eager step's losses, weights
    and Adam state over 8 steps; TopK latents go dead mid-run, so both AuxK graphs are recorded."""
    from test_recorded_step import _eager_step, _kill_latents, _module, _optimizer

    from framework.training.cuda_graphs import RecordedSteps

    eager = _module(d_in=576, n_features=4096, grad_clip=0.05, variant=variant).cuda()
    recorded = copy.deepcopy(eager)
    (eager_opt, eager_schedule), (opt, schedule) = _optimizer(eager, fused=True), _optimizer(recorded, fused=True)
    steps = RecordedSteps(recorded.saes, opt, recorded.step_parts())
    g = torch.Generator(device="cuda").manual_seed(0)
    data = [torch.randn(1024, 576, device="cuda", generator=g) for _ in range(3)]

    def autocast():
        return torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)

    for step in range(8):
        if step == 4:  # a quarter of the latents silent for long enough: AuxK from here on
            _kill_latents(eager)
            _kill_latents(recorded)
        batch = (data[step % 3],)
        a = _eager_step(eager, eager_opt, eager_schedule, batch, autocast)
        with autocast():
            (_, out), = steps(batch).values()
        schedule.step()
        if variant == "topk":
            assert (out.losses["auxk"] > 0).item() == (step >= 4)
        # Until step 4 both run the same kernels (float atomics may order sums differently). From
        # there eager AuxK takes dense products over the dead columns (in bf16 under autocast)
        # where the recorded one reuses the encoder GEMM's values: same math, other rounding.
        # The paper SAE's eager step may take its sparse path: the same math again.
        rtol = 1e-5 if step < 4 and variant == "topk" else (1e-4 if dtype == torch.float32 else 2e-2)
        torch.testing.assert_close(out.loss, a, rtol=rtol, atol=1e-6, msg=f"step {step}")
    assert len(steps._recorded) == (2 if variant == "topk" else 1)  # with and without AuxK
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(eager_opt.param_groups[0]["lr"])
    for (name, a), b in zip(eager.named_parameters(), recorded.parameters()):
        error = ((b - a).norm() / a.norm()).item()
        assert error < (1e-4 if dtype == torch.float32 else 5e-3), f"{name}: relative difference {error:.3g}"
    # the statistics (fires, silent-step counts): a near tie in the top k may break apart, in
    # bf16 above all, and a revived latent's count then differs by up to the steps since
    for (name, a), b in zip(eager.named_buffers(), recorded.buffers()):
        error = ((b - a).abs().sum() / a.abs().sum().clamp_min(1)).item()
        assert error <= (0.01 if dtype == torch.float32 else 0.1), f"{name}: relative difference {error:.3g}"
    for p, q in zip(eager.saes.parameters(), recorded.saes.parameters()):
        for key in ("exp_avg_sq", "step"):
            error = ((opt.state[q][key] - eager_opt.state[p][key]).norm() / eager_opt.state[p][key].norm()).item()
            assert error < (1e-3 if dtype == torch.float32 else 2e-2), f"Adam {key}: relative difference {error:.3g}"


@pytest.mark.parametrize("variant", ["topk", "paper"])
def test_sae_train_with_cuda_graphs_matches_the_eager_run(pretrained_recipe, tmp_path, variant):
    """A whole `sae train` run with graphs against the run without; for the paper SAE with a
    resampling pass at step 8 (it writes weights and Adam's moments in place, between replays)."""
    common = [*TINY_PRETRAIN, f"lm.path={pretrained_recipe.path('lm')}", f"workdir={tmp_path}",
              "lm.device=auto", "harvest.n_tokens=32768", "harvest.tokens_per_context=32",
              "harvest.shuffle_window=8192", "harvest.rows_per_shard=4096", "harvest.heldout_tokens=4096",
              f"sae.variant={variant}", "sae.n_features=4096", "sae.k=16", "sae.dead_steps_threshold=4",
              "train.resample_steps=[8]", "train.dead_window=4",
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
    # the paper SAE's resampling draws new features from the inputs its dead ones pick: a near
    # tie in which features count as dead moves every draw after it
    tolerance = 0.02 if variant == "topk" else 0.05
    for key in ("mse", "fvu", "l0"):
        a, b = results[False][key], results[True][key]
        assert abs(a - b) <= tolerance * abs(a) + 1e-6, (key, a, b)


def test_a_recorded_step_owns_its_memory_whatever_runs_eagerly_in_between():
    """An eager forward of another dtype between replays (the held-out evaluation in float32
    while training runs in bf16) leaves the recorded graph's results and others' memory alone:
    the graph owns its buffers. Against a twin run that replays without anything in between."""
    from test_recorded_step import _module, _optimizer

    from framework.training.cuda_graphs import RecordedSteps

    x = torch.randn(1024, 576, device="cuda")
    losses, sentinels = [], []
    for disturbed in (False, True):
        module = _module(d_in=576, n_features=4096).cuda()
        optimizer, _ = _optimizer(module, fused=True)
        steps = RecordedSteps(module.saes, optimizer, module.step_parts())
        sae = next(iter(module.saes.values()))
        run = []
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                run.append(next(iter(steps((x,)).values()))[1].loss.item())
            if disturbed:
                with torch.no_grad():  # eager, training mode, float32: the workspace's buffers change dtype
                    sae(torch.randn(2048, 576, device="cuda"))
                torch.cuda.empty_cache()
                sentinels += [torch.full((1024, 4096), 7.0, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        losses.append(run)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    assert all(bool((s == 7.0).all()) for s in sentinels)


def test_a_recorded_run_resumes_with_or_without_graphs(pretrained_recipe, tmp_path, monkeypatch):
    """Interrupted after a checkpoint, a run with train.cuda_graphs resumes to the uninterrupted
    run's weights, with graphs or without (the checkpoint holds what an eager run's holds)."""
    from conftest import inject
    from test_training import CrashAt, weights

    common = [*TINY_PRETRAIN, f"lm.path={pretrained_recipe.path('lm')}", f"workdir={tmp_path}",
              "lm.device=auto", "harvest.n_tokens=32768", "harvest.tokens_per_context=32",
              "harvest.shuffle_window=8192", "harvest.rows_per_shard=4096", "harvest.heldout_tokens=4096",
              "sae.variant=topk", "sae.n_features=4096", "sae.k=16", "train.n_tokens=32768",
              "train.batch_size=2048", "train.checkpoint_every=6", "train.precision=bf16-mixed"]
    harvest(load_recipe(None, common))
    name = load_recipe(None, common).sae_configs()[0].name
    whole = load_recipe(None, [*common, f"train.output_dir={tmp_path}/whole", "train.cuda_graphs=true"])
    expected = weights(train(whole), name)
    for resumed_with in ("true", "false"):
        out = f"train.output_dir={tmp_path}/broken-{resumed_with}"
        with monkeypatch.context() as patch:
            inject(patch, CrashAt(8))
            with pytest.raises(RuntimeError, match="injected crash"):
                train(load_recipe(None, [*common, out, "train.cuda_graphs=true"]))
        got = weights(train(load_recipe(None, [*common, out, f"train.cuda_graphs={resumed_with}"])), name)
        for key, value in expected.items():  # float atomics: not bit for bit
            error = ((got[key] - value).norm() / value.norm()).item()
            assert error < 1e-2, f"resumed with cuda_graphs={resumed_with}: {key} differs by {error:.3g}"
