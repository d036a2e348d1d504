"""A split tree drawn twice: static HTML (nested boxes, readable from disk) and a PNG.

Both read the tree that splitting.py puts in splitting.json: nodes {sae, n_features, feature,
density, top_tokens, cosine, correlation, n_children, children}. Token text goes through the
dashboard's `chip` (escaped, whitespace drawn); the PNG escapes `$` so matplotlib never reads
a token as mathtext.
"""

from __future__ import annotations

import html
from pathlib import Path

from framework.analysis.assets import STYLE
from framework.analysis.dashboard import DRAWN, chip
from framework.artifacts import atomic_save_figure, atomic_write_text

TREE_STYLE = """
ul.tree, ul.tree ul { list-style: none; margin: 0; padding-left: 1.6em; }
ul.tree li { position: relative; margin: 0.35em 0; }
ul.tree ul li:before { content: ""; position: absolute; left: -1.1em; top: 0.9em; width: 0.9em;
                       border-top: 1px solid #bbb; }
ul.tree ul { border-left: 1px solid #bbb; margin-left: 0.5em; }
.node { display: inline-block; border: 1px solid #ccd; border-radius: 4px; padding: 3px 8px; background: #fff; }
.node .id { font-weight: 600; } .node .edge { color: #1a7f37; font-variant-numeric: tabular-nums; }
"""


def write_tree_html(path: Path, data: dict) -> Path:
    tree = data["tree"]
    sizes = " → ".join(f"{html.escape(s)} ({n:,})" for s, n in zip(data["saes"], data["n_features"]))
    body = (
        f"<h1>Split tree: feature {tree['feature']} of {html.escape(tree['sae'])}</h1>\n"
        f'<p class="meta">{sizes} &middot; {data["n_tokens"]:,} tokens of {html.escape(data["split"])} text. '
        "Each feature's children are the features of the next larger dictionary that correlate with it best; "
        "r: activation correlation, cos: decoder cosine.</p>\n"
        f'<ul class="tree">{_node_html(tree)}</ul>'
    )
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Split tree {tree['feature']}</title><style>{STYLE}{TREE_STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )
    return atomic_write_text(path, page)


def _node_html(node: dict) -> str:
    edge = ""
    if node["correlation"] is not None:
        edge = f'<span class="edge">r {node["correlation"]:.2f} &middot; cos {node["cosine"]:.2f}</span> '
    tokens = " ".join(chip(t) for t, _ in node["top_tokens"]) or '<span class="muted">never fired</span>'
    hidden = node["n_children"] - len(node["children"])
    more = f'<li class="muted">{hidden} more in splitting.json</li>' if hidden > 0 else ""
    kids = "".join(_node_html(child) for child in node["children"])
    sub = f"<ul>{kids}{more}</ul>" if kids or more else ""
    return (
        f'<li><span class="node">{edge}<span class="id">{html.escape(node["sae"])} #{node["feature"]}</span> '
        f'<span class="muted">{100 * node["density"]:.3g}%</span> {tokens}</span>{sub}</li>'
    )


def write_tree_png(path: Path, data: dict) -> Path:
    """Levels top to bottom (smallest dictionary first), each node under its parent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions: list[tuple[dict, float, int]] = []
    _layout(data["tree"], 0, [0], positions)
    width = max(x for _, x, _ in positions) + 1
    depth = max(d for _, _, d in positions) + 1
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 * width), 1.0 + 1.7 * depth))
    where = {id(node): (x, -d) for node, x, d in positions}
    for node, x, d in positions:
        for child in node["children"]:
            cx, cy = where[id(child)]
            ax.plot([x, cx], [-d, cy], color="#999", linewidth=1, zorder=1)
            ax.text((x + cx) / 2, (-d + cy) / 2, f"r {child['correlation']:.2f}", fontsize=7, color="#1a7f37",
                    ha="center", va="center", backgroundcolor="white", zorder=2)
        tokens = " ".join(_plain(t) for t, _ in node["top_tokens"][:3])
        label = f"{node['sae']} #{node['feature']}\n{100 * node['density']:.2g}%  {tokens}"
        ax.text(x, -d, label, fontsize=7, ha="center", va="center", zorder=3,
                bbox={"boxstyle": "round", "facecolor": "#eef1f5", "edgecolor": "#99a"})
    ax.set_xlim(-0.7, width - 0.3)
    ax.set_ylim(-depth + 0.5, 0.5)
    ax.axis("off")
    ax.set_title(f"Split tree of feature {data['tree']['feature']} ({data['tree']['sae']})", fontsize=10)
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=120)


def _layout(node: dict, depth: int, next_leaf: list[int], out: list[tuple[dict, float, int]]) -> float:
    """Leaves take consecutive x slots; a parent sits above the middle of its children."""
    if not node["children"]:
        x = float(next_leaf[0])
        next_leaf[0] += 1
    else:
        xs = [_layout(child, depth + 1, next_leaf, out) for child in node["children"]]
        x = (xs[0] + xs[-1]) / 2
    out.append((node, x, depth))
    return x


def _plain(token: str) -> str:
    """A token for matplotlib text: invisible characters drawn, `$` kept literal, quoted."""
    return repr(token.translate(DRAWN)).replace("$", r"\$")
