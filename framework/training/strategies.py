"""How a recipe's `train.strategy` becomes a Lightning strategy and a parallelised bank.

Model code never asks which strategy runs it (torchtitan's rule: parallelism is applied to a
built model from outside). `trainer_arguments` picks the Lightning strategy; `parallelize`,
called from `SAEModule.configure_model` once the process groups exist, shards the built SAEs
and gives the module the matching `ParameterLayout` (layout.py):

    auto / ddp        DDPStrategy: replicas, gradients all-reduced; the global batch is split
    fsdp              ModelParallelStrategy (data_parallel = world): FSDP2 per SAE (fsdp.py)
    deepspeed         DeepSpeedStrategy, ZeRO train.deepspeed_stage (zero.py); on CPU through
                      CPUDeepSpeedStrategy, which lifts only Lightning's CUDA-only checks
    feature_sharded   ModelParallelStrategy on a (data_parallel, feature shards) mesh:
                      each rank owns a slice of the features (feature_sharded.py)

Under torchrun, Lightning reads the process layout from the environment; the Trainer must then
be told the same number of local devices and nodes. Every strategy's process group gets the
timeout in SAE_DIST_TIMEOUT_S (seconds; default 1800), so a rank that stops answering turns
into an error on the others instead of a hang.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch

from framework.config import Recipe
from framework.errors import CheckpointError, RecipeError
from framework.precision import warn_if_emulated_on_cpu

PARALLEL = ("ddp", "fsdp", "deepspeed", "feature_sharded")


def _local_devices(recipe: Recipe) -> int:
    if "LOCAL_WORLD_SIZE" in os.environ:  # launched by torchrun: one process per device
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if recipe.train.devices == "auto":
        return 1
    try:
        return int(recipe.train.devices)
    except ValueError:
        raise RecipeError(f"train.devices={recipe.train.devices!r} must be 'auto' or a number") from None


def _nodes(recipe: Recipe) -> int:
    """Machines the run spans: under torchrun, its world over the processes per machine (a
    2-node launch told Lightning num_nodes=1, and its DDP launcher refused devices × num_nodes
    != world size); otherwise train.num_nodes."""
    if "WORLD_SIZE" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return recipe.train.num_nodes
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    nodes = world // local
    if nodes * local != world:
        raise RecipeError(f"torchrun started {world} processes with {local} on this machine: every machine must run "
                          f"the same number (--nproc_per_node)")
    if recipe.train.num_nodes not in (1, nodes):
        raise RecipeError(f"train.num_nodes={recipe.train.num_nodes}, but torchrun started {nodes} machine(s) of "
                          f"{local} process(es) each; under torchrun its --nnodes decides: drop train.num_nodes")
    return nodes


def world_size(recipe: Recipe) -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return _local_devices(recipe) * recipe.train.num_nodes


def data_parallel_ranks(recipe: Recipe) -> int:
    """Ranks that each read their own slice of the activations (a feature-shard group reads one)."""
    return world_size(recipe) // feature_shards(recipe)


def feature_shards(recipe: Recipe) -> int:
    """Ranks that split one dictionary's features (1 unless strategy=feature_sharded)."""
    if recipe.train.strategy != "feature_sharded":
        return 1
    world = world_size(recipe)
    shards = recipe.train.feature_shards or world
    if world % shards:
        raise RecipeError(
            f"train.feature_shards={shards} does not divide the {world} ranks; use a divisor of {world} "
            f"(the rest of the world size becomes data parallelism)"
        )
    return shards


def dist_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("SAE_DIST_TIMEOUT_S", 1800)))


def _strategy(recipe: Recipe, on_gpu: bool):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    cfg, world, timeout = recipe.train, world_size(recipe), dist_timeout()
    backend = None if on_gpu else "gloo"
    if cfg.strategy == "auto":
        return DDPStrategy(process_group_backend=backend, timeout=timeout) if world > 1 else "auto"
    if cfg.strategy == "ddp":
        return DDPStrategy(process_group_backend=backend, timeout=timeout)
    if cfg.strategy == "fsdp":
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                     process_group_backend=backend, timeout=timeout)
    if cfg.strategy == "deepspeed":
        from framework.training.zero import deepspeed_strategy

        return deepspeed_strategy(cfg.deepspeed_stage, on_gpu, timeout, cfg.batch_size // world)
    from framework.training.feature_sharded import FeatureShardedStrategy, check_shardable

    shards = feature_shards(recipe)
    for sae in recipe.sae_configs():
        check_shardable(sae, shards)
    return FeatureShardedStrategy(data_parallel_size=world // shards, tensor_parallel_size=shards,
                                  process_group_backend=backend, timeout=timeout)


def trainer_arguments(recipe: Recipe) -> dict:
    cfg = recipe.train
    on_gpu = torch.cuda.is_available()
    warn_if_emulated_on_cpu("train.precision", cfg.precision, not on_gpu)
    return {
        "accelerator": "gpu" if on_gpu else "cpu",
        "devices": _local_devices(recipe),
        "num_nodes": _nodes(recipe),
        "strategy": _strategy(recipe, on_gpu),
        "precision": cfg.precision,
    }


def layout_name(recipe: Recipe) -> str:
    """What the layout of `parallelize` will be called, known before any process group exists."""
    strategy = recipe.train.strategy
    if strategy in ("auto", "ddp"):
        return "replicated"
    if strategy == "deepspeed":
        return f"zero-{recipe.train.deepspeed_stage}"
    if strategy == "feature_sharded":
        return f"feature_sharded-{feature_shards(recipe)}"
    return strategy


def parallelize(module) -> None:
    """Shard the module's built SAEs for its recipe's strategy, and set `module.layout`."""
    strategy = module.recipe.train.strategy
    if strategy == "fsdp":
        from framework.training.fsdp import shard_saes

        shard_saes(module, module.device_mesh["data_parallel"])
    elif strategy == "feature_sharded":
        from framework.training.feature_sharded import shard_features

        shard_features(module, module.device_mesh)
    elif strategy == "deepspeed":
        from framework.training.zero import ZeROLayout

        module.layout = ZeROLayout(module.recipe.train.deepspeed_stage)


# ---- checkpoints: a file (single process, DDP) or a directory (FSDP, feature shards, ZeRO) ---


def checkpoint_metadata(path: Path) -> dict:
    """The non-tensor part of a checkpoint: loops, callbacks, and `sae_framework` (fingerprint)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    candidates = [path / "meta.pt", *sorted((path / "checkpoint").glob("*model_states.pt"))]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no meta.pt or DeepSpeed model states): it was "
            f"probably cut off while being written. Delete it to resume from the one before, or "
            f"delete {path.parent} to start over."
        )
    return torch.load(found, map_location="cpu", weights_only=True, mmap=True)  # DeepSpeed's holds the weights
