"""The dashboard: a static HTML site rendered from features.json, readable straight from disk.

    dashboard/index.html          every feature that fired: density, max activation, top tokens,
                                  top logit tokens (and autointerp score); search and sort
    dashboard/neurons.html        the same for the MLP neurons (the baseline), when analysed
    dashboard/features/{i}.html   one page per analysed feature: histogram, logit effects,
                                  ablation, neuron composition, highlighted example contexts
    dashboard/neurons/{j}.html    the same for neurons

Pages hold no external references (styles and script are inline, see assets.py) so they open
with file:// and work offline. Every token string goes through `html.escape`: the default
corpus is Python source, full of `<`, `>` and `&`.

`write_dashboard` renders from the features.json data, so a later step (autointerp) can add
`autointerp.json` -- {"features": {"12": {"score": 0.61, "explanation": "..."}}, "neurons": ...}
-- and render again to show the scores without redoing the analysis.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from framework.analysis.assets import INDEX_SCRIPT, STYLE
from framework.artifacts import atomic_write_text

NAMES = {"features": "Feature", "neurons": "Neuron"}
INDEX_FILES = {"features": "index.html", "neurons": "neurons.html"}
INDEX_TOKENS = 3  # top tokens and logit tokens shown per row of the index


def write_dashboard(out: Path, data: dict | None = None) -> Path:
    """Render {out}/dashboard from `data` (default: {out}/features.json); returns index.html."""
    data = data if data is not None else json.loads((out / "features.json").read_text())
    scores_path = out / "autointerp.json"
    scores = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
    site = out / "dashboard"
    for kind, record in data["kinds"].items():
        (site / kind).mkdir(parents=True, exist_ok=True)
        kind_scores = scores.get(kind, {})
        atomic_write_text(site / INDEX_FILES[kind], index_page(data, kind, kind_scores))
        order = _page_order(record)
        for stale in set((site / kind).glob("*.html")) - {site / kind / f"{unit}.html" for unit in order}:
            stale.unlink()  # a page of an earlier analysis's unit, which this one does not page
        for i, unit in enumerate(order):
            neighbours = (order[i - 1] if i > 0 else None, order[i + 1] if i + 1 < len(order) else None)
            page = unit_page(data, kind, unit, kind_scores.get(str(unit), {}), neighbours)
            atomic_write_text(site / kind / f"{unit}.html", page)
    return site / "index.html"


def _page_order(record: dict) -> list[int]:
    """Units with pages, most active first (the order they were chosen in)."""
    paged = [u for u in record["units"] if u["page"]]
    return [u["id"] for u in sorted(paged, key=lambda u: -u["density"])]


# ---- pieces shared by every page ------------------------------------------------------------------


def _document(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>\n" if script else ""
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body>\n{body}\n{tail}</body></html>\n"
    )


# Characters that would otherwise show as nothing: newline and tab as arrows, other control
# characters (form feeds are common in Python source) as their Unicode "control pictures".
DRAWN = {**{i: 0x2400 + i for i in range(32)}, ord("\n"): "\u21b5", ord("\t"): "\u2192", 127: "\u2421"}


def visible(token: str) -> str:
    """A token as text a reader can see: invisible characters drawn, then HTML-escaped."""
    return html.escape(token.translate(DRAWN))


def chip(token: str) -> str:
    """A token on its own (tables): spaces drawn as middle dots so ' x' and 'x' differ."""
    dotted = visible(token).replace(" ", "\u00b7")
    return f'<span class="tok">{dotted}</span>'


def _number(x: float | None, fmt: str = ".3g") -> str:
    return "" if x is None else format(x, fmt)


def _percent(density: float) -> str:
    return f"{100 * density:.3g}%"


def _kind_nav(data: dict, prefix: str = "") -> str:
    links = [f'<a href="{prefix}{INDEX_FILES[k]}">All {k}</a>' for k in data["kinds"]]
    return " ".join(links)


# ---- index pages ------------------------------------------------------------------------------------


def index_page(data: dict, kind: str, scores: dict) -> str:
    record = data["kinds"][kind]
    name = NAMES[kind]
    alive = sorted((u for u in record["units"] if u["density"]), key=lambda u: -u["density"])
    has_logits = any(u["logits"] for u in alive)
    has_composition = any(u["composition"] for u in alive)
    headers = [(name, "num"), ("Density", "num"), ("Max act.", "num"), ("Top tokens", "text")]
    headers += [("Top logit effects", "text")] if has_logits else []
    headers += [("Neurons for 90%", "num")] if has_composition else []
    headers += [("Interp. score", "num")] if scores else []
    sorted_by = ' data-dir="desc"'  # rows start most active first
    head = "".join(f'<th class="sortable" data-type="{t}"{sorted_by if h == "Density" else ""}>{h}</th>'
                   for h, t in headers)
    rows = "\n".join(_index_row(kind, u, has_logits, has_composition, scores) for u in alive)
    summary = record["density_summary"]
    body = f"""<nav>{_kind_nav(data)}</nav>
<h1>{html.escape(data["sae"])}: {kind}</h1>
<p class="meta">hook <code>{html.escape(data["hook_point"])}</code> &middot; {data["n_tokens"]:,} tokens of
{html.escape(data["split"])} text &middot; {len(alive):,} of {record["n_units"]:,} {kind} fired
({record["n_dead"]:,} never did) &middot; dense (&gt;10% of tokens): {_percent(summary["dense_fraction"] or 0)}
&middot; median log10 density {_number(summary["median_log10_density"])}</p>
<p class="muted">Pages exist for the {sum(u["page"] for u in alive):,} most active; click a column to sort.</p>
<input id="search" type="search" placeholder="Search ids and tokens" aria-label="Search"><span id="count"></span>
<table id="units"><thead><tr>{head}</tr></thead>
<tbody>
{rows}
</tbody></table>"""
    return _document(f"{data['sae']}: {kind}", body, INDEX_SCRIPT)


def _index_row(kind: str, unit: dict, has_logits: bool, has_composition: bool, scores: dict) -> str:
    uid = unit["id"]
    label = f'<a href="{kind}/{uid}.html">{uid}</a>' if unit["page"] else str(uid)
    cells = [
        f'<td class="num" data-v="{uid}">{label}</td>',
        f'<td class="num" data-v="{unit["density"]}">{_percent(unit["density"])}</td>',
        f'<td class="num" data-v="{unit["max_activation"]}">{_number(unit["max_activation"])}</td>',
        f'<td>{" ".join(chip(t) for t, _ in unit["top_tokens"][:INDEX_TOKENS])}</td>',
    ]
    if has_logits:
        top = unit["logits"]["top"][:INDEX_TOKENS] if unit["logits"] else []
        cells.append(f'<td>{" ".join(chip(t) for t, _ in top)}</td>')
    if has_composition:
        n90 = unit["composition"]["n90"] if unit["composition"] else ""
        cells.append(f'<td class="num" data-v="{n90}">{n90}</td>')
    if scores:
        score = scores.get(str(uid), {}).get("score")
        cells.append(f'<td class="num" data-v="{"" if score is None else score}">{_number(score, ".2f")}</td>')
    return f"<tr>{''.join(cells)}</tr>"


# ---- unit pages ---------------------------------------------------------------------------------------


def unit_page(data: dict, kind: str, unit: int, score: dict, neighbours: tuple[int | None, int | None]) -> str:
    record = data["kinds"][kind]
    info = record["units"][unit]
    page = record["pages"][str(unit)]
    name = f"{NAMES[kind]} {unit}"
    previous, following = neighbours
    nav = [_kind_nav(data, "../")]
    nav += [f'<a href="{previous}.html">&larr; {NAMES[kind].lower()} {previous}</a>'] if previous is not None else []
    nav += [f'<a href="{following}.html">{NAMES[kind].lower()} {following} &rarr;</a>'] if following is not None else []
    fires = sum(info["histogram"])  # exact: the density is rounded to 4 digits
    explanation = ""
    if score:
        explanation = (f'<p><b>Explanation</b> (autointerp, score {_number(score.get("score"), ".2f")}): '
                       f'{html.escape(str(score.get("explanation", "")))}</p>')
    panels = [
        f"<section><h2>Activation histogram</h2>{histogram_svg(info['histogram'], data['histogram_log10_edges'])}</section>",
        _logit_panel(info["logits"], data["hook_point"]),
        _ablation_panel(page["ablation"]),
        _composition_panel(info["composition"], data),
    ]
    peak = info["max_activation"] or 1.0
    intervals = "\n".join(
        f'<h3 class="meta">{_number(iv["low"])} &ndash; {_number(iv["high"])}</h3>{_examples_table(iv["examples"], peak)}'
        for iv in page["intervals"] if iv["examples"]
    )
    body = f"""<nav>{" ".join(nav)}</nav>
<h1>{name}</h1>
<p class="meta">{html.escape(data["sae"])} &middot; <code>{html.escape(data["hook_point"])}</code> &middot;
density {_percent(info["density"])} ({fires:,} of {data["n_tokens"]:,} tokens) &middot;
max activation {_number(info["max_activation"])}</p>
{explanation}
<div class="grid">{"".join(p for p in panels if p)}</div>
<h2>Top activations</h2>
{_examples_table(page["top"], peak)}
<h2>Activation intervals</h2>
<p class="muted">Examples drawn uniformly from equal intervals between 0 and the max activation.</p>
{intervals}
<h2>Random firing examples</h2>
{_examples_table(page["random"], peak)}"""
    return _document(f"{name} - {data['sae']}", body)


def _examples_table(examples: list[dict], peak: float) -> str:
    if not examples:
        return '<p class="muted">none</p>'
    rows = "\n".join(
        f'<tr><td class="act">{_number(e["activation"])}</td><td class="ex">{highlighted(e, peak)}</td></tr>'
        for e in examples
    )
    return f'<table class="examples"><tbody>\n{rows}\n</tbody></table>'


def highlighted(example: dict, peak: float) -> str:
    """The example's window, each token's background as strong as its activation (of the max)."""
    spans = []
    for i, (token, act) in enumerate(zip(example["tokens"], example["activations"])):
        alpha = min(max((act or 0.0) / peak, 0.0), 1.0)
        style = f' style="background:rgba(255,127,14,{alpha:.2f})"' if alpha > 0.005 else ""
        focus = ' class="focus"' if i == example["focus"] else ""
        spans.append(f'<span{focus}{style} title="{_number(act)}">{visible(token)}</span>')
    return "".join(spans)


def histogram_svg(counts: list[int], edges: list[float], width: int = 520, height: int = 150) -> str:
    """Counts per log-spaced bin as bars, trimmed to the bins that hold anything."""
    used = [i for i, c in enumerate(counts) if c]
    if not used:
        return '<p class="muted">never fired</p>'
    lo, hi = max(used[0] - 1, 0), min(used[-1] + 2, len(counts))
    top, bins = max(counts), hi - lo
    plot_h, bar_w = height - 22, width / bins
    bars = []
    for i in range(lo, hi):
        h = plot_h * counts[i] / top
        x = (i - lo) * bar_w
        tip = f"10^{edges[i]:.3g}..10^{edges[i + 1]:.3g}: {counts[i]:,}"
        bars.append(f'<rect x="{x:.1f}" y="{plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                    f'height="{h:.1f}" fill="#f28e2b"><title>{tip}</title></rect>')
    ticks = []
    for i in range(lo, hi + 1):
        if float(edges[i]).is_integer():
            x = (i - lo) * bar_w
            ticks.append(f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle">1e{int(edges[i])}</text>')
    return (f'<svg width="100%" viewBox="-12 0 {width + 24} {height}" role="img" '
            f'aria-label="activation histogram">{"".join(bars)}'
            f'<line x1="0" y1="{plot_h}" x2="{width}" y2="{plot_h}" stroke="#999"/>{"".join(ticks)}</svg>')


def _token_table(title: str, pairs: list, css: str) -> str:
    rows = "".join(f'<tr><td>{chip(t)}</td><td class="num {css}">{_number(v, "+.3g")}</td></tr>' for t, v in pairs)
    return f"<table><thead><tr><th>{title}</th><th></th></tr></thead><tbody>{rows}</tbody></table>"


def _logit_panel(logits: dict | None, hook_point: str) -> str:
    if not logits:
        return ""
    # The readout (logits.readout): through the MLP's output weights only from its hidden layer.
    through = " &middot; W<sub>out</sub>" if hook_point.endswith("mlp.hook_post") else ""
    return (
        f"<section><h2>Logit effects</h2><p class=\"muted\">direction{through} &middot; "
        "W<sub>U</sub>: tokens this unit pushes up and down directly</p><div class=\"grid\">"
        f"{_token_table('promoted', logits['top'], 'pos')}{_token_table('suppressed', logits['bottom'], 'neg')}"
        "</div></section>"
    )


def _ablation_panel(ablation: dict | None) -> str:
    if not ablation:
        return ""
    examples = [e for e in ablation["examples"] if e["next_token"] is not None]
    worst = sorted(examples, key=lambda e: e["delta"])[:5]
    moved = "".join(f'<tr><td>{chip(e["next_token"])}</td><td class="num">{_number(e["delta"], "+.3g")}</td></tr>'
                    for e in worst)
    return (
        "<section><h2>Ablation</h2><p class=\"muted\">removing this unit on its top examples: change in "
        f"log p(next token), mean <b>{_number(ablation['mean_delta'], '+.3g')}</b></p>"
        f"<div class=\"grid\">{_token_table('log p falls most', ablation['promoted'][:5], 'neg')}"
        f"{_token_table('log p rises most', ablation['suppressed'][:5], 'pos')}</div>"
        f"<table><thead><tr><th>next token in text</th><th>&Delta; log p</th></tr></thead><tbody>{moved}</tbody></table>"
        "</section>"
    )


def _composition_panel(composition: dict | None, data: dict) -> str:
    if not composition:
        return ""
    neuron_pages = {u["id"] for u in data["kinds"].get("neurons", {}).get("units", []) if u["page"]}

    def neuron(n: int) -> str:
        return f'<a href="../neurons/{n}.html">{n}</a>' if n in neuron_pages else str(n)

    rows = "".join(f'<tr><td>{neuron(n)}</td><td class="num">{_number(w, "+.3f")}</td></tr>' for n, w in composition["top"])
    return (
        "<section><h2>Neuron composition</h2><p class=\"muted\">"
        f"{composition['n50']} neurons carry 50% of the decoder direction's squared norm, "
        f"{composition['n90']} carry 90%; effective number {_number(composition['effective'])}</p>"
        f"<table><thead><tr><th>neuron</th><th>weight</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )
