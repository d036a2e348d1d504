"""How a recipe's `train.strategy` becomes Lightning Trainer arguments.

Model code never asks which strategy runs it (torchtitan's rule: parallelism is applied to a
built model from outside). Under torchrun, Lightning reads the process layout from the
environment; the Trainer must then be told the same number of local devices and nodes.
"""

from __future__ import annotations

import os

import torch

from framework.config import Recipe
from framework.errors import RecipeError


def _local_devices(recipe: Recipe) -> int:
    if "LOCAL_WORLD_SIZE" in os.environ:  # launched by torchrun: one process per device
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if recipe.train.devices == "auto":
        return 1
    try:
        return int(recipe.train.devices)
    except ValueError:
        raise RecipeError(f"train.devices={recipe.train.devices!r} must be 'auto' or a number") from None


def world_size(recipe: Recipe) -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return _local_devices(recipe) * recipe.train.num_nodes


def trainer_arguments(recipe: Recipe) -> dict:
    cfg = recipe.train
    devices = _local_devices(recipe)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    multi = world_size(recipe) > 1
    if cfg.strategy == "auto":
        strategy = "ddp" if multi else "auto"
    elif cfg.strategy == "ddp":
        strategy = "ddp"
    else:
        raise RecipeError(
            f"train.strategy={cfg.strategy!r} is not available in this build yet; use auto or ddp"
        )
    if strategy == "ddp" and accelerator == "cpu":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    return {
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": cfg.num_nodes,
        "strategy": strategy,
        "precision": cfg.precision,
    }
