"""train.cuda_graphs records the whole training step (framework/training/cuda_graphs.py). Recording
needs a GPU (tests/test_gpu_training.py replays it); what it records is plain PyTorch, checked
here on the CPU: the recorded step is the module's eager step, and the warm-up before recording
leaves the run as it was."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from framework.config import load_recipe
from framework.training.cuda_graphs import RecordedSteps, portable_optimizer_state, portable_scheduler_state
from framework.training.module import SAEModule

D_IN, BATCH = 48, 96


def _module(d_in: int = D_IN, n_features: int = 384, bank: bool = False, variant: str = "topk",
            target_l0: int = 0, **train) -> SAEModule:
    """A TopK (or paper) SAE, or with `bank` two of other sizes on the same batches; with
    `target_l0`, initialised from data to fire that often (the paper SAE's sparse codes)."""
    overrides = [f"sae.variant={variant}", "sae.k=8", "sae.aux_k=32", "sae.init=transpose",
                 "sae.dead_steps_threshold=6", "train.log_every=1000", *(f"train.{k}={v}" for k, v in train.items())]
    if bank:  # the entries set their sizes (an sae.n_features beside them would be refused: it reaches none)
        overrides.append(f"train.bank=[{{n_features: {n_features}}}, {{n_features: {2 * n_features}, k: 16}}]")
    else:
        overrides.append(f"sae.n_features={n_features}")
    recipe = load_recipe(None, overrides)
    hook = recipe.sae_configs()[0].hook_point
    torch.manual_seed(0)
    module = SAEModule(recipe, {hook: d_in}, {hook: 0.5})
    module.hook_points = [hook]
    if target_l0:
        sample = torch.cat([b[0] for b in _batches(4)]) * 0.5  # scaled as scaled_input does
        for sae in module.saes.values():
            sae.cfg.init, sae.cfg.init_target_l0 = "data", target_l0
            sae.initialize_from_data(sample)
    return module


def _optimizer(module: SAEModule, fused: bool | None = None):
    optimizer = torch.optim.Adam(module.saes.parameters(), lr=1e-2, fused=fused)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))


def _batches(n: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, D_IN, generator=g) * 2 + 0.5,) for _ in range(n)]


def _kill_latents(module: SAEModule) -> None:
    """A quarter of the latents silent for long: AuxK from the next step on (TopK)."""
    for name, sae in module.saes.items():
        if sae.variant != "topk":
            continue
        for counts in (sae.steps_since_fired, module.stats[name].steps_since_fired):
            counts[: counts.numel() // 4] = 10
        sae.silent_counts_changed()


def _eager_step(module: SAEModule, optimizer, schedule, batch, autocast=contextlib.nullcontext) -> torch.Tensor:
    """What Lightning's automatic optimization runs around the module's hooks (the training step
    under the precision's autocast, the rest outside)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        loss = module.training_step(batch, 0)
    loss.backward()
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    module._constrain_weights()
    schedule.step()
    return loss.detach()


def _recorded_step(steps: RecordedSteps, optimizer, schedule, batch) -> dict[str, torch.Tensor]:
    """What a replay does, run eagerly (the gradients start empty, as a recorded backward makes
    them): the bank's summed losses."""
    optimizer.zero_grad(set_to_none=True)
    with_auxk = tuple(sae.auxk_needed() for sae in steps.saes.values())
    outputs = steps.run_step(batch, with_auxk)
    schedule.step()
    return {key: sum(out.losses[key].detach() for _, out in outputs.values()) for key in ("loss", "auxk")
            if all(key in out.losses for _, out in outputs.values())}


@pytest.mark.parametrize("variant, bank, target_l0", [
    ("topk", False, 0), ("topk", True, 0), ("paper", False, 0), ("paper", False, 4)])
def test_the_recorded_step_is_the_modules_eager_step(variant, bank, target_l0):
    """Forward, firing statistics, gradient projection and clipping, Adam under an LR schedule,
    renormalisation: the same losses, weights, statistics and Adam state over 8 steps, with
    TopK latents going dead midway (AuxK picked the static way then: same math, other rounding);
    for one SAE and for a bank of two, whose losses add up; for the paper SAE, whose recorded
    forward is its dense path, whichever path the eager step takes."""
    eager = _module(grad_clip=0.05, bank=bank, variant=variant, target_l0=target_l0)
    assert len(eager.saes) == (2 if bank else 1)
    recorded = copy.deepcopy(eager)
    eager_opt, eager_schedule = _optimizer(eager)
    opt, schedule = _optimizer(recorded)
    steps = RecordedSteps(recorded.saes, opt, recorded.step_parts())
    for i, batch in enumerate(_batches(8)):
        if i == 4:
            _kill_latents(eager)
            _kill_latents(recorded)
        a = _eager_step(eager, eager_opt, eager_schedule, batch)
        b = _recorded_step(steps, opt, schedule, batch)
        torch.testing.assert_close(b["loss"], a, rtol=1e-5 if i < 4 else 1e-4, atol=1e-6, msg=f"step {i}")
        if variant == "topk":
            assert (b["auxk"] > 0) == (i >= 4)
        else:  # the eager step's path, chosen by the codes' density
            assert next(iter(eager.saes.values())).sparse_codes == (target_l0 > 0)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(recorded.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for p, q in zip(eager.saes.parameters(), recorded.saes.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[q][key], eager_opt.state[p][key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stepped_before, bank, dead", [(False, False, False), (True, False, False),
                                                        (True, True, True)])
def test_the_warm_up_before_recording_leaves_the_run_as_it_was(stepped_before, bank, dead):
    """Recording runs a few eager steps first; afterwards the weights, statistics, silent-step
    counts and Adam's state are as before, in place (a graph keeps their addresses), and Adam
    state the warm-up made is a fresh one's: the next steps equal those of a run never warmed up.
    Also for a bank of two warmed up with AuxK on (dead latents)."""
    batches = _batches(4)
    runs = []
    for _ in range(2):  # the run to warm up, and its twin
        module = _module(bank=bank)
        optimizer, schedule = _optimizer(module)
        steps = RecordedSteps(module.saes, optimizer, module.step_parts())
        if stepped_before:
            _recorded_step(steps, optimizer, schedule, batches[0])
        if dead:
            _kill_latents(module)
        runs.append((module, optimizer, schedule, steps))
    (module, optimizer, schedule, steps), (twin, twin_opt, twin_schedule, twin_steps) = runs

    before = {k: v.clone() for k, v in module.state_dict().items()}
    addresses = {k: v.data_ptr() for k, v in module.state_dict().items()}
    with_auxk = tuple(sae.auxk_needed() for sae in module.saes.values())
    assert all(with_auxk) == dead
    steps.warm_up(batches[1], with_auxk, contextlib.nullcontext)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]) and value.data_ptr() == addresses[key], key
    assert len(optimizer.state) == 4 * len(module.saes)  # made by the warm-up if not before
    if not stepped_before:
        assert all(not v.any() for state in optimizer.state.values() for v in state.values())

    for batch in batches[1:]:
        a = _recorded_step(steps, optimizer, schedule, batch)
        b = _recorded_step(twin_steps, twin_opt, twin_schedule, batch)
        assert torch.equal(a["loss"], b["loss"])
    for key, value in module.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key


def test_checkpoints_of_a_recorded_run_hold_plain_learning_rates():
    """A recorded step's Adam is capturable with tensor learning rates; its checkpoint copies say
    what an eager run's say, so the run resumes with or without graphs, and the live optimizer
    keeps its tensors."""
    from framework.training.cuda_graphs import prepare_optimizer

    module = _module()
    optimizer, schedule = _optimizer(module)
    prepare_optimizer(optimizer)
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and optimizer.param_groups[0]["capturable"]
    schedule.step()  # the schedule fills the tensor in place
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(5e-3)
    state, scheduler_state = optimizer.state_dict(), schedule.state_dict()
    portable_optimizer_state(state)
    portable_scheduler_state(scheduler_state)
    assert state["param_groups"][0]["lr"] == pytest.approx(5e-3) and not state["param_groups"][0]["capturable"]
    assert scheduler_state["_last_lr"] == [pytest.approx(5e-3)]
    assert type(state["param_groups"][0]["lr"]) is float and type(scheduler_state["_last_lr"][0]) is float
    assert optimizer.param_groups[0]["lr"] is lr and optimizer.param_groups[0]["capturable"]
