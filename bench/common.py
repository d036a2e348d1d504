"""What every benchmark script shares: timing, peak memory, the machine's description, output.

Why timing interleaves: the benchmark machine is shared, so its load drifts over minutes. Each
*round* runs one step of every contender of a shape in turn, and the figures are medians over
rounds; a load spike then slows every contender alike instead of whichever ran during it.

Why peak memory is read from the kernel: tracemalloc sees only Python's allocator, and torch
allocates its own memory. On CPU the figure is the resident set's high-water mark (VmHWM,
reset by writing 5 to /proc/self/clear_refs) above the resident set before the contender was
built; on CUDA it is torch's max_memory_allocated above the allocation before it was built.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from framework.memory import keep_freed_memory
from framework.precision import native_on_cpu

KEEPS_FREED_MEMORY = False  # set by --keep-freed-memory


class _KeepFreedMemory(argparse.Action):
    """--keep-freed-memory: malloc reuses freed memory, as `sae` does with
    SAE_KEEP_FREED_MEMORY=1 (framework/memory.py), for every contender in the process alike."""

    def __call__(self, parser, namespace, values, option_string=None):
        global KEEPS_FREED_MEMORY
        KEEPS_FREED_MEMORY = keep_freed_memory(force=True)
        setattr(namespace, self.dest, KEEPS_FREED_MEMORY)


RESULTS = Path(__file__).resolve().parent / "results"


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timers synchronise on cuda)")
    parser.add_argument("--quick", action="store_true", help="smallest sizes, few repeats: a smoke run")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default bench/results; --quick: bench/results/quick)")
    parser.add_argument("--keep-freed-memory", action=_KeepFreedMemory, nargs=0, default=False,
                        help="malloc keeps freed memory for reuse (as `sae` with SAE_KEEP_FREED_MEMORY=1), "
                             "for every contender (default: glibc's own behaviour)")
    return parser


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precisions_for(device: torch.device, requested) -> tuple[str, ...]:
    """The precisions to run: `requested`, less bf16 on a CPU that multiplies bf16 only in
    torch's reference kernel (no AVX-512; framework/precision.py), where a full-size bf16 step
    takes minutes and the bench hours (and even --quick's shapes made the smoke run 10x longer:
    the loop's are batch 4,096 × 1,024 features)."""
    if "bf16" not in requested or device.type != "cpu" or native_on_cpu("bfloat16"):
        return tuple(requested)
    print(f"bf16 left out: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 matrix "
          "products (oneDNN needs AVX-512), so bf16 steps would time torch's reference kernel", file=sys.stderr)
    return tuple(p for p in requested if p != "bf16")


def autocast(device: torch.device, precision: str):
    """bf16 autocast for 'bf16', nothing for 'fp32'."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ---- memory ------------------------------------------------------------------------------------


def _trim_heap() -> None:
    """Return glibc's free heap pages to the kernel, so the baseline holds only live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Bytes a contender holds at its peak during one step, above what was held before it existed."""

    def __init__(self, device: torch.device):
        self.device = device
        gc.collect()
        _trim_heap()
        self.baseline = self._current()
        self.reset()  # the high-water mark from here: not an earlier contender's

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS:") * 1024

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return _status_kib("VmHWM:") * 1024 - self.baseline


# ---- timing ------------------------------------------------------------------------------------


@dataclass
class Timed:
    """One contender of a round-robin: a step, its samples, and what its steps reported."""

    name: str
    # Runs one step; may return a callable, evaluated after the timer stops, giving what the
    # step reached ({"loss": ..., "l0": ...}), so reporting never costs the contender time.
    step: Callable[[], Callable[[], dict] | None]
    times: list[float] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    peak_bytes: int | None = None
    # Its first step records a CUDA graph, whose temporaries are allocated then (into the graph's
    # own pool) and never again: a replay allocates nothing, so its peak is not a replay's.
    records_graph: bool = False

    def summary(self, rows_per_step: int) -> dict:
        median = statistics.median(self.times)
        out = {
            "name": self.name,
            "median_s": median,
            "min_s": min(self.times),
            "max_s": max(self.times),
            "samples_s": self.times,
            "tokens_per_s": rows_per_step / median,
            "peak_mib": None if self.peak_bytes is None else self.peak_bytes / 2**20,
        }
        for key in ("loss", "l0"):
            values = [r[key] for r in self.reports if r and key in r]
            if values:
                out[key] = values
        timed = self.reports[-len(self.times):] if self.times else []
        parts = {k for r in timed for k in r if k.endswith("_s")}
        if parts:  # a limit's components, median seconds over the timed steps
            out["parts_s"] = {k: statistics.median(r[k] for r in timed if k in r) for k in sorted(parts)}
        return out


def run_step(contender: Timed, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    report = contender.step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    contender.reports.append(report() if report is not None else {})
    return elapsed


def round_robin(contenders: list[Timed], device: torch.device, warmup: int, repeats: int) -> None:
    """`warmup` untimed rounds, then `repeats` timed rounds of one step of each contender."""
    for i in range(warmup + repeats):
        for c in contenders:
            elapsed = run_step(c, device)
            if i >= warmup:
                c.times.append(elapsed)


def measure_peak(build: Callable[[], Timed], device: torch.device, steps: int = 2) -> Timed:
    """Build a contender and run `steps` untimed steps; the peak is the last one's (the first
    may allocate lazily: Adam's state, workspaces), or for a contender that records a CUDA graph
    the peak over every step, its recording included (an upper bound: the eager warm-up steps
    before the recording count too; they run the recorded code)."""
    memory = PeakMemory(device)
    contender = build()
    for i in range(steps):
        if i == steps - 1 and not contender.records_graph:
            memory.reset()
        run_step(contender, device)
    contender.peak_bytes = memory.peak()
    return contender


# ---- the machine -------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict:
    info = {
        "date": dt.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16_matmul": native_on_cpu("bfloat16"),
        "load_average": os.getloadavg(),
        "versions": {p: _version(p) for p in ("torch", "sae-lens", "eai-sparsify", "sae-framework")},
        "python": platform.python_version(),
        "device": str(device),
        "malloc_keeps_freed_memory": KEEPS_FREED_MEMORY,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(name: str, results: dict, out: Path | None, quick: bool = False) -> Path:
    """results as out/NAME.json (default: bench/results, or bench/results/quick for smoke runs)."""
    path = (out or (RESULTS / "quick" if quick else RESULTS)) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {**results, "load_average_end": os.getloadavg()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"
