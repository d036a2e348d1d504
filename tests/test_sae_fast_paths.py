"""The fast paths (kernels.py) compute the reference math: same losses, same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from framework.config import SAEConfig
from framework.sae import build_sae
from framework.sae.kernels import (
    ActivePattern,
    Workspace,
    _spmm_into_columns,
    _transposed_mm,
    column_sums,
    dense_fire_counts,
    mask_where_inactive_,
    order_keys,
    relu_,
    row_topk_indices,
)
from framework.sae.paper import density_threshold

D_IN, N_FEATURES, BATCH = 48, 384, 96


def _data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, D_IN, generator=g) * 2 + 0.5


def _sae(variant: str, target_l0: float = 0.0, **overrides):
    cfg = SAEConfig(**{"variant": variant, "n_features": N_FEATURES, "k": 12, "init": "data",
                       "init_target_l0": target_l0, "l1_coefficient": 3e-2, **overrides})  # fmt: skip
    sae = build_sae(D_IN, cfg)
    sae.initialize_from_data(torch.cat([_data(1 + 10 * i) for i in range(N_FEATURES // BATCH)]))  # a row per feature
    with torch.no_grad():  # break the W_enc = W_decᵀ symmetry so a transpose bug cannot hide
        sae.W_enc.add_(0.05 * torch.randn(sae.W_enc.shape, generator=torch.Generator().manual_seed(2)))
        if variant in ("topk", "batchtopk"):
            # Data init leaves b_enc at zero, where a path that ignored it would pass; a trained
            # SAE's biases move the selection.
            pre_spread = ((_data() - sae.b_dec) @ sae.W_enc).std()
            sae.b_enc.copy_(pre_spread * torch.randn(sae.b_enc.shape, generator=torch.Generator().manual_seed(3)))
    return sae


def _step(sae, forward, x, precision: str):
    sae.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = forward(x)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    return out, grads


def _compare(fast_sae, ref_sae, x, precision: str, x_needs_grad: bool = False):
    x_fast, x_ref = x.clone().requires_grad_(x_needs_grad), x.clone().requires_grad_(x_needs_grad)
    fast, fast_grads = _step(fast_sae, fast_sae.forward, x_fast, precision)
    ref, ref_grads = _step(ref_sae, ref_sae.forward_reference, x_ref, precision)
    if x_needs_grad:
        fast_grads["x"], ref_grads["x"] = x_fast.grad, x_ref.grad
    assert fast_grads.keys() == ref_grads.keys()
    if precision == "fp32":
        for key in ref.losses:
            torch.testing.assert_close(fast.losses[key], ref.losses[key], rtol=1e-5, atol=1e-6)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(fast.features, ref.features.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(fast.fire_counts(), ref.fire_counts())
    else:  # bfloat16 GEMMs: the reference also decodes in bfloat16, and ties may break apart
        for key in ref.losses:
            torch.testing.assert_close(
                fast.losses[key].float(), ref.losses[key].float(), rtol=3e-2, atol=1e-3
            )
        # Measured: 0.14-0.43% on the ReLU paths, up to ~6% for TopK, whose reference decodes
        # densely in bfloat16 where the fast path decodes its k columns in float32. The bounds
        # are a few times those, so a wrong factor in a bfloat16-only branch fails.
        bound = 0.1 if fast_sae.variant in ("topk", "batchtopk") else 0.015
        for name, grad in ref_grads.items():
            error = (fast_grads[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-8)
            assert error < bound, f"{name}: relative error {error:.3g}"
        fired, ref_fired = fast.features != 0, ref.features.detach() != 0
        assert (fired != ref_fired).sum() <= 0.02 * ref_fired.sum()
    return fast, ref, fast_grads


@pytest.mark.parametrize("p, q", [(40, 300), (300, 40)])  # both layouts of the bfloat16 CPU branch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_mm_is_the_first_operand_transposed_times_the_second(p, q, dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, p, generator=g), torch.randn(64, q, generator=g)  # (batch, p), (batch, q)
    a, b = a.to(dtype), b.to(dtype)
    out = _transposed_mm(a, b, torch.float32)
    assert out.shape == (p, q) and out.is_contiguous() and out.dtype == torch.float32
    exact = a.double().T @ b.double()  # sums of 64 products: entries of size ~8
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8  # bfloat16: one rounding of the result
    torch.testing.assert_close(out.double(), exact, rtol=tolerance, atol=tolerance * 8)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["paper", "april2024"])
def test_relu_sae_dense_fast_path_matches_reference(variant, precision):
    sae = _sae(variant)  # zero biases: about half the features fire, the dense regime
    sae.sparse_codes = False
    fast, _, _ = _compare(sae, copy.deepcopy(sae), _data(), precision)
    assert fast.sparse_features is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["paper", "april2024"])
def test_relu_sae_sparse_fast_path_matches_reference(variant, precision):
    sae = _sae(variant, target_l0=6)
    sae.sparse_codes = True
    fast, _, _ = _compare(sae, copy.deepcopy(sae), _data(), precision)
    assert fast.sparse_features is not None


def test_relu_sae_sparse_fast_path_gives_input_gradient():
    sae = _sae("paper", target_l0=6)
    sae.sparse_codes = True
    fast, _, grads = _compare(sae, copy.deepcopy(sae), _data(), "fp32", x_needs_grad=True)
    assert fast.sparse_features is not None  # the sparse path was the one compared
    assert grads["x"].shape == (BATCH, D_IN) and grads["x"].abs().sum() > 0


def test_relu_sae_dense_fast_path_gives_input_gradient():
    sae = _sae("paper")
    fast, _, grads = _compare(sae, copy.deepcopy(sae), _data(), "fp32", x_needs_grad=True)
    assert fast.sparse_features is None  # the dense path was the one compared
    assert grads["x"].shape == (BATCH, D_IN) and grads["x"].abs().sum() > 0


def test_paper_sae_switches_to_sparse_path_when_codes_are_sparse():
    sae = _sae("paper", target_l0=6)
    sae.sparse_codes = False  # as after a step whose codes were dense
    assert sae(_data()).sparse_features is None  # this step takes the dense path
    assert sae(_data()).sparse_features is not None  # and its density sends the next one sparse


@pytest.mark.parametrize(("device", "dtype", "n", "sparse"), [
    # the paths' crossovers measured at L0 35, batch 4,096 (docs/sae-variants.md, "Density threshold")
    ("cpu", torch.float32, 4096, True), ("cpu", torch.bfloat16, 4096, True), ("cpu", torch.bfloat16, 1024, False),
    ("cuda", torch.float32, 4096, False), ("cuda", torch.float32, 16384, True), ("cuda", torch.float32, 65536, True),
    ("cuda", torch.bfloat16, 16384, False), ("cuda", torch.bfloat16, 65536, False),
    ("cuda", torch.bfloat16, 1 << 20, True),  # past what was measured: spared the (batch, n) tensors
])
def test_the_path_at_l0_35_is_the_one_measured_faster_on_each_device(device, dtype, n, sparse):
    assert (35 / n < density_threshold(torch.device(device), dtype)) == sparse


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_topk_fast_path_matches_reference(variant, precision):
    sae = _sae(variant)
    fast, _, grads = _compare(sae, copy.deepcopy(sae), _data(), precision)
    fired = (fast.features != 0).sum(1)
    if variant == "topk":  # k = 12 per row
        assert fired.max() <= 12
    else:  # k · batch over the whole batch
        assert fired.sum() <= 12 * BATCH
    assert grads["W_enc"].abs().sum() > 0 and grads["W_dec"].abs().sum() > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dead", [N_FEATURES // 2, 40])  # AuxK codes 10% dense (sparse path), 50% (dense)
@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_topk_fast_path_matches_reference_with_auxk_loss(variant, dead, precision):
    from framework.sae.topk import TopKSAE

    sae = _sae(variant, dead_steps_threshold=1, aux_k=20)
    sae.steps_since_fired[:dead] = 1
    assert TopKSAE._auxk_dense_pays(20, dead) == (dead == 40)  # both paths run
    fast, ref, _ = _compare(sae, copy.deepcopy(sae), _data(), precision)
    assert ref.losses["auxk"] > 0


def test_batchtopk_fast_path_matches_reference_at_inference():
    sae = _sae("batchtopk")
    sae.threshold.fill_(0.5)
    sae.eval()
    fast, _, _ = _compare(sae, copy.deepcopy(sae), _data(), "fp32")
    kept = fast.features[fast.features != 0]
    assert kept.numel() > 0 and (kept > 0.5).all()  # the global threshold, not a per-batch top-k


def test_batchtopk_selection_is_exact_when_the_sampled_cut_keeps_too_few():
    from framework.sae.kernels import batch_topk_flat

    pre = torch.randn(64, 1000)
    pre[:4] += 10  # four rows hold far more than their share of the batch's largest entries
    chosen = batch_topk_flat(pre, 64 * 8, None)
    expected = pre.view(-1).topk(64 * 8).indices.sort().values
    assert torch.equal(chosen, expected)


def test_entries_at_least_a_cut_are_found_block_by_block_including_a_partial_last_block():
    from framework.sae.kernels import Workspace, _positions

    flat = torch.randn(1000 * 37, generator=torch.Generator().manual_seed(0))  # 1,000 rows: 15 blocks + 40 rows
    cut = torch.tensor(1.5)
    expected = (flat >= cut).nonzero().squeeze(1)
    for ws in (None, Workspace()):
        assert torch.equal(_positions(flat, torch.ge, cut, 37, ws), expected)
        assert torch.equal(_positions(flat, torch.gt, 0, 37, ws), (flat > 0).nonzero().squeeze(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batchtopk_selection_keeps_every_positive_entry_when_too_few_are_positive(dtype):
    # The selection compares integer keys: among negative entries it may choose others than the
    # float top-k, which the ReLU zeroes; every positive entry must be chosen, in any dtype.
    from framework.sae.kernels import batch_topk_flat

    pre = (torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) - 3).to(dtype)  # ~0.13% > 0
    pre[0, :5] = -0.0
    total = 64 * 8
    positive = (pre.view(-1) > 0).nonzero().squeeze(1)
    assert 0 < positive.numel() < total
    chosen = batch_topk_flat(pre, total, None)
    assert chosen.numel() == total and torch.equal(chosen, chosen.unique())
    assert torch.isin(positive, chosen).all()
    float_choice = pre.view(-1).float().topk(total).indices
    assert torch.equal(pre.view(-1)[chosen].clamp_min(0).sort().values,
                       pre.view(-1)[float_choice].float().clamp_min(0).to(dtype).sort().values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 255, 1001, 4099])
def test_dense_fire_counts_are_exact_in_every_dtype_and_batch_size(dtype, batch):
    # Odd counts above 256 (2,048) are not representable in bfloat16 (float16): the block sums
    # must stay below that.
    g = torch.Generator().manual_seed(batch)
    f = torch.relu(torch.randn(batch, 300, generator=g) + torch.linspace(-3, 3, 300)).to(dtype)
    f[:, 0] = 1.0  # one column fires on every row (the largest count)
    f[:, 1] = -0.0  # zero with the sign bit set: does not fire
    f[0, 2] = torch.finfo(dtype).smallest_normal / 4  # a subnormal: fires
    expected = torch.count_nonzero(f > 0, dim=0)
    assert expected[0] == batch and expected.max() == batch and expected.min() < batch // 10 + 1
    for ws in (None, Workspace()):
        counts = dense_fire_counts(f, ws)
        assert counts.dtype == torch.int64 and torch.equal(counts, expected)


def test_column_sums_are_torchs_float32_sums_in_float32_and_rounded_gemm_sums_in_bfloat16():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(4096, 64, generator=g)
    assert torch.equal(column_sums(t), t.sum(0))
    exact = t.bfloat16().float().sum(0)
    fast = column_sums(t.bfloat16())
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, rtol=2**-8, atol=0)  # one bfloat16 rounding of the sum


@pytest.mark.parametrize("n", [300, 4096, 5000])
def test_the_encoder_weight_gradient_comes_out_in_w_encs_layout_piece_by_piece(n):
    # Above 2,048 features the product is built in pieces of features and transposed piece by
    # piece; 5,000 ends on a short piece, and some features have no active rows at all.
    g = torch.Generator().manual_seed(n)
    batch, d, k = 64, 40, 5
    idx = torch.stack([torch.randperm(n // 2, generator=g)[:k].sort().values * 2 for _ in range(batch)])
    pattern = ActivePattern.from_topk(idx, n)
    values = torch.randn(batch * k, generator=g)
    dense = torch.randn(batch, d, generator=g)
    result = _spmm_into_columns(pattern, values, dense)
    assert result.shape == (d, n) and result.is_contiguous()
    codes = torch.zeros(batch, n)
    codes[pattern.rows.long(), pattern.cols.long()] = values
    torch.testing.assert_close(result, dense.T @ codes, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_topk_on_integer_keys_keeps_the_same_values_after_the_relu(dtype):
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 500, generator=g)
    pre[:8] = -pre[:8].abs()  # rows with no positive entry
    pre[8:16, 3:] = -pre[8:16, 3:].abs()  # rows with at most 3 positive entries: fewer than k
    pre[16, :] = 0.0  # a row of zeros, +0 and -0
    pre[16, ::2] = -0.0
    pre = pre.to(dtype)
    k = 10
    idx = row_topk_indices(pre, k)
    ours = torch.relu(pre.gather(1, idx)).float().sort(1).values
    expected = torch.relu(pre.topk(k, dim=1).values).float().sort(1).values
    assert torch.equal(ours, expected)
    if dtype == torch.float32:  # no ties among random float32 values: the very same columns
        assert torch.equal(idx.sort(1).values[20:], pre.topk(k, dim=1).indices.sort(1).values[20:])


def test_a_relu_sae_keeps_only_the_buffers_of_the_path_it_takes_next():
    # The dense and sparse paths each keep (batch, n) buffers; holding both doubled the step's
    # memory once a run had passed from dense to sparse codes.
    sae = _sae("paper", target_l0=4)  # sparse codes: the next step takes the sparse path
    sae.sparse_codes = False
    sae(_data()).loss.backward()  # a dense step, after which the codes are found sparse
    assert set(sae._workspace._buffers) == {"grad_pre", "fire_mask", "W_enc_aug", "W_dec_aug", "codes"}  # the dense step's
    assert sae.sparse_codes  # read (at the next forward in training): the dense path's buffers go
    assert not sae._workspace._buffers
    sae(_data(3)).loss.backward()
    assert set(sae._workspace._buffers) == {"pre", "mask", "grad_W_enc", "grad_W_dec"}
    dense = _sae("paper")  # half the features fire: stays dense
    dense(_data()).loss.backward()
    assert not dense.sparse_codes and not set(dense._workspace._buffers) & {"pre", "mask", "grad_W_enc", "grad_W_dec"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_integer_keys_compare_with_zero_as_the_floats_do(dtype):
    values = torch.tensor([-float("inf"), -3.0, -1e-3, -0.0, 0.0, 1e-3, 2.5, float("inf")], dtype=dtype)
    keys = order_keys(values)
    assert keys.dtype != dtype  # on CPU the integer view is what gets compared
    assert torch.equal(torch.gt(keys, 0), values > 0)
    assert torch.equal(keys[4:].argsort(), values[4:].argsort())  # order among the non-negative


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_relu_and_its_backward_on_integer_keys_give_the_float_results(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 33, generator=g).to(dtype)
    x[0, :4] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf")], dtype=dtype)
    grad = torch.randn(64, 33, generator=g).to(dtype)
    f = relu_(x.clone())
    assert torch.equal(f, torch.relu(x))  # values (torch.relu keeps -0.0 where this writes +0.0)
    assert not torch.signbit(f).any()
    masked = mask_where_inactive_(grad.clone(), f)  # kept gradients bit for bit
    expected = torch.ops.aten.threshold_backward(grad, torch.relu(x), 0)
    assert torch.equal(masked.view(torch.uint8), expected.view(torch.uint8))


def test_the_first_forward_looks_at_the_codes_before_choosing_its_path():
    # Before any forward the density is unknown; a calibrated SAE must not pay a dense first step
    # (three (batch, n) tensors), and an SAE with half its features firing must not go sparse.
    sparse, dense = _sae("paper", target_l0=4), _sae("paper")
    assert sparse.sparse_codes is None and dense.sparse_codes is None
    sparse(_data())
    assert set(sparse._workspace._buffers) == {"pre", "mask"}  # the sparse path ran
    dense(_data())
    assert "fire_mask" in dense._workspace._buffers and "pre" not in dense._workspace._buffers


def _static_forward(sae, with_auxk: bool):
    """forward_static as a forward returning an SAEOutput."""
    from framework.sae.base import SAEOutput

    def forward(x):
        x_hat, losses, fire_counts = sae.forward_static(x, with_auxk)
        return SAEOutput(x_hat, losses=losses, fire_counts=fire_counts)

    return forward


def _assert_like_reference(out, grads, ref, ref_grads, precision: str, variant: str) -> None:
    tight = precision == "fp32"
    for key in ref.losses:
        torch.testing.assert_close(out.losses[key].float(), ref.losses[key].float(),
                                   rtol=1e-5 if tight else 3e-2, atol=1e-6 if tight else 1e-3)
    bf16_bound = 0.1 if variant in ("topk", "batchtopk") else 0.015  # as in _compare
    for name, grad in ref_grads.items():
        error = (grads[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-8)
        assert error < (1e-5 if tight else bf16_bound), f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dead", [0, 5, 40, N_FEATURES // 2])  # 5 < aux_k: live latents fill the picks
def test_topk_static_forward_for_cuda_graphs_matches_reference(dead, precision):
    """forward_static (what train.cuda_graphs records) gives the reference's losses and gradients,
    and the eager fast path's firing counts and silent-step counts, with and without dead latents."""

    sae = _sae("topk", dead_steps_threshold=1, aux_k=20)
    sae.steps_since_fired[:dead] = 1
    eager = copy.deepcopy(sae)

    ref_sae = copy.deepcopy(sae)
    out, grads = _step(sae, _static_forward(sae, with_auxk=dead > 0), _data(), precision)
    assert not sae._workspace._buffers  # a recorded graph must own all its memory
    ref, ref_grads = _step(ref_sae, ref_sae.forward_reference, _data(), precision)
    fast, _ = _step(eager, eager.forward, _data(), precision)
    assert (ref.losses["auxk"] > 0) == (dead > 0)
    assert torch.equal(out.fire_counts(), fast.fire_counts())
    assert torch.equal(sae.steps_since_fired, eager.steps_since_fired)
    _assert_like_reference(out, grads, ref, ref_grads, precision, "topk")
    with pytest.raises(RuntimeError, match="kept no features"):
        _ = out.features


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("target_l0", [0, 2])  # dense codes, and codes sparse enough for the sparse path (< 1%)
def test_paper_static_forward_for_cuda_graphs_matches_reference(target_l0, precision):
    """The paper SAE's forward_static (its dense path, what train.cuda_graphs records) gives the
    reference's losses and gradients and the eager fast path's firing counts, whichever path
    the eager one takes, and uses no workspace buffer."""

    sae = _sae("paper", target_l0=target_l0)
    ref_sae, eager = copy.deepcopy(sae), copy.deepcopy(sae)
    out, grads = _step(sae, _static_forward(sae, with_auxk=False), _data(), precision)
    assert not sae._workspace._buffers
    ref, ref_grads = _step(ref_sae, ref_sae.forward_reference, _data(), precision)
    fast, _ = _step(eager, eager.forward, _data(), precision)
    assert eager.sparse_codes == (target_l0 > 0)  # the eager step took the path its density says
    assert out.losses.keys() == ref.losses.keys()
    assert torch.equal(out.fire_counts(), fast.fire_counts())
    _assert_like_reference(out, grads, ref, ref_grads, precision, "paper")


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_topk_reads_whether_latents_are_dead_only_when_one_may_be(variant):
    """AuxK's on/off decision (a host sync on a GPU) reads the silent-step counts only when a
    latent may have reached dead_steps_threshold, and is never wrong: latents killed mid-run
    switch AuxK on exactly when the first of them crosses the threshold, and a loaded state
    (a resumed run) is read afresh."""
    threshold = 6
    sae = _sae(variant, dead_steps_threshold=threshold, aux_k=20)
    with torch.no_grad():  # biases small enough that every latent fires in the first steps: no natural deaths
        sae.b_enc.mul_(0.1)
    reads, read = [], sae._read_silent_counts
    killed = torch.arange(0, N_FEATURES, 7)
    for step in range(24):
        sae._read_silent_counts = lambda step=step: reads.append(step) or read()
        if step == 4:
            with torch.no_grad():
                sae.b_enc[killed] = -1e4  # these never fire again
        dead_now = bool(sae.dead_mask().any())
        out = sae(_data(step), step)
        assert (out.losses["auxk"] > 0).item() == dead_now, step
    assert sae.dead_mask()[killed].all()
    # Step 0 reads (nothing known); its largest count is 0, so steps 1-5 cannot see a dead latent
    # and read nothing; from step 10 the killed latents are dead and every step reads.
    assert reads[:2] == [0, threshold] and set(range(4 + threshold, 24)) <= set(reads)
    assert len(reads) < 24 - (threshold - 1)

    state = copy.deepcopy(sae.state_dict())
    fresh = _sae(variant, dead_steps_threshold=threshold, aux_k=20)
    fresh(_data(0), 0)  # its bound now says: nothing dead for a while
    fresh.load_state_dict(state)  # the counts of a run with dead latents
    assert fresh(_data(30), 30).losses["auxk"] > 0


class _HostReads(TorchDispatchMode):
    """Records the operators that read device values back to the host: on a GPU each makes the
    host wait for every kernel queued so far (here on CPU the same calls happen, so they are
    counted the same)."""

    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.bincount", "aten.unique", "aten.masked_select",
             "aten.repeat_interleave")

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.READS):
            self.reads.append(str(func).split(".")[1])
        return func(*args, **(kwargs or {}))


def _training_step(sae, optimizer, x):
    sae(x).loss.backward()
    sae.before_optimizer_step()
    optimizer.step()
    sae.after_optimizer_step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("variant", "target_l0", "expected"), [
    ("paper", 0.0, []),  # dense codes: the dense path
    ("paper", 6.0, ["nonzero"]),  # sparse codes: their number sizes what follows (on CPU one per block of rows)
    ("topk", 0.0, []),
])
def test_a_training_step_reads_back_only_what_its_path_must(variant, target_l0, expected):
    # The paper SAE chooses each step's path from the last step's density: reading it with .item()
    # right after the forward stalled every GPU step before its backward was queued; it is now
    # read at the next forward. Its sparse path counted fires with a bincount (another wait).
    sae = _sae(variant, target_l0)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)  # as SAEModule's
    _training_step(sae, optimizer, _data())  # the first forward looks at its codes once
    with _HostReads() as mode:
        for seed in (1, 2):
            _training_step(sae, optimizer, _data(seed))
    assert sorted(set(mode.reads)) == expected
    assert sae.sparse_codes == (target_l0 > 0) if variant == "paper" else True


@pytest.mark.parametrize(("variant", "target_l0"), [
    ("paper", 0.0), ("paper", 6.0), ("april2024", 0.0), ("topk", 0.0), ("batchtopk", 0.0),
])  # the ReLU SAEs' dense and sparse paths, TopK's
def test_two_forwards_then_one_backward_give_the_reference_gradients(variant, target_l0):
    # What a caller may do with any module: the dense path saved its augmented weight copies in
    # workspace buffers that the second forward overwrote (autograd refused the backward).
    sae = _sae(variant, target_l0)
    ref = copy.deepcopy(sae)
    (sae(_data(3)).loss + sae(_data(4)).loss).backward()
    (ref.forward_reference(_data(3)).loss + ref.forward_reference(_data(4)).loss).backward()
    for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_dense_paths_weight_copies_are_reused_from_step_to_step():
    # Autograd holds them from a forward to its backward (the test above); between steps
    # nothing does, and the next step writes into the same memory (a fresh copy page-faults).
    sae = _sae("paper")
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    _training_step(sae, optimizer, _data())
    buffers = {name: sae._workspace._buffers[name].data_ptr() for name in ("W_enc_aug", "W_dec_aug")}
    _training_step(sae, optimizer, _data(1))
    assert {name: sae._workspace._buffers[name].data_ptr() for name in buffers} == buffers


def test_the_dense_codes_buffer_is_reused_only_once_nothing_holds_it():
    # On CPU the dense path's codes go into the last step's buffer when nothing holds it any
    # more (a fresh one page-faults every step): never while a caller keeps a step's features
    # (or autograd saves them, until backward).
    sae = _sae("paper")  # half the features fire: the dense path
    first = sae(_data())
    first.loss.backward()
    kept = first.features.clone()
    second = sae(_data(1))  # the first step's features are still referenced here
    assert second.features.data_ptr() != first.features.data_ptr()
    assert torch.equal(first.features, kept)  # never overwritten
    second.loss.backward()
    buffer = second.features.data_ptr()
    del first, second
    third = sae(_data(2))  # nothing holds the second step's buffer any more: reused
    assert third.features.data_ptr() == buffer
    torch.testing.assert_close(third.features, torch.relu(sae.pre_activations(_data(2))).detach())


def test_a_copy_taken_after_a_forward_takes_the_same_next_path():
    # The count that chooses the next path is read at the next forward; a copy (or a pickle)
    # taken in between reads it first (on a GPU it holds a CUDA event, which cannot be copied).
    sae = _sae("paper", target_l0=6)
    sae.sparse_codes = False
    sae(_data())
    assert sae._pending_density is not None
    clone = copy.deepcopy(sae)
    assert clone._pending_density is None and clone.sparse_codes is True and sae.sparse_codes is True


@pytest.mark.parametrize("n_features", [N_FEATURES, 4096])  # 4,096: W_enc's gradient built in pieces
def test_weight_gradient_buffers_are_reused_only_once_the_gradients_are_dropped(n_features):
    # On CPU a sparse step's weight gradients go into the last step's buffers when nothing holds
    # them any more (set_to_none zeroing drops the .grad that was one): never while a gradient
    # is still referenced, and accumulated gradients (no zeroing in between) still add up.
    sae = _sae("topk", n_features=n_features)
    sae(_data()).loss.backward()
    kept, kept_values = sae.W_enc.grad, sae.W_enc.grad.clone()
    sae.zero_grad(set_to_none=True)
    sae(_data(1)).loss.backward()  # `kept` still refers to the first step's gradient
    assert sae.W_enc.grad.data_ptr() != kept.data_ptr() and torch.equal(kept, kept_values)
    second = {name: (p.grad.data_ptr(), p.grad.clone()) for name, p in sae.named_parameters()}
    del kept
    sae.zero_grad(set_to_none=True)
    sae(_data(1)).loss.backward()  # nothing holds the second step's buffers: reused, same values
    for name in ("W_enc", "W_dec"):
        grad = dict(sae.named_parameters())[name].grad
        assert grad.data_ptr() == second[name][0] and torch.equal(grad, second[name][1]), name
    sae(_data(2)).loss.backward()  # accumulated onto the held gradients
    alone = copy.deepcopy(sae)
    alone.zero_grad(set_to_none=True)
    alone(_data(2)).loss.backward()
    for (name, p), q in zip(sae.named_parameters(), alone.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, second[name][1] + q.grad, msg=name)


def test_the_sparse_paths_l1_sum_is_a_float32_sum_under_bf16_autocast():
    # `values @ l1_weight[cols]` under CPU autocast ran as a bfloat16 dot: the L1 term rounded to
    # 8 bits, and 450x slower than the float32 dot (13 ms of a 100 ms step at n 4,096).
    sae = _sae("paper", target_l0=6)
    sae.sparse_codes = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(_data())
    assert out.sparse_features is not None and out.losses["l1"].dtype == torch.float32
    values = out.sparse_features.values.double()
    torch.testing.assert_close(out.losses["l1"].double(), values.sum() / BATCH, rtol=1e-6, atol=0)
