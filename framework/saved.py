"""Trained SAEs as later stages see them: the SAE, where it reads, and how its input is scaled.

Two on-disk formats load into the same `TrainedSAE`: the framework's own (`sae train` writes
`<name>/sae.safetensors` + `config.json`) and SAELens's (`cfg.json` + `sae_weights.safetensors`,
see export.py). Weights load through safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from framework.artifacts import MARKER, differences_from, read_marker
from framework.config import Recipe, SAEConfig
from framework.errors import CheckpointError
from framework.sae import SAE, build_sae

if TYPE_CHECKING:  # for annotations only: `sae export` loads SAEs without the LM package
    from framework.lm.base import BaseLM


@dataclass
class TrainedSAE:
    name: str
    sae: SAE
    hook_point: str
    input_scale: float  # the SAE sees activation * input_scale

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> the SAE's reconstruction in the activation's own scale and dtype."""
        flat = x.reshape(-1, x.shape[-1]).float() * self.input_scale
        out = self.sae.decode(self.sae.encode(flat)) / self.input_scale
        return out.view_as(x).to(x.dtype)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float() * self.input_scale
        return self.sae.encode(flat).view(*x.shape[:-1], -1)


def load_framework_sae(directory: str | Path, device: str | torch.device = "cpu") -> TrainedSAE:
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} holds no trained SAE (no config.json); run `sae train RECIPE`")
    try:
        config = json.loads(config_path.read_text())
        fields = SAEConfig.__dataclass_fields__
        cfg = SAEConfig(**{k: v for k, v in config["sae"].items() if k in fields})
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{config_path} is not the config `sae train` writes; re-run `sae train RECIPE`") from None
    sae = build_sae(config["d_in"], cfg)
    try:
        state = load_file(str(directory / "sae.safetensors"))
    except Exception as err:  # noqa: BLE001 -- safetensors' own error types, and OSError
        raise CheckpointError(
            f"cannot read {directory / 'sae.safetensors'} ({type(err).__name__}: {err}). If `sae train` wrote it, "
            f"delete {directory.parent / MARKER} and re-run `sae train RECIPE`: it rewrites the SAEs from the "
            f"last checkpoint without training again"
        ) from None
    missing = set(sae.state_dict()) - set(state)
    if missing:
        raise CheckpointError(f"{directory}/sae.safetensors lacks {sorted(missing)}; it is not a {cfg.variant} SAE")
    sae.load_state_dict(state)
    return TrainedSAE(config["name"], sae.to(device).eval(), config["hook_point"], float(config["input_scale"]))


def load_trained_saes(recipe: Recipe, device: str | torch.device = "cpu", *, for_export: bool = False) -> list[TrainedSAE]:
    """The recipe's trained bank, or the SAELens-format SAE at eval.sae_path (`for_export`: only
    the bank, and an error message that does not suggest eval.sae_path, which export ignores)."""
    if recipe.eval.sae_path:
        from framework.export import load_saelens_sae

        return [load_saelens_sae(recipe.eval.sae_path, device, recipe)]
    root = recipe.path("sae")
    check_trained_by(root, recipe)
    names = [c.name for c in recipe.sae_configs()]
    missing = [n for n in names if not (root / n / "config.json").is_file()]
    if missing:
        raise CheckpointError(
            f"no trained SAE {missing} in {root}; run `sae train RECIPE` first "
            + ("(export writes the SAEs `sae train` saved there; if they were trained elsewhere, set "
               "train.output_dir to that directory)" if for_export else
               "(or set eval.sae_path to an SAELens-format directory)")
        )
    saes = [load_framework_sae(root / n, device) for n in names]
    for cfg, trained in zip(recipe.sae_configs(), saes):
        _check_is_the_recipes(root / cfg.name, trained, cfg, cfg.hook_point or recipe.harvest.hook_points[0])
    return saes


def _check_is_the_recipes(directory: Path, trained: TrainedSAE, cfg: SAEConfig, hook: str) -> None:
    """Refuse an SAE whose own config.json describes another SAE than the recipe's entry of that
    name: without a COMPLETE marker (check_trained_by) nothing else ties the files to the recipe,
    and a later stage would record this recipe's settings for them."""
    saved = {"variant": trained.sae.cfg.variant, "n_features": trained.sae.cfg.n_features,
             "hook_point": trained.hook_point, "k": trained.sae.cfg.k}
    wanted = {"variant": cfg.variant, "n_features": cfg.n_features, "hook_point": hook}
    if cfg.variant in ("topk", "batchtopk"):
        wanted["k"] = cfg.k
    differences = [f"{key} {saved[key]!r} there, {value!r} here" for key, value in wanted.items()
                   if saved[key] != value]
    if differences:
        raise CheckpointError(
            f"{directory} holds another SAE than this recipe's {cfg.name!r} ({'; '.join(differences)}). Point "
            f"train.output_dir at the SAEs this recipe trained, or train them: `sae train RECIPE`"
        )


def check_trained_by(root: Path, recipe: Recipe) -> None:
    """Refuse SAEs that `sae train` finished for another recipe: a later stage would record this
    recipe's settings (harvest, sae, train) for SAEs that other settings made. Output without a
    COMPLETE marker records no recipe and is taken as it is."""
    marker = root / MARKER
    if not marker.is_file():
        return
    saved = read_marker(marker)
    if saved.get("stage") != "train" or "fingerprint" not in saved:
        return
    differences = differences_from(saved["fingerprint"], recipe, "train")
    if differences:
        raise CheckpointError(
            f"the SAEs in {root} were trained by a different recipe ({'; '.join(differences[:5])}). Use the "
            f"recipe that trained them ({root / 'recipe.yaml'}), or train this one into its own directory "
            f"(set train.output_dir and run `sae train RECIPE`). To score them as SAEs from elsewhere, export "
            f"them with their own recipe and set eval.sae_path to the export."
        )


def load_saes_for_lm(recipe: Recipe, model: BaseLM, device: str | torch.device | None = None) -> list[TrainedSAE]:
    """The recipe's SAEs (as `load_trained_saes`, on the LM's device unless told), each checked to
    read a hook point the LM has at the width it has: an SAE made for another model fails here,
    by name, rather than in a matrix product of the wrong shape."""
    saes = load_trained_saes(recipe, model.device if device is None else device)
    widths = model.hook_points()
    for trained in saes:
        hook, d_in = trained.hook_point, trained.sae.d_in
        if widths.get(hook) == d_in:
            continue
        source = f"eval.sae_path={recipe.eval.sae_path}" if recipe.eval.sae_path else f"in {recipe.path('sae')}"
        fix = (f"Point eval.sae_path at an SAE trained on {hook!r} of this LM, or set lm.name to the LM it was trained on."
               if recipe.eval.sae_path else
               "Use the LM the SAE was trained on (lm.*), or train SAEs on this one (`sae train RECIPE` with another "
               "train.output_dir).")
        if hook not in widths:
            raise CheckpointError(
                f"SAE {trained.name!r} ({source}) reads hook point {hook!r}, which the LM ({model.name}) does not "
                f"have (list them with `sae hooks RECIPE`). {fix}"
            )
        raise CheckpointError(
            f"SAE {trained.name!r} ({source}) has d_in={d_in}, but hook point {hook!r} of the LM ({model.name}) "
            f"is {widths[hook]} wide: the SAE was trained on another model or hook point. {fix}"
        )
    return saes
