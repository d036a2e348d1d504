"""The benchmark entry points run end to end at their smallest sizes and report finite numbers.

A smoke test, not a timing test: `make bench` measures; this only keeps bench/ runnable."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: one thread is faster, and immune to a busy machine
    try:
        import run_all

        yield run_all
    finally:
        torch.set_num_threads(threads)
        for name in ("run_all", "train_step", "scaling", "activations", "train_loop", "common"):
            sys.modules.pop(name, None)


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_bench_quick_run_reports_finite_numbers_for_every_contender(run_all, tmp_path):
    results = run_all.main(["--quick", "--out", str(tmp_path)])

    for group in results["train_step"]["groups"]:
        names = {c["name"] for c in group["contenders"]}
        assert any(n.startswith("ours") for n in names) and any(n.startswith("limit") for n in names)
        assert any(n.startswith("SAELens") for n in names)
        for c in group["contenders"]:
            assert _finite(c["tokens_per_s"]) and c["tokens_per_s"] > 0, c["name"]
            assert c["sanity"] in ("ok", "–"), (c["name"], c["sanity"])
            assert all(map(_finite, c.get("loss", []))), c["name"]
        for row in run_all.train_step.comparisons(group):
            assert all(_finite(v) for k, v in row.items() if k.startswith("vs_")), row
    assert {g["family"] for g in results["train_step"]["groups"]} == {"paper", "topk"}

    for point in results["scaling"]["points"]:
        assert all(_finite(c["tokens_per_s"]) for c in point["contenders"])
    assert Path(results["scaling"]["plot"]).stat().st_size > 0

    acts = results["activations"]
    assert _finite(acts["bare_forward"]["tokens_per_s"])
    assert set(acts["harvest"]) == set(acts["reader"]) == {"float32", "float16", "bfloat16"}
    assert all(_finite(h["tokens_per_s"]) for h in acts["harvest"].values())
    assert all(_finite(r["rows_per_s"]) for r in acts["reader"].values())
    assert acts["bytes_per_row"]["float16"] < acts["bytes_per_row"]["float32"]
    assert 1 in acts["writer_rows_per_s"] and all(map(_finite, acts["writer_rows_per_s"].values()))

    loop = results["train_loop"]["rows"]
    precisions = run_all.train_step.precisions_for(torch.device("cpu"), ("fp32", "bf16"))  # bf16 where native
    assert {(r["variant"], r["precision"]) for r in loop} == {(v, p) for v in ("topk", "paper") for p in precisions}
    assert all(_finite(r["loop_ms"]) and _finite(r["loop_mean_ms"]) and _finite(r["bare_ms"]) and r["loop_ms"] > 0
               for r in loop)

    assert results["goals"] and all(len(row) == 3 for row in results["goals"])
    for name in ("train_step", "scaling", "activations", "train_loop", "goals"):
        assert json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_bench_compile_contenders_run_compiled_and_are_compared(run_all, tmp_path, monkeypatch, backend):
    """`train_step.py --compile`: our fast path and the plain SAE through torch.compile. Each
    compiles (dynamo captures graphs for it), computes the step it stands for (three steps' losses
    equal to the uncompiled fast path's from the same weights), and reaches the ratio table.
    aot_eager runs the graphs dynamo and AOTAutograd capture from our code with eager kernels;
    inductor (the default backend, slow: ~100 s of C++ code generation on 2 cores) also
    compiles them."""
    import torch._dynamo

    for key in ("recompile_limit", "fail_on_recompile_limit_hit"):  # compile_forward sets them
        monkeypatch.setattr(torch._dynamo.config, key, getattr(torch._dynamo.config, key))
    train_step = run_all.train_step
    monkeypatch.setattr(train_step, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    for variant, regime in (("topk", ""), ("paper", "sparse")):
        setup = train_step.make_setup(256, 64, torch.device("cpu"), "fp32")
        losses = {}
        for compiled in (None, "fast", "plain"):
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            contender = train_step.ours(setup, variant, regime, compiled=compiled)
            losses[compiled] = [contender.step()()["loss"] for _ in range(3)]
            if compiled:
                assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, (variant, compiled)
        for compiled in ("fast", "plain"):
            assert losses[compiled] == pytest.approx(losses[None], rel=1e-4), (variant, compiled)

    try:
        results = train_step.main(["--quick", "--compile", "--compile-backend", backend, "--families", "topk",
                                   "--precision", "fp32", "--out", str(tmp_path)])
    finally:
        train_step.WITH_COMPILE = False
    (group,) = results["groups"]
    assert results["settings"]["compile_backend"] == backend
    assert {"ours topk, torch.compile", "plain topk, torch.compile"} <= {c["name"] for c in group["contenders"]}
    rows = {r["ours"]: r for r in train_step.comparisons(group)}
    assert _finite(rows["ours topk"]["vs_compiled_plain"]) and _finite(rows["ours topk, torch.compile"]["vs_sparsify"])


@pytest.mark.parametrize("native", [False, True])
def test_bf16_is_left_out_on_a_cpu_without_native_bf16_products(run_all, monkeypatch, native, tmp_path):
    # There a full-size bf16 step runs in torch's reference kernel (minutes a step): the bench
    # would take hours to time nothing of ours. GPUs keep it.
    import common

    monkeypatch.setattr(common, "native_on_cpu", lambda dtype: native)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    both = ("fp32", "bf16")
    assert common.precisions_for(cpu, both) == (both if native else ("fp32",))
    assert common.precisions_for(gpu, both) == both
    assert common.precisions_for(cpu, ("fp32",)) == ("fp32",)
    results = run_all.train_step.main(["--quick", "--families", "topk", "--out", str(tmp_path)])
    assert [g["precision"] for g in results["groups"]] == list(both if native else ("fp32",))
    assert results["machine"]["native_bf16_matmul"] is native


def test_a_limit_step_runs_its_parts_without_syncing_between_them(run_all, monkeypatch):
    """A sync after each part put a host round-trip per part into the GPU limit."""
    import train_step

    setup = train_step.make_setup(64, 16, torch.device("cpu"), "fp32", d_in=8)
    limit = train_step.limit_topk(setup)
    syncs = []
    monkeypatch.setattr(train_step, "synchronize", lambda device: syncs.append(device))
    report = limit.step()
    assert syncs == [] and set(report()) == {"gemm_s", "topk_s", "adam_s"}


def test_a_contender_that_records_a_graph_has_its_peak_taken_over_the_recording(run_all):
    """A replay allocates nothing: the peak of the last step alone missed the graph's temporaries."""
    import common

    def build(records_graph: bool, allocates: bool = True):
        steps = []

        def step():  # like a recording: the first step's temporaries (256 MiB), none after it
            if not steps and allocates:
                torch.ones(64 * 2**20).sum()
            steps.append(1)
        return common.Timed("c", step, records_graph=records_graph)

    recorded = common.measure_peak(lambda: build(True), torch.device("cpu"))
    eager = common.measure_peak(lambda: build(False), torch.device("cpu"))
    assert recorded.peak_bytes >= 200 * 2**20 > eager.peak_bytes
    # and from its own start: not the high-water mark an earlier contender left
    assert common.measure_peak(lambda: build(True, allocates=False), torch.device("cpu")).peak_bytes < 50 * 2**20
