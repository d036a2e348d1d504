"""Where one of our training steps spends its time: torch.profiler over a few steps of the same
step bench/train_step.py times, the operators' self time on the device (CUDA kernels, or CPU
when there is no GPU), and how the step's wall time compares with the time its kernels keep the
device busy (on a GPU, a step whose wall time is much larger than its kernels' time is bound by
launches and host syncs, not by the kernels: the case for CUDA graphs or fewer, fused kernels).

    python bench/step_profile.py --device cuda   # topk, paper (sparse) at n 16,384; with CUDA graphs: topk 16,384, paper 4,096; bf16
    python bench/step_profile.py --case topk:16384:fp32 --rows 30
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step as ts  # noqa: E402
from common import base_parser, precisions_for, run_step, synchronize  # noqa: E402

CASES = ("topk:16384:bf16", "paper-sparse:16384:bf16")
CUDA_CASES = ("topk-graphs:16384:bf16", "paper-graphs:4096:bf16")  # with the cases above on a GPU


def profile_case(case: str, device: torch.device, steps: int, rows: int) -> dict:
    family, n, precision = case.split(":")
    variant, _, regime = family.partition("-")
    setup = ts.make_setup(int(n), ts.BATCH, device, precision)
    if regime == "graphs":  # train.cuda_graphs' recorded whole step (the paper SAE's: sparse codes, dense path)
        contender = ts.ours(setup, variant, "sparse" if variant == "paper" else "", cuda_graphs=True)
    else:
        contender = ts.ours(setup, variant, regime)
    for _ in range(5):  # warm-up: the ReLU SAE settles on its path, allocator caches fill
        run_step(contender, device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run_step(contender, device)
    wall = (time.perf_counter() - start) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run_step(contender, device)
        synchronize(device)
    events = prof.key_averages()
    on_device = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    # Kernels (CPU ops without a GPU), not the ranges that annotate them (Optimizer.step#...).
    kernels = [e for e in events if e.device_type == kind and not getattr(e, "is_user_annotation", False)]
    busy = sum(getattr(e, on_device) for e in kernels) / steps / 1e6
    print(f"\n## {case} on {device.type}: {1e3 * wall:.3f} ms per step (unprofiled), {ts.BATCH / wall:,.0f} tokens/s")
    if device.type == "cuda":
        launches = sum(e.count for e in kernels) / steps
        print(f"kernels keep the GPU busy {1e3 * busy:.3f} ms per step ({100 * busy / wall:.0f}% of the wall time), "
              f"{launches:.0f} kernels per step")
    print(events.table(sort_by=on_device, row_limit=rows, max_name_column_width=60))
    return {"case": case, "wall_ms": 1e3 * wall, "busy_ms": 1e3 * busy}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = base_parser(__doc__)
    parser.add_argument("--case", nargs="+", default=None, help="family:n:precision, family topk, "
                        "topk-graphs or paper-graphs (CUDA only), paper-sparse or paper-dense")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cases = args.case or list(CASES) + (list(CUDA_CASES) if device.type == "cuda" else [])
    if "bf16" not in precisions_for(device, ["bf16"]):  # the same steps in fp32
        cases = [case.replace(":bf16", ":fp32") for case in cases]
    return [profile_case(case, device, args.steps, args.rows) for case in cases]


if __name__ == "__main__":
    main()
