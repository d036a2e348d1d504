"""report.md: the analysis in a page -- how features and neurons compare, and a few features.

`sae run` inlines this page into the run's report, so it stays short: the density picture,
the composition and ablation medians that bear on "features are not neurons", and the most
active features with their top tokens and top logit effects, each linked to its dashboard page.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from framework.analysis.dashboard import DRAWN
from framework.artifacts import atomic_write_text

N_SHOWN = 8  # features listed in the report


def write_report(out: Path, data: dict) -> Path:
    return atomic_write_text(out / "report.md", report_text(data))


def report_text(data: dict) -> str:
    lines = [
        f"# Analysis: {data['sae']}", "",
        f"`{data['hook_point']}`, {data['n_tokens']:,} tokens of {data['split']} text "
        f"([dashboard](dashboard/index.html), [features.json](features.json)).", "",
        "| units | fired | dense (>10%) | median log10 density | median Δ log p when ablated | median neurons for 90% |",
        "|---|---|---|---|---|---|",
    ]
    for kind, record in data["kinds"].items():
        lines.append(_comparison_row(kind, record))
    lines += ["", "Most active features:", "", "| feature | density | max act. | top tokens | top logit effects |",
              "|---|---|---|---|---|"]
    features = data["kinds"]["features"]
    paged = sorted((u for u in features["units"] if u["page"]), key=lambda u: -u["density"])
    for unit in paged[:N_SHOWN]:
        logits = ", ".join(_code(t) for t, _ in unit["logits"]["top"][:5]) if unit["logits"] else "n/a"
        lines.append(
            f"| [{unit['id']}](dashboard/features/{unit['id']}.html) | {100 * unit['density']:.3g}% | "
            f"{unit['max_activation']:.3g} | {', '.join(_code(t) for t, _ in unit['top_tokens'][:5])} | {logits} |"
        )
    timings = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in data["timings_s"].items())
    lines += ["", f"Time: {timings}."]
    return "\n".join(lines) + "\n"


def _comparison_row(kind: str, record: dict) -> str:
    fired = record["n_units"] - record["n_dead"]
    summary = record["density_summary"]
    deltas = [p["ablation"]["mean_delta"] for p in record["pages"].values()
              if p["ablation"] and p["ablation"]["mean_delta"] is not None]
    n90 = [u["composition"]["n90"] for u in record["units"] if u["composition"] and u["density"]]
    return (
        f"| {kind} | {fired:,} of {record['n_units']:,} | {100 * (summary['dense_fraction'] or 0):.1f}% | "
        f"{_median(summary['median_log10_density'])} | {_median(deltas)} | {_median(n90)} |"
    )


def _median(values) -> str:
    if values is None or values == []:
        return "n/a"
    value = statistics.median(values) if isinstance(values, list) else values
    return f"{value:.3g}"


def _code(token: str) -> str:
    """A token as inline markdown code, invisible characters drawn, pipes escaped for tables."""
    text = token.translate(DRAWN).replace("|", "\\|").replace("`", "'")
    return f"`{text}`"
