"""Trained SAEs as later stages see them: the SAE, where it reads, and how its input is scaled.

Two on-disk formats load into the same `TrainedSAE`: the framework's own (`sae train` writes
`<name>/sae.safetensors` + `config.json`) and SAELens's (`cfg.json` + `sae_weights.safetensors`,
see export.py). Weights load through safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from framework.config import Recipe, SAEConfig
from framework.errors import CheckpointError
from framework.sae import SAE, build_sae


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
    config = json.loads(config_path.read_text())
    fields = SAEConfig.__dataclass_fields__
    cfg = SAEConfig(**{k: v for k, v in config["sae"].items() if k in fields})
    sae = build_sae(config["d_in"], cfg)
    state = load_file(str(directory / "sae.safetensors"))
    missing = set(sae.state_dict()) - set(state)
    if missing:
        raise CheckpointError(f"{directory}/sae.safetensors lacks {sorted(missing)}; it is not a {cfg.variant} SAE")
    sae.load_state_dict(state)
    return TrainedSAE(config["name"], sae.to(device).eval(), config["hook_point"], float(config["input_scale"]))


def load_trained_saes(recipe: Recipe, device: str | torch.device = "cpu") -> list[TrainedSAE]:
    """The recipe's trained bank, or the SAELens-format SAE at eval.sae_path."""
    if recipe.eval.sae_path:
        from framework.export import load_saelens_sae

        return [load_saelens_sae(recipe.eval.sae_path, device)]
    root = recipe.path("sae")
    names = [c.name for c in recipe.sae_configs()]
    missing = [n for n in names if not (root / n / "config.json").is_file()]
    if missing:
        raise CheckpointError(
            f"no trained SAE {missing} in {root}; run `sae train RECIPE` first "
            f"(or set eval.sae_path to an SAELens-format directory)"
        )
    return [load_framework_sae(root / n, device) for n in names]
