"""Under torchrun: a feature-sharded SAE against the same SAE whole, one batch, every variant
feature sharding supports.

    python -m torch.distributed.run --nproc_per_node=2 tests/sharded_selection.py OUT.json

Every rank builds the same whole SAE (some latents dead, so TopK's AuxK runs) and its own slice
of it; rank 0 writes, per variant, whether the union of the slices' nonzero (row, feature) codes
is the whole SAE's, and the largest differences in reconstruction, losses and (projected,
reduced) gradients.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from framework.config import SAEConfig
from framework.sae import build_sae
from framework.training.feature_sharded import FeatureShardedSAE


def pairs(out, offset: int) -> set[tuple[int, int]]:
    rows, cols = (out.features.detach() != 0).nonzero().unbind(1)
    return set(zip(rows.tolist(), (cols + offset).tolist()))


def compare(variant: str, solo_group, rank: int) -> dict:
    cfg = SAEConfig(variant=variant, n_features=96, k=6, aux_k=8, dead_steps_threshold=5, init="transpose", seed=3)
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(7))
    whole = build_sae(24, cfg)
    if variant in ("topk", "batchtopk"):
        whole.steps_since_fired[::5] = 10  # every fifth latent dead: AuxK has work on both shards
    sharded = FeatureShardedSAE(whole, dist.group.WORLD, solo_group)
    out_sharded = sharded(x)
    out_sharded.loss.backward()
    out_whole = whole(x)
    out_whole.loss.backward()
    sharded.before_optimizer_step()  # b_dec's gradient summed over shards, then the projection
    whole.before_optimizer_step()
    mine = pairs(out_sharded, sharded.offset)
    everyone: list[set] = [set() for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    rows = slice(sharded.offset, sharded.offset + sharded.n_local)
    return {
        "same_selection": set().union(*everyone) == pairs(out_whole, 0),
        "selected": len(pairs(out_whole, 0)),
        "reconstruction": (out_sharded.reconstruction - out_whole.reconstruction).abs().max().item(),
        **({"auxk": abs(out_sharded.losses["auxk"].item() - out_whole.losses["auxk"].item()),
            "auxk_value": out_whole.losses["auxk"].item()} if "auxk" in out_whole.losses else {}),
        "loss": abs(out_sharded.loss.item() - out_whole.loss.item()),
        "grad_W_dec": (sharded.local.W_dec.grad - whole.W_dec.grad[rows]).abs().max().item(),
        "grad_W_enc": (sharded.local.W_enc.grad - whole.W_enc.grad[:, rows]).abs().max().item(),
        "grad_b_dec": (sharded.local.b_dec.grad - whole.b_dec.grad).abs().max().item(),
    }


def main(path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    solos = [dist.new_group([r]) for r in range(dist.get_world_size())]
    results = {variant: compare(variant, solos[rank], rank) for variant in ("topk", "batchtopk", "paper", "april2024")}
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
