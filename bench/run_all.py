"""Every benchmark, then one report: the training-step table against SAELens, sparsify and the
limits, tokens/s and memory as the dictionary grows, the activation pipeline, the `sae train`
loop against the bare step, and which goals are met. `make bench` runs this; results go to bench/results/*.json, the plot to
docs/img/bench-scaling.png, and the printed markdown is what docs/benchmarks.md records.

    python bench/run_all.py                 # full run, CPU: about 40 minutes on 2 cores
    python bench/run_all.py --quick         # smoke run, smallest sizes
    python bench/run_all.py --device cuda   # on a GPU (sizes up to 131,072 features)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import activations  # noqa: E402
import scaling  # noqa: E402
import train_loop  # noqa: E402
import train_step  # noqa: E402
from common import base_parser, markdown_table, write_results  # noqa: E402

BENCHES = ("train_step", "scaling", "activations", "train_loop")


def _ours(group: dict, name: str) -> dict | None:
    return next((c for c in group["contenders"] if c["name"] == name), None)


def goals(step: dict | None, acts: dict | None) -> list[list[str]]:
    """[goal, measured, met] rows for the issue's targets, from whatever was measured."""
    rows = []

    def add(goal: str, value: float | None, target: float, as_percent: bool = False) -> None:
        if value is None:
            rows.append([goal, "not measured", "–"])
            return
        shown = f"{100 * value:.0f}%" if as_percent else f"{value:.2f}×"
        rows.append([goal, shown, "met" if value >= target else "missed"])

    for group in (step or {}).get("groups", []):
        n, prec = group["n"], group["precision"]
        ratios = {r["ours"]: r for r in train_step.comparisons(group)}
        if group["family"] == "paper" and n in (4096, 16384):
            for regime in ("dense", "sparse"):
                for how in ("", ", CUDA graphs"):  # the latter on a GPU only
                    r = ratios.get(f"ours paper, {regime} codes{how}")
                    if r is None:
                        continue
                    what = f"paper n={n:,} {prec}, {regime} codes{how}"
                    add(f"{what}: ≥ 1.3× SAELens", r["vs_saelens"], 1.3)
                    if n == 4096:
                        add(f"{what}: ≥ 85% of the 5-GEMM limit", r["vs_limit"], 0.85, True)
                    else:
                        shown = "–" if r["vs_limit"] is None else f"{100 * r['vs_limit']:.0f}%"
                        rows.append([f"{what}: of the 5-GEMM limit (sparse can beat it)", shown, "measured"])
        if group["family"] == "topk" and n == 16384:
            for name in ("ours topk", "ours topk, CUDA graphs"):  # the latter on a GPU only
                r = ratios.get(name)
                if r is None:
                    continue
                how = ", CUDA graphs" if "graphs" in name else ""
                add(f"topk n={n:,} {prec}{how}: ≥ 2.5× sparsify", r["vs_sparsify"], 2.5)
                add(f"topk n={n:,} {prec}{how}: ≥ 5× SAELens", r["vs_saelens"], 5.0)
                add(f"topk n={n:,} {prec}{how}: ≥ 75% of the TopK limit", r["vs_limit"], 0.75, True)
    if acts:
        worst = max(h["overhead_vs_bare"] for h in acts["harvest"].values())
        rows.append(["harvest overhead over a bare forward ≤ 10%, quickstart LM (worst dtype)",
                     f"{100 * worst:+.1f}%", "met" if worst <= 0.10 else "missed"])
        smollm2 = acts.get("smollm2") or {}
        if "overhead_vs_bare" in smollm2:
            value = smollm2["overhead_vs_bare"]
            rows.append(["harvest overhead over a bare forward ≤ 10%, SmolLM2-135M layer 15",
                         f"{100 * value:+.1f}%", "met" if value <= 0.10 else "missed"])
        slowest = min(r["vs_fastest_trainer"] for r in acts["reader"].values())
        rows.append(["reader rows/s ≥ the fastest trainer's consumption (slowest dtype)", f"{slowest:.1f}×",
                     "met" if slowest >= 1 else "missed"])
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    args = parser.parse_args(argv)
    common = ["--device", args.device] + (["--quick"] if args.quick else []) + (
        ["--out", str(args.out)] if args.out else []) + (["--keep-freed-memory"] if args.keep_freed_memory else [])
    results = {}
    if "train_step" in args.only:
        results["train_step"] = train_step.main(common)
    if "scaling" in args.only:
        results["scaling"] = scaling.main(common)
    if "activations" in args.only:
        results["activations"] = activations.main(common)
    if "train_loop" in args.only:
        results["train_loop"] = train_loop.main(common)
    rows = goals(results.get("train_step"), results.get("activations"))
    results["goals"] = rows
    summary = {"goals": rows, "machine": next(iter(results.values()))["machine"] if results else None}
    write_results("goals", summary, args.out, args.quick)
    print("\n## Goals\n")
    print(markdown_table(["goal", "measured", ""], rows))
    return results


if __name__ == "__main__":
    main()
