"""What a finished training run leaves behind for people: metrics, plots, a markdown report.

Beside L0 and FVU every report shows the fraction of features that moved away from their
initialisation (decoder cosine to init below 0.9): a short run can reach a good-looking loss
while most features never left their random start, and only this number shows it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from framework.evaluation.metrics import density_summary  # noqa: E402
from framework.training.callbacks import FeatureDensity, HeldoutEval  # noqa: E402

MOVED_COSINE = 0.9


def moved_fraction(W_dec: torch.Tensor, W_dec_init: torch.Tensor) -> float:
    """Fraction of features whose decoder row has cosine < 0.9 with its initial value."""
    cos = torch.nn.functional.cosine_similarity(W_dec.float(), W_dec_init.float(), dim=1)
    return (cos < MOVED_COSINE).float().mean().item()


def plot_density(density: torch.Tensor, path: Path, title: str) -> Path:
    """The paper's log10 feature-density histogram (dead features counted separately)."""
    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(alive):
        ax.hist(torch.log10(alive).numpy(), bins=60, color="#3b6ea5")
    dead = int((density == 0).sum())
    ax.set_xlabel("log10(feature density)")
    ax.set_ylabel("features")
    ax.set_title(f"{title} ({dead} dead of {len(density)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_csv_log(out: Path) -> list[dict]:
    path = out / "logs" / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def plot_curves(rows: list[dict], names: list[str], path: Path) -> Path | None:
    panels = [("loss", "loss"), ("l0", "L0"), ("fvu", "FVU (batch)"), ("dead_fraction", "dead fraction")]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels):
        for name in names:
            points = [(int(r["step"]), float(r[f"{name}/{key}"])) for r in rows if r.get(f"{name}/{key}")]
            if points:
                ax.plot(*zip(*points), label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
        if key in ("loss", "l0"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_training_outputs(recipe, module, trainer, out: Path) -> dict[str, dict]:
    from framework.training.train import save_sae

    density_cb = next(c for c in trainer.callbacks if isinstance(c, FeatureDensity))
    eval_cb = next(c for c in trainer.callbacks if isinstance(c, HeldoutEval))
    summary = {}
    for name, sae in module.saes.items():
        directory = out / name
        hook = module.hook_of[name]
        save_sae(sae, name, hook, module.input_scales[hook], recipe, directory)
        init = load_file(str(directory / "init_decoder.safetensors"))["W_dec"]
        density = density_cb.last.get(name, module.stats[name].density().float().cpu())
        metrics = {
            "steps": trainer.global_step,
            "tokens": trainer.global_step * recipe.train.batch_size,
            "n_features": sae.n_features,
            "variant": sae.cfg.variant,
            "hook_point": hook,
            **eval_cb.results.get(name, {}),
            **density_summary(density),
            "moved_fraction": moved_fraction(sae.W_dec.detach().cpu(), init),
        }
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=1))
        plot_density(density, directory / "density.png", name)
        summary[name] = metrics
    plot_curves(read_csv_log(out), list(module.saes), out / "training_curves.png")
    (out / "report.md").write_text(training_report(summary, out))
    return summary


def training_report(summary: dict[str, dict], out: Path) -> str:
    lines = [
        "# Training report", "",
        "| SAE | features | L0 | FVU | MSE | dead | moved from init | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary.items():
        lines.append(
            f"| {name} | {m['n_features']} | {m.get('l0', float('nan')):.1f} | {m.get('fvu', float('nan')):.3f} | "
            f"{m.get('mse', float('nan')):.4g} | {m['dead_fraction']:.1%} | {m['moved_fraction']:.1%} | {m['steps']} |"
        )
    lines += ["", "![training curves](training_curves.png)", ""]
    lines += [f"![{name} density]({name}/density.png)" for name in summary]
    return "\n".join(lines) + "\n"
