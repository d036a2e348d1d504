"""Sparse autoencoders: one interface (base.SAE), one module per variant; plain torch."""

from __future__ import annotations

from framework.config import SAEConfig
from framework.sae.april2024 import April2024SAE
from framework.sae.base import SAE, SAEOutput, SparseFeatures
from framework.sae.gated import GatedSAE
from framework.sae.jumprelu import JumpReLUSAE
from framework.sae.paper import PaperSAE
from framework.sae.resampling import FEATURE_DIM, resample_dead_features, reset_adam_state
from framework.sae.topk import BatchTopKSAE, TopKSAE

VARIANTS: dict[str, type[SAE]] = {
    cls.variant: cls for cls in (PaperSAE, April2024SAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE)
}


def build_sae(d_in: int, cfg: SAEConfig) -> SAE:
    """The SAE the recipe's `sae.variant` names, initialised (data-independently) from cfg."""
    if cfg.variant not in VARIANTS:
        raise ValueError(f"sae.variant={cfg.variant!r} is not one of {', '.join(VARIANTS)}")
    return VARIANTS[cfg.variant](d_in, cfg)


__all__ = [
    "SAE",
    "SAEOutput",
    "SparseFeatures",
    "VARIANTS",
    "build_sae",
    "PaperSAE",
    "April2024SAE",
    "TopKSAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "GatedSAE",
    "resample_dead_features",
    "reset_adam_state",
    "FEATURE_DIM",
]
