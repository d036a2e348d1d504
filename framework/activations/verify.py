"""`sae harvest RECIPE --verify`: check every shard of a store against its manifest."""

from __future__ import annotations

import logging

from framework.activations.reader import ActivationStore, open_heldout_store, sub_store
from framework.config import Recipe
from framework.errors import DataError

log = logging.getLogger(__name__)


def verify_store(recipe: Recipe) -> str:
    """sha256 and row count of every shard (train and held-out). Every shard is checked before
    anything is raised, so one error names all the bad ones and one re-harvest repairs them."""
    root = recipe.store_location()
    locations = [("", root)]
    if open_heldout_store(root) is not None:  # one that is there but unreadable raises
        locations.append(("heldout/", sub_store(root, "heldout")))
    checked, bad = 0, []
    for prefix, location in locations:
        store = ActivationStore(location, verify=True)
        for index in range(store.n_shards):
            problem = shard_problem(store, index)
            if problem:
                bad.append(f"{prefix}{store.manifest.shards[index].name}: {problem}")
            checked += 1
    if bad:
        raise DataError(
            f"{len(bad)} of {checked} shards in {root} do not match the manifest:\n"
            + "".join(f"  {line}\n" for line in bad)
            + "Delete those shards and re-run `sae harvest RECIPE`: it harvests their windows again, "
              "identically, and keeps the good shards."
        )
    return f"verified {checked} shards in {root}: every checksum and row count matches the manifest"


def shard_problem(store: ActivationStore, index: int) -> str | None:
    """What is wrong with one shard (missing, another checksum, another row count); None if nothing."""
    info = store.manifest.shards[index]
    problem = store.checksum_problem(index)
    if problem:
        return problem
    try:
        rows = sum(len(block) for block in store.iter_shard(index, verify=False))  # hashed just above
    except DataError as err:
        return f"cannot be read ({err})"
    if rows != info.rows:
        return f"holds {rows} rows, the manifest says {info.rows}"
    return None
