"""`sae eval`: every trained SAE on held-out data, with and without the base LM.

Activation metrics stream the held-out store (or held-out contexts through the LM when there
is none), so memory stays bounded by one batch; the spliced metrics run `eval.n_contexts`
held-out contexts through the LM once per splice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from framework.activations.reader import ActivationStream, open_heldout_store
from framework.artifacts import atomic_write_text, is_complete, mark_complete, trained_weights_digest
from framework.config import Recipe, save_recipe
from framework.errors import DataError
from framework.evaluation.metrics import DensityCounter, density_summary, evaluate_sae, in_activation_units
from framework.evaluation.spliced import spliced_metrics
from framework.lm import load_lm
from framework.saved import TrainedSAE, load_saes_for_lm
from framework.text import iter_context_batches
from framework.training.report import plot_density

log = logging.getLogger(__name__)
ROWS_PER_BATCH = 4096


def heldout_activations(recipe: Recipe, model, hook: str, n_rows: int) -> list[torch.Tensor]:
    """Held-out rows of `hook`: from the store's heldout/ split, else straight from the LM."""
    store = open_heldout_store(recipe.store_location(), verify=recipe.harvest.verify_on_read)  # None: run the LM below
    if store is not None and hook in store.manifest.hook_points:
        # Rows, not fixed-size batches: a held-out split smaller than one batch (or the last
        # partial batch) would otherwise be dropped, leaving nothing or less than it holds.
        index, rows, out = store.manifest.hook_points.index(hook), 0, []
        for block in ActivationStream(store, ROWS_PER_BATCH, shuffle=False).iter_rows():
            out.append(block.acts[index][: n_rows - rows].float())
            rows += out[-1].shape[0]
            if rows >= n_rows:
                break
        if not rows:
            raise DataError(f"the held-out store {store.location} holds no rows; re-run `sae harvest RECIPE` "
                            f"with harvest.heldout_tokens > 0")
        return list(torch.cat(out).split(ROWS_PER_BATCH))
    rows, out = 0, []
    for _, tokens in iter_context_batches(recipe.text, model.tokenizer, "heldout", recipe.eval.batch_size):
        acts = model.run(tokens.to(model.device), capture=[hook], stop_at=hook).activations[hook]
        # The positions the SAE trained on (harvest's and the live stream's).
        out.append(acts[:, recipe.harvest.skip_first_tokens:].reshape(-1, acts.shape[-1]).float())
        rows += out[-1].shape[0]
        if rows >= n_rows:
            break
    if not out:
        raise DataError("no held-out text to evaluate on; raise text.heldout_fraction")
    return list(torch.cat(out)[:n_rows].split(ROWS_PER_BATCH))


def evaluate_one(recipe: Recipe, model, trained: TrainedSAE, token_batches) -> dict:
    device = next(trained.sae.parameters()).device  # store rows arrive on the CPU
    rows = heldout_activations(recipe, model, trained.hook_point, recipe.eval.n_tokens)
    n_rows = sum(len(b) for b in rows)
    if n_rows < recipe.eval.n_tokens:
        log.warning("eval.n_tokens=%d, but the held-out split has only %d rows of %s: %s's activation metrics "
                    "use those %d (raise harvest.heldout_tokens, or text.heldout_fraction, for more)",
                    recipe.eval.n_tokens, n_rows, trained.hook_point, trained.name, n_rows)
    batches = [b.to(device) * trained.input_scale for b in rows]
    metrics = in_activation_units(evaluate_sae(trained.sae, batches), trained.input_scale)
    metrics["heldout_rows"] = n_rows  # the rows the activation metrics are over (eval.n_tokens at most)
    counter = DensityCounter(trained.sae.n_features)
    with torch.no_grad():
        for x in batches:
            counter.update(trained.sae.encode(x))
    metrics.update(density_summary(counter.density()))
    metrics.update(spliced_metrics(model, trained, token_batches, recipe.harvest.skip_first_tokens))
    return {"metrics": metrics, "density": counter.density()}


def evaluate(recipe: Recipe) -> Path:
    out = recipe.path("eval")
    if is_complete(out, recipe, "eval"):
        log.info("evaluation in %s is complete; nothing to do", out)
        return out
    if recipe.harvest.split == "heldout" and not recipe.eval.sae_path:
        log.warning("harvest.split=heldout: these SAEs trained on the held-out split, so their held-out metrics "
                    "are of text they trained on")
    model = load_lm(recipe)
    weights = trained_weights_digest(recipe, "eval")  # of the files about to be read
    saes = load_saes_for_lm(recipe, model)
    token_batches = [t.to(model.device) for _, t in iter_context_batches(
        recipe.text, model.tokenizer, "heldout", recipe.eval.batch_size, 0, recipe.eval.n_contexts)]
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for trained in saes:
        log.info("evaluating %s", trained.name)
        result = evaluate_one(recipe, model, trained, token_batches)
        results[trained.name] = result["metrics"]
        plot_density(result["density"], out / f"{trained.name}_density.png", trained.name)
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=1))
    atomic_write_text(out / "report.md", eval_report(results))
    save_recipe(recipe, out)
    mark_complete(out, recipe, "eval", sae_weights=weights)
    return out


def eval_report(results: dict[str, dict]) -> str:
    lines = [
        "# Evaluation (held-out)", "",
        "| SAE | L0 | FVU | MSE | dead | loss clean | loss SAE | loss zero-abl. | loss explained | vs mean-abl. | KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['l0']:.1f} | {m['fvu']:.3f} | {m['mse']:.4g} | {m['dead_fraction']:.1%} | "
            f"{m['loss_clean']:.3f} | {m['loss_sae']:.3f} | {m['loss_zero_ablated']:.3f} | "
            f"{m['loss_explained']:.1%} | {m['loss_explained_vs_mean']:.1%} | {m['kl_sae']:.4f} |"
        )
    lines += [""] + [f"![{name} density]({name}_density.png)" for name in results]
    return "\n".join(lines) + "\n"
