"""`sae export`: trained SAEs in SAELens's on-disk format, and SAELens SAEs back in for `sae eval`.

SAELens's directory (`cfg.json` + `sae_weights.safetensors`) is what the interpretability tools
around it read, so an export there makes our SAEs usable without this package, and reading the
same format lets `sae eval` score someone else's SAE with our metrics (`eval.sae_path`).

The two formats differ in two ways, and both are resolved in the weights rather than in code a
reader of the export would have to run:

- Input scale. The framework trains on `x * s` (`input_scale`, from `train.normalize_activations`)
  and divides reconstructions by s. Every variant encodes `(x s - b_dec) W_enc + ...`, which equals
  `(x - b_dec/s)(s W_enc) + ...`, and decodes `(f W_dec + b_dec)/s = f (W_dec/s) + b_dec/s`. So the
  export stores `s W_enc`, `W_dec / s`, `b_dec / s` and takes raw activations. Pre-activations are
  unchanged, so thresholds, gates and top-k selections carry over as they are.
- Variant parameters. Each variant maps onto the SAELens inference architecture that computes the
  same encode (see `ARCHITECTURE`): jumprelu's `log_threshold` becomes `threshold = exp(.)`,
  batchtopk's eval-time global threshold becomes a per-feature JumpReLU threshold (SAELens saves
  its own BatchTopK SAEs the same way), gated's gate bias `b_enc` is SAELens's `b_gate`.

On import the inverse runs, and SAELens options the framework's SAEs do not have are folded into
the weights where that is exact (`apply_b_dec_to_input: false`, TopK's
`rescale_acts_by_decoder_norm`) and refused otherwise (activation normalisation, hook_z reshaping).
Nothing here imports sae_lens: the format is written and read with json and safetensors only, so
nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from framework.artifacts import (
    differences_from,
    fingerprint_digest,
    is_complete,
    load_saved_recipe,
    mark_complete,
    stage_fingerprint,
    trained_weights_digest,
)
from framework.config import Recipe, RecipeError, SAEConfig, save_recipe
from framework.errors import CheckpointError
from framework.sae import SAE, build_sae
from framework.saved import TrainedSAE, load_trained_saes

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The cfg.json layout written here is SAELens 6's (hook and model under `metadata`); SAELens
# treats a config without a version as pre-6 and renames its keys.
SAELENS_FORMAT_VERSION = "6.0.0"

# Framework variant -> the SAELens inference architecture with the same encode.
ARCHITECTURE: dict[str, str] = {
    "paper": "standard",
    "april2024": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "gated": "gated",
}
# SAELens architecture -> the variant an SAE of it is imported as, unless the cfg.json is one of
# our exports and names its variant. SAELens trains `standard` with a decoder-norm-weighted L1 and
# no decoder constraint: the April 2024 update.
IMPORTED_VARIANT: dict[str, str] = {
    "standard": "april2024",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
}
# The tensors each SAELens architecture stores; all but the first three are (d_sae,).
_MATRICES = ("W_enc", "W_dec", "b_dec")
SAELENS_TENSORS: dict[str, tuple[str, ...]] = {
    "standard": (*_MATRICES, "b_enc"),
    "topk": (*_MATRICES, "b_enc"),
    "jumprelu": (*_MATRICES, "b_enc", "threshold"),
    "gated": (*_MATRICES, "b_gate", "b_mag", "r_mag"),
}


# --------------------------------------------------------------------------------------------
# Export


def export(recipe: Recipe) -> Path:
    """Write every SAE of the trained bank to `{export dir}/<name>/` in SAELens's format."""
    out = recipe.path("export")
    _check_output_dir(out)
    if is_complete(out, recipe, "export"):
        log.info("export in %s is complete; nothing to do", out)
        return out
    _check_recipe_file(out, recipe)
    # The bank, even when eval.sae_path points `sae eval` at an imported SAE.
    bank = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, sae_path=""))
    weights = trained_weights_digest(recipe, "export")  # of the files about to be read
    trained = load_trained_saes(bank, for_export=True)
    # Which export wrote a directory: a re-run replaces only its own SAEs, never a folder of the user's.
    metadata = saelens_metadata(recipe) | {"framework_export": fingerprint_digest(stage_fingerprint(recipe, "export"))}
    for sae in trained:
        export_sae(sae, out / sae.name, metadata)
        log.info("exported %s to %s", sae.name, out / sae.name)
    save_recipe(recipe, out)
    mark_complete(out, recipe, "export", saes=[s.name for s in trained], sae_weights=weights)
    return out


def _check_recipe_file(out: Path, recipe: Recipe) -> None:
    """Refuse, before writing anything, to replace a recipe.yaml in export.output_dir that no
    export of this recipe wrote (the user's own file, or another recipe's); an interrupted export
    of this recipe left one that is replaced."""
    path = out / "recipe.yaml"
    if not path.is_file():
        return
    try:
        differences = differences_from(stage_fingerprint(load_saved_recipe(path), "export"), recipe, "export")
    except RecipeError as err:
        differences = [f"it is not a recipe ({str(err).splitlines()[0]})"]
    if differences:
        raise RecipeError(
            f"{path} exists and was not written by an export of this recipe ({'; '.join(differences[:3])}); "
            f"the export writes its recipe there. Set export.output_dir to another directory, or move the file away"
        )


def _check_output_dir(out: Path) -> None:
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise RecipeError(
                f"export.output_dir is {out}, but {path} is a file, not a directory. Set export.output_dir "
                f"to a directory (existing or new), or move the file away"
            )


def _foreign_contents(directory: Path, name: str, export_id: str | None) -> str | None:
    """Why `directory` is not an earlier export of SAE `name` by this export (None when it is one).

    An export writes exactly cfg.json and sae_weights.safetensors, and its cfg.json names the SAE
    and (when written by `sae export`) the recipe fingerprint of the export."""
    if directory.is_symlink():
        return "it is a symbolic link"
    if not directory.is_dir():
        return "it is a file, not a directory"
    entries = [p.name for p in directory.iterdir()]
    if not entries:
        return None  # nothing to lose
    extra = sorted(n for n in entries if n not in (CFG_FILE, WEIGHTS_FILE))
    if extra:
        return f"it holds files an export does not write ({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})"
    try:
        meta = json.loads((directory / CFG_FILE).read_text()).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        return f"it has no readable {CFG_FILE} written by `sae export`"
    if meta.get("framework_name") != name:
        return f"its {CFG_FILE} is not an export of SAE {name!r}"
    if meta.get("framework_export") != export_id:
        return "it was exported with a different recipe"
    return None


def saelens_metadata(recipe: Recipe) -> dict[str, Any]:
    """What SAELens records about how an SAE's activations were made, from the recipe."""
    return {
        "model_name": recipe.lm.name,
        "context_size": recipe.text.context_length,
        "prepend_bos": False,  # contexts are documents packed with EOS separators, no BOS
        "seqpos_slice": [recipe.harvest.skip_first_tokens, None],
        "dataset_path": recipe.text.source,
    }


def export_sae(trained: TrainedSAE, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """One SAE as an SAELens directory that takes raw activations (input_scale folded in).

    An existing `directory` is replaced only if it is this SAE exported earlier by the same export
    (same `framework_export` in `metadata`); anything else there is refused, never deleted."""
    directory = Path(directory)
    if directory.exists() or directory.is_symlink():
        why = _foreign_contents(directory, trained.name, (metadata or {}).get("framework_export"))
        if why is not None:
            raise RecipeError(
                f"cannot export SAE {trained.name!r} to {directory}: it already exists and {why}, so it is not "
                f"an earlier export of this recipe and is left as it is. Set export.output_dir to another "
                f"directory, or move {directory} away (delete it if it is an old export you no longer need)"
            )
    architecture = ARCHITECTURE[trained.sae.variant]
    cfg = saelens_config(trained, architecture, metadata or {})
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(saelens_tensors(trained), str(tmp / WEIGHTS_FILE))
    (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=1))
    if directory.exists():
        shutil.rmtree(directory)  # checked above: this SAE's own earlier export
    tmp.rename(directory)
    return directory


def saelens_config(trained: TrainedSAE, architecture: str, metadata: dict[str, Any]) -> dict[str, Any]:
    sae = trained.sae
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.n_features,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,  # every variant encodes x - b_dec
        "normalize_activations": "none",  # input_scale is folded into the weights
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,  # trained by this framework, not SAELens
            **metadata,
            "hook_name": trained.hook_point,
            "hook_head_index": None,
            "framework_name": trained.name,
            "framework_sae": dataclasses.asdict(sae.cfg) | {"d_in": sae.d_in},
            "framework_input_scale_folded": trained.input_scale,
        },
    }
    if architecture == "topk":
        cfg |= {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
    return cfg


@torch.no_grad()
def saelens_tensors(trained: TrainedSAE) -> dict[str, Tensor]:
    """The SAE's weights renamed for SAELens, with input_scale s folded in."""
    sae, s = trained.sae, trained.input_scale
    tensors = {"W_enc": sae.W_enc.float() * s, "W_dec": sae.W_dec.float() / s, "b_dec": sae.b_dec.float() / s}
    if sae.variant == "gated":
        tensors |= {"b_gate": sae.b_enc, "b_mag": sae.b_mag, "r_mag": sae.r_mag}
    else:
        tensors["b_enc"] = sae.b_enc
    if sae.variant == "jumprelu":
        tensors["threshold"] = sae.threshold()
    if sae.variant == "batchtopk":
        # Eval-mode BatchTopK keeps z > max(θ, 0): a JumpReLU with that threshold everywhere.
        tensors["threshold"] = sae.threshold.clamp_min(0).expand(sae.n_features)
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


# --------------------------------------------------------------------------------------------
# Import


def load_saelens_sae(path: str | Path, device: str | torch.device = "cpu", recipe: Recipe | None = None) -> TrainedSAE:
    """An SAELens-format directory as a framework SAE reading raw activations (input_scale 1);
    with the `recipe` that will evaluate it, a warning where its inputs fall outside the SAE's."""
    path = Path(path)
    cfg = _read_saelens_config(path)
    if recipe is not None:
        _warn_of_other_inputs(path, cfg["metadata"], recipe)
    architecture = cfg["architecture"]
    tensors = _read_saelens_tensors(path, cfg)
    _fold_saelens_options(architecture, cfg, tensors)
    sae_cfg = _framework_config(path, cfg)
    sae = build_sae(int(cfg["d_in"]), sae_cfg)
    _load_weights(sae, _framework_tensors(sae_cfg.variant, architecture, tensors, path), path)
    name = cfg["metadata"].get("framework_name") or path.name
    return TrainedSAE(name, sae.to(device).eval(), sae_cfg.hook_point, 1.0)


def _warn_of_other_inputs(path: Path, meta: dict[str, Any], recipe: Recipe) -> None:
    """An imported SAE is evaluated on this recipe's contexts (no BOS, text.context_length,
    positions from harvest.skip_first_tokens): say where its cfg.json's `meta`data records others
    it was trained on, since its metrics then describe it on inputs it never saw."""
    ours = saelens_metadata(recipe)
    differ = []  # only what puts this recipe's inputs outside the SAE's: a subset of them is fine
    if meta.get("prepend_bos") is not None and meta["prepend_bos"] != ours["prepend_bos"]:
        differ.append(f"prepend_bos {meta['prepend_bos']!r} (this recipe: {ours['prepend_bos']!r})")
    if meta.get("context_size") is not None and meta["context_size"] < ours["context_size"]:
        differ.append(f"context_size {meta['context_size']} (this recipe: text.context_length="
                      f"{ours['context_size']})")
    start = (meta.get("seqpos_slice") or [None])[0]
    if start is not None and start > ours["seqpos_slice"][0]:
        differ.append(f"seqpos_slice from position {start} (this recipe: harvest.skip_first_tokens="
                      f"{ours['seqpos_slice'][0]})")
    if differ:
        log.warning("%s was trained on other inputs than this recipe evaluates it on: %s. Its metrics describe it "
                    "on these inputs; set text.context_length and harvest.skip_first_tokens to match where you "
                    "can (contexts here never start with BOS)", path, "; ".join(differ))


def _read_saelens_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist or is not a directory: eval.sae_path names an SAELens SAE "
                              f"directory ({CFG_FILE} and {WEIGHTS_FILE}, as `sae export` or SAELens's save_model write)")
    for file in (CFG_FILE, WEIGHTS_FILE):
        if not (path / file).is_file():
            raise CheckpointError(
                f"{path} is not an SAELens SAE directory: {file} is missing "
                f"(expected {CFG_FILE} and {WEIGHTS_FILE}, as `sae export` or SAELens's save_model write)"
            )
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot parse {path / CFG_FILE}: {err}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("metadata") or {}, dict):
        raise CheckpointError(f"{path / CFG_FILE} is not an SAELens config: a JSON object (with `metadata` an "
                              f"object) is expected")
    cfg["metadata"] = cfg.get("metadata") or {}
    _check_supported(path, cfg)
    return cfg


def _check_supported(path: Path, cfg: dict[str, Any]) -> None:
    where = path / CFG_FILE
    if pre_6 := _written_before_saelens_6(cfg):
        raise CheckpointError(
            f"{where} was written by SAELens < 6 ({pre_6}); its fields mean other things there (an "
            f"architecture 'standard' with activation_fn_str 'topk' is a TopK SAE). Load and re-save it with "
            f"SAELens >= 6 (SAE.load_from_disk(path).save_model(path)) to import it"
        )
    if cfg["architecture"] not in IMPORTED_VARIANT:
        raise CheckpointError(
            f"{where}: architecture {cfg['architecture']!r} is not supported; "
            f"supported: {', '.join(IMPORTED_VARIANT)}"
        )
    for key in ("d_in", "d_sae"):
        if key not in cfg:
            raise CheckpointError(f"{where} lacks {key!r}")
    if _hook_name(cfg) is None:
        raise CheckpointError(f"{where} names no hook (metadata.hook_name)")
    if cfg["architecture"] == "topk" and "k" not in cfg:
        raise CheckpointError(f"{where}: a topk SAE without `k` (features active per row); add it to {CFG_FILE}")
    norm = cfg.get("normalize_activations", "none")
    if norm != "none":
        raise CheckpointError(
            f"{where}: normalize_activations={norm!r} is not supported (only 'none'; "
            f"'expected_average_only_in', 'constant_norm_rescale', 'layer_norm' and "
            f"'covariance_whitening' are not). Fold a scaling factor or whitening into the weights in "
            f"SAELens (fold_activation_norm_scaling_factor, fold_activation_whitening) and save again"
        )
    if cfg.get("reshape_activations", "none") != "none" or cfg["metadata"].get("hook_head_index") is not None:
        raise CheckpointError(f"{where}: hook_z reshaping and per-head SAEs are not supported")


def _written_before_saelens_6(cfg: dict[str, Any]) -> str:
    """Why cfg.json looks like SAELens < 6's ("" where it does not): no `architecture`, an
    earlier version named, or the activation fields SAELens 6 replaced by architectures."""
    if "architecture" not in cfg:
        return "it names no `architecture`"
    for key in ("sae_lens_version", "sae_lens_training_version"):
        version = cfg.get(key) or cfg["metadata"].get(key)
        if isinstance(version, str) and version.split(".")[0].isdigit() and int(version.split(".")[0]) < 6:
            return f"{key} {version}"
    for key in ("activation_fn_str", "activation_fn"):
        if key in cfg:
            return f"it sets {key}={cfg[key]!r}"
    return ""


def _hook_name(cfg: dict[str, Any]) -> str | None:
    return cfg["metadata"].get("hook_name") or cfg.get("hook_name")


def _read_saelens_tensors(path: Path, cfg: dict[str, Any]) -> dict[str, Tensor]:
    try:
        tensors = {k: v.float() for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
    except Exception as err:  # safetensors raises its own SafetensorError on a corrupt file
        raise CheckpointError(f"cannot read {path / WEIGHTS_FILE}: {err}") from None
    if cfg["architecture"] == "jumprelu" and "log_threshold" in tensors:  # older SAELens files
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    expected = _saelens_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path / WEIGHTS_FILE} does not hold a {cfg['architecture']} SAE: "
            f"missing {missing}, unexpected {unexpected}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(
                f"{path / WEIGHTS_FILE}: {key} has shape {tuple(tensors[key].shape)}, but cfg.json "
                f"(d_in={cfg['d_in']}, d_sae={cfg['d_sae']}) needs {shape}"
            )
    return tensors


def _saelens_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, n = int(cfg["d_in"]), int(cfg["d_sae"])
    matrices = {"W_enc": (d, n), "W_dec": (n, d), "b_dec": (d,)}
    return {key: matrices.get(key, (n,)) for key in SAELENS_TENSORS[cfg["architecture"]]}


@torch.no_grad()
def _fold_saelens_options(architecture: str, cfg: dict[str, Any], t: dict[str, Tensor]) -> None:
    """Rewrite weights in place so the SAE computes the same thing without these options."""
    if not cfg.get("apply_b_dec_to_input", True):
        # x W + b = (x - b_dec) W + (b + b_dec W): our SAEs always subtract b_dec.
        shift = t["b_dec"] @ t["W_enc"]  # (n,)
        if architecture == "gated":
            t["b_gate"] += shift
            t["b_mag"] += shift * t["r_mag"].exp()
        else:
            t["b_enc"] += shift
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # Selection on z·‖W_dec,j‖ and decoding f/‖W_dec,j‖: unit decoder rows, scaled encoder.
        norm = torch.linalg.vector_norm(t["W_dec"], dim=1)  # (n,)
        t["W_enc"] *= norm
        t["b_enc"] *= norm
        t["W_dec"] /= norm[:, None]


def _framework_config(path: Path, cfg: dict[str, Any]) -> SAEConfig:
    architecture, meta = cfg["architecture"], cfg["metadata"]
    ours = meta.get("framework_sae") or {}
    if ARCHITECTURE.get(ours.get("variant")) == architecture:
        fields = {k: v for k, v in ours.items() if k in SAEConfig.__dataclass_fields__}
    else:
        fields = {"variant": IMPORTED_VARIANT[architecture], "name": path.name}
        if "k" in cfg:
            fields["k"] = int(cfg["k"])
    fields |= {"n_features": int(cfg["d_sae"]), "d_in": int(cfg["d_in"]), "hook_point": _hook_name(cfg)}
    return SAEConfig(**fields)


def _framework_tensors(
    variant: str, architecture: str, t: dict[str, Tensor], path: Path
) -> dict[str, Tensor]:
    state = {k: t[k] for k in _MATRICES}
    if architecture == "gated":
        state |= {"b_enc": t["b_gate"], "b_mag": t["b_mag"], "r_mag": t["r_mag"]}
    else:
        state["b_enc"] = t["b_enc"]
    if variant == "jumprelu":
        # relu(z)·1[z > θ] with θ <= 0 is relu(z): θ = 0, log θ = -inf.
        state["log_threshold"] = t["threshold"].clamp_min(0).log()
    if variant == "batchtopk":  # only our own exports, which write one threshold everywhere
        if not torch.all(t["threshold"] == t["threshold"][0]):
            raise CheckpointError(f"{path}: a batchtopk export needs one threshold for every feature")
        state["threshold"] = t["threshold"][0].clone()
    return state


def _load_weights(sae: SAE, tensors: dict[str, Tensor], path: Path) -> None:
    """Overwrite the built SAE's weights; training-only buffers keep their initial values."""
    state = sae.state_dict()
    for key, value in tensors.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, the {sae.variant} SAE needs {tuple(state[key].shape)}"
            )
        state[key] = value.to(state[key].dtype)
    sae.load_state_dict(state)
