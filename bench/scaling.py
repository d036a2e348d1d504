"""Training tokens/s and peak memory as the dictionary grows (512 -> 65,536 features; 131,072 on
a GPU): ours (paper SAE at L0 ~ 32, TopK k = 32), the peers where a step is affordable, and the
limits, at d_in 576 and batch 4,096. Writes the plot docs/img/bench-scaling.png.

    python bench/scaling.py [--quick] [--device cuda] [--precision fp32] [--peer-max 16384]

The contenders and limits are train_step.py's (same code, same weights); each size is one
round-robin of them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step as ts  # noqa: E402
from common import RESULTS, base_parser, fmt, machine, markdown_table, write_results  # noqa: E402

PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "bench-scaling.png"
RESULTS_QUICK = RESULTS / "quick"

# name -> (needs peers, builder(setup, paper_weights, topk_weights))
CONTENDERS = {
    "ours paper, L0 ~ 32": (False, lambda s, wp, wt: ts.ours(s, "paper", "sparse")),
    "ours paper, L0 ~ 32, CUDA graphs": (False, lambda s, wp, wt: ts.ours(s, "paper", "sparse", cuda_graphs=True)),
    "ours topk": (False, lambda s, wp, wt: ts.ours(s, "topk", "")),
    "ours topk, CUDA graphs": (False, lambda s, wp, wt: ts.ours(s, "topk", "", cuda_graphs=True)),
    "SAELens standard, L0 ~ 32": (True, lambda s, wp, wt: ts.saelens(s, wp, "paper")),
    "SAELens topk": (True, lambda s, wp, wt: ts.saelens(s, wt, "topk")),
    "sparsify topk": (True, lambda s, wp, wt: ts.sparsify(s, wt)),
    "limit: 5 GEMMs": (False, lambda s, wp, wt: ts.limit_paper(s)),
    "limit: GEMM + topk + fused Adam": (False, lambda s, wp, wt: ts.limit_topk(s)),
}


def run_size(n: int, precision: str, device: torch.device, batch: int, peer_max: int, repeats: int) -> dict:
    load_before = os.getloadavg()[0]
    setup = ts.make_setup(n, batch, device, precision)
    paper_weights = ts.weights_of(ts.our_sae(setup, "paper", "sparse"))
    topk_weights = ts.weights_of(ts.our_sae(setup, "topk", ""))
    builders = [
        (name, lambda b=build: b(setup, paper_weights, topk_weights))
        for name, (peer, build) in CONTENDERS.items()
        if (not peer or n <= peer_max) and ("CUDA graphs" not in name or device.type == "cuda")
    ]
    contenders, failed = ts.build_all(builders, device)
    ts.round_robin(contenders, device, warmup=0, repeats=repeats)
    return {"n": n, "precision": precision, "contenders": [c.summary(batch) for c in contenders], "failed": failed,
            "load_average": [load_before, os.getloadavg()[0]]}


def run(device: str = "cpu", quick: bool = False, precisions: tuple[str, ...] = ("fp32",),
        peer_max: int | None = None, max_features: int | None = None) -> dict:
    dev = torch.device(device)
    if quick:
        sizes, batch, repeats = [256, 512], 256, 1
    else:
        top = max_features or (131_072 if dev.type == "cuda" else 65_536)
        sizes, batch = [2**i for i in range(9, top.bit_length())], ts.BATCH
        repeats = 10 if dev.type == "cuda" else 3
        ts.warm_up_libraries(dev)
    peer_max = peer_max or (sizes[-1] if dev.type == "cuda" else 16_384)
    points = []
    for precision in precisions:
        for n in sizes:
            print(f"scaling: n={n} {precision}", file=sys.stderr, flush=True)
            points.append(run_size(n, precision, dev, batch, peer_max, repeats))
    return {
        "machine": machine(dev),
        "settings": {"d_in": ts.D_IN, "batch": batch, "sizes": sizes, "peer_max": peer_max,
                     "repeats": repeats, "quick": quick},
        "points": points,
    }


def series(results: dict, precision: str) -> dict[str, list[tuple[int, dict]]]:
    out: dict[str, list[tuple[int, dict]]] = {}
    for point in results["points"]:
        if point["precision"] == precision:
            for c in point["contenders"]:
                out.setdefault(c["name"], []).append((point["n"], c))
    return out


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = sorted({p["precision"] for p in results["points"]})
    fig, axes = plt.subplots(len(precisions), 2, figsize=(12, 4.5 * len(precisions)), squeeze=False)
    for row, precision in zip(axes, precisions):
        for name, points in series(results, precision).items():
            style = "--" if name.startswith("limit") else "-"
            ns = [n for n, _ in points]
            row[0].plot(ns, [c["tokens_per_s"] for _, c in points], style, marker="o", label=name)
            if not name.startswith("limit"):
                row[1].plot(ns, [c["peak_mib"] for _, c in points], style, marker="o", label=name)
        for ax, ylabel in zip(row, ("training tokens/s", "peak memory per step (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("n_features")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        row[0].set_title(f"{precision}, d_in {results['settings']['d_in']}, batch {results['settings']['batch']:,}")
        row[0].legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"{m.get('gpu') or m['cpu']} ({m['cores']} cores), torch {m['versions']['torch']}, {m['date']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tables(results: dict) -> str:
    out = []
    for precision in sorted({p["precision"] for p in results["points"]}):
        data = series(results, precision)
        sizes = [p["n"] for p in results["points"] if p["precision"] == precision]
        header = ["contender"] + [f"{n:,}" for n in sizes]
        rows, memory = [], []
        for name, points in data.items():
            by_n = dict(points)
            rows.append([name] + [fmt(by_n[n]["tokens_per_s"]) if n in by_n else "–" for n in sizes])
            if not name.startswith("limit"):
                memory.append([name] + [fmt(by_n[n]["peak_mib"]) if n in by_n else "–" for n in sizes])
        loads = [f"{p['load_average'][0]:.1f}→{p['load_average'][1]:.1f}" for p in results["points"]
                 if p["precision"] == precision and "load_average" in p]
        rows.append(["1-min load before→after"] + loads)
        out += [f"tokens/s by n_features ({precision})", "", markdown_table(header, rows), "",
                f"peak MiB per step by n_features ({precision})", "", markdown_table(header, memory), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--peer-max", type=int, default=None,
                        help="largest n_features at which the peers run (default 16,384 on CPU, all on GPU)")
    parser.add_argument("--max-features", type=int, default=None, help="default 65,536 (131,072 on CUDA)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG path (default docs/img/bench-scaling[-cuda].png; with --quick or --out: "
                             "scaling.png beside the results)")
    args = parser.parse_args(argv)
    results = run(args.device, args.quick, tuple(args.precision), args.peer_max, args.max_features)
    if args.plot:
        target = args.plot
    elif args.quick or args.out:
        target = (args.out or RESULTS_QUICK) / "scaling.png"
    else:
        target = PLOT if args.device == "cpu" else PLOT.with_name(f"bench-scaling-{args.device}.png")
    results["plot"] = str(plot(results, target))
    path = write_results("scaling", results, args.out, args.quick)
    print(tables(results))
    print(f"\nresults: {path}\nplot: {results['plot']}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
