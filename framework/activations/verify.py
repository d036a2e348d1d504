"""`sae harvest RECIPE --verify`: check every shard of a store against its manifest."""

from __future__ import annotations

import logging

from framework.activations.reader import ActivationStore, heldout_split_present, open_manifest, sub_store
from framework.config import Recipe
from framework.errors import DataError

log = logging.getLogger(__name__)


def verify_store(recipe: Recipe) -> str:
    """sha256 and row count of every shard (train and held-out); raises naming the first bad one."""
    root = recipe.store_location()
    locations = [root]
    try:
        open_manifest(sub_store(root, "heldout"))
        locations.append(sub_store(root, "heldout"))
    except DataError:
        if heldout_split_present(sub_store(root, "heldout")):
            raise  # there, but its manifest is missing or unreadable
        # else: a store without a held-out split
    checked = 0
    for location in locations:
        store = ActivationStore(location, verify=True)
        for index in range(store.n_shards):
            store.verify_shard(index)
            rows = sum(len(block) for block in store.iter_shard(index, verify=False))  # hashed just above
            if rows != store.manifest.shards[index].rows:
                raise DataError(f"shard {store.manifest.shards[index].name} row count mismatch")
            checked += 1
    return f"verified {checked} shards in {root}: every checksum and row count matches the manifest"
