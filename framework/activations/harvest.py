"""`sae harvest`: run the base LM over text and write activation shards.

The unit of work is a *window*: a fixed set of contexts whose sampled tokens are shuffled
together and cut into `shuffle_window / rows_per_shard` shards. Windows take consecutive slices
of a seeded permutation of the split's contexts (`harvest.context_order: shuffled`), so each one
samples the whole corpus. Window w always covers the same contexts, samples the same positions
and shuffles with the same seed, so

- a re-run skips windows whose shards are all complete and redoes the others identically (an
  interrupted harvest, resumed, equals an uninterrupted one, row for row);
- under torchrun, rank r harvests windows r, r + world, ... and the manifest is merged by
  rank 0 once every rank is done;
- live mode (`activations/live.py`) produces exactly the rows the shards would hold.

Like the paper (250 tokens drawn from each context, shuffled together), each context gives
`tokens_per_context` random positions, so a training batch mixes many documents.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from framework.activations.format import (
    MANIFEST,
    TORCH_DTYPES,
    Manifest,
    Rows,
    ShardInfo,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from framework.artifacts import MARKER, differences_from, is_complete, mark_complete, stage_fingerprint
from framework.config import HarvestConfig, Recipe, RecipeError, is_url, recipe_to_dict
from framework.distributed import barrier, current_rank, init_process_group
from framework.errors import DataError, FrameworkError
from framework.lm import BaseLM, load_lm, weights_sha256
from framework.progress import Progress
from framework.text import count_contexts, iter_chosen_context_batches

log = logging.getLogger(__name__)
CLAIM = "harvest-recipe.json"  # the harvest fingerprint of the recipe a store belongs to
CLAIM_LM = "lm_identity"  # the claim's record of the LM's identity (weights hash), beside the fingerprint


@dataclass(frozen=True)
class HarvestPlan:
    """Which contexts, windows and shards one split's harvest consists of."""

    split: str
    rows: int  # total rows to harvest
    tokens_per_context: int
    window_rows: int
    rows_per_shard: int
    seed: int
    split_contexts: int  # full contexts the split holds
    context_order: str  # harvest.context_order: "shuffled" or "source"

    @cached_property
    def context_sequence(self) -> torch.Tensor:
        """Every context id of the split, in the order windows take them: window w takes the
        next `contexts_per_window`. Shuffled, a store smaller than the split samples all of it
        (not its first documents), and each window (hence each shard, read for several steps in
        a row) mixes contexts from the whole corpus rather than a run of neighbouring files. It
        depends on the seed, split and split size only, so a larger n_tokens extends a store
        without changing its earlier windows."""
        if self.context_order == "source":
            return torch.arange(self.split_contexts)
        # Context ids sorted by a keyed 64-bit hash of each id (splitmix64's finaliser): a
        # permutation fixed by arithmetic alone, so no library's shuffling algorithm (which a
        # torch or numpy upgrade may change) decides which contexts a resumed or extended
        # harvest takes.
        digest = hashlib.sha256(f"{self.seed}:{self.split}:context-order".encode()).digest()
        keys = _mix64(np.arange(self.split_contexts, dtype=np.uint64) ^ np.uint64(int.from_bytes(digest[:8], "big")))
        return torch.from_numpy(np.argsort(keys, kind="stable").astype(np.int64))

    def window_contexts(self, window: int) -> torch.Tensor:
        """The ids of the contexts window `window` samples, ascending."""
        first = window * self.contexts_per_window
        n = math.ceil(self.window_row_count(window) / self.tokens_per_context)
        return self.context_sequence[first : first + n].sort().values

    @property
    def contexts_per_window(self) -> int:
        return self.window_rows // self.tokens_per_context

    @property
    def shards_per_window(self) -> int:
        return math.ceil(self.window_rows / self.rows_per_shard)

    @property
    def n_windows(self) -> int:
        return math.ceil(self.rows / self.window_rows)

    def window_row_count(self, window: int) -> int:
        return min(self.window_rows, self.rows - window * self.window_rows)

    def window_shards(self, window: int) -> list[int]:
        n = math.ceil(self.window_row_count(window) / self.rows_per_shard)
        return [window * self.shards_per_window + i for i in range(n)]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64s (wrapping arithmetic): a bijection that scatters
    neighbouring inputs over the whole 64-bit range."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def make_plan(recipe: Recipe, model: BaseLM, split: str, n_tokens: int) -> HarvestPlan:
    cfg = recipe.harvest
    window = max(cfg.shuffle_window, cfg.rows_per_shard)  # shards fill windows whole (config checks it)
    split_contexts = count_contexts(recipe.text, model.tokenizer, split)
    available = split_contexts * cfg.tokens_per_context
    if available == 0:
        raise DataError(
            f"the {split} split of text source {recipe.text.source!r} holds no complete context of "
            f"{recipe.text.context_length} tokens; use a larger corpus or a shorter text.context_length"
        )
    if available < n_tokens:
        log.warning(
            "the %s split holds %s contexts x %s tokens = %s rows, fewer than the %s asked for; "
            "harvesting %s", split, available // cfg.tokens_per_context, cfg.tokens_per_context,
            f"{available:,}", f"{n_tokens:,}", f"{available:,}",
        )
    return HarvestPlan(split, min(n_tokens, available), cfg.tokens_per_context, window,
                       cfg.rows_per_shard, cfg.seed, split_contexts, cfg.context_order)


@dataclass
class Window:
    """One window's rows in the order they were sampled, the shuffle to apply, and the sums the
    store's normalisation statistics are merged from. Shuffled row i is `rows.take(order[i])`;
    the harvest applies `order` shard by shard while converting to the store dtype, so the
    window is copied once instead of once to shuffle and once more to cut and convert."""

    rows: Rows
    order: torch.Tensor
    stats: list[dict]

    def shuffled(self) -> Rows:
        return self.rows.take(self.order)


@torch.no_grad()
def collect_window(model: BaseLM, recipe: Recipe, plan: HarvestPlan, window: int) -> Window:
    """Run the LM over one window's contexts: a pure function of (recipe, plan, window)."""
    cfg = recipe.harvest
    n_rows = plan.window_row_count(window)
    generator = torch.Generator().manual_seed(hash_seed(plan.seed, plan.split, window))
    stop_at = model.last_hook(cfg.hook_points)
    widths = model.hook_points()
    # Filled batch by batch (no list of blocks to concatenate at the end).
    rows = Rows(
        acts=[torch.empty(n_rows, widths[h], dtype=torch.float32) for h in cfg.hook_points],
        token=torch.empty(n_rows, dtype=torch.int64),
        context=torch.empty(n_rows, dtype=torch.int64),
        position=torch.empty(n_rows, dtype=torch.int64),
    )
    sums = [torch.zeros(widths[h], dtype=torch.float64) for h in cfg.hook_points]
    norm_sums = [0.0 for _ in cfg.hook_points]
    filled = 0
    for context_ids, tokens in iter_chosen_context_batches(
        recipe.text, model.tokenizer, plan.split, plan.window_contexts(window), cfg.batch_size
    ):
        out = model.run(tokens.to(model.device), capture=cfg.hook_points, stop_at=stop_at)
        block = _sample_positions(out.activations, cfg, context_ids, tokens, generator)
        k = min(len(block), n_rows - filled)
        here = slice(filled, filled + k)
        for h, acts in enumerate(block.acts):
            acts = acts[:k]
            rows.acts[h][here] = acts
            # Statistics per batch (float32 over a batch, float64 across batches): the store's
            # mean and mean norm without a float64 copy of the whole window. Summing with
            # dtype=float64 directly is ~5x slower on CPU.
            sums[h] += acts.sum(0).double()
            norm_sums[h] += torch.linalg.vector_norm(acts, dim=1).sum().item()
            _check_storable(acts, cfg.hook_points[h], cfg.dtype, norm_sums[h], window)
        rows.token[here], rows.context[here], rows.position[here] = block.token[:k], block.context[:k], block.position[:k]
        filled += k
    if filled != n_rows:
        raise DataError(f"window {window} of the {plan.split} split produced {filled} rows, {n_rows} expected; "
                        f"the text source changed while harvesting. Re-run `sae harvest` on a fixed corpus.")
    stats = [{"sum": s.tolist(), "norm_sum": n, "count": n_rows} for s, n in zip(sums, norm_sums)]
    return Window(rows, torch.randperm(n_rows, generator=generator), stats)


FLOAT16_MAX = 65_504.0
FLOAT16_OVERFLOW = 65_520.0  # from here on the cast to float16 rounds to inf (below, to 65,504)


def _check_storable(acts: torch.Tensor, hook: str, dtype: str, norm_sum: float, window: int) -> None:
    """Refuse activations the store would not hold as they are: non-finite ones (the LM itself
    overflowed), and in a float16 store values beyond its range, which the cast would turn into
    inf while the manifest's statistics (summed before it) looked sound; training would then meet
    a NaN loss far from its cause."""
    if not math.isfinite(norm_sum):
        raise DataError(f"the LM's activations at {hook} are not finite (window {window}): check lm.dtype "
                        f"(float16 overflows in some LMs; use float32 or bfloat16)")
    if dtype == "float16" and (peak := acts.abs().max().item()) >= FLOAT16_OVERFLOW:
        raise DataError(f"activations at {hook} reach {peak:,.0f} (window {window}), beyond float16's largest "
                        f"value ({FLOAT16_MAX:,.0f}): float16 would hold them as inf. Use harvest.dtype=bfloat16 "
                        f"(same size, float32's range; for a store on disk, into a new harvest.output_dir)")


def harvest_window(model: BaseLM, recipe: Recipe, plan: HarvestPlan, window: int) -> Rows:
    """All rows of one window, shuffled, exactly as its shards hold them (rounded to
    harvest.dtype, as float32)."""
    rows = collect_window(model, recipe, plan, window).shuffled()
    stored = TORCH_DTYPES[recipe.harvest.dtype]
    if stored != torch.float32:
        rows.acts = [a.to(stored).float() for a in rows.acts]
    return rows


def _sample_positions(activations: dict, cfg: HarvestConfig, context_ids, tokens, generator) -> Rows:
    """`tokens_per_context` distinct random positions from each context (batch, ctx) -> rows."""
    batch, length = tokens.shape
    candidates = length - cfg.skip_first_tokens
    order = torch.rand(batch, candidates, generator=generator).argsort(dim=1)
    positions = order[:, : cfg.tokens_per_context] + cfg.skip_first_tokens  # (batch, tpc)
    rows_of = torch.arange(batch).unsqueeze(1).expand_as(positions)
    acts = [activations[h][rows_of.to(activations[h].device), positions.to(activations[h].device)]
            .flatten(0, 1).to(device="cpu", dtype=torch.float32) for h in cfg.hook_points]
    return Rows(
        acts=acts,
        token=tokens[rows_of, positions].flatten().cpu(),
        context=context_ids.unsqueeze(1).expand_as(positions).flatten().cpu(),
        position=positions.flatten(),
    )


def hash_seed(seed: int, split: str, window: int) -> int:
    return (seed * 1_000_003 + window * 7_919 + (0 if split == "train" else 104_729)) % (2**63)


def _window_done(store: Path, plan: HarvestPlan, window: int) -> bool:
    """Its record is written and every shard it lists is there at its recorded size: a shard
    deleted or cut short after the harvest gets its window redone (identically) by a re-run."""
    record = store / f"window-{window:06d}.json"
    if not record.is_file():
        return False
    sizes = {s["name"]: s["bytes"] for s in json.loads(record.read_text())["shards"]}
    return all(_has_size(store / shard_name(s), sizes.get(shard_name(s))) for s in plan.window_shards(window))


def _has_size(path: Path, size: int | None) -> bool:
    return path.is_file() and path.stat().st_size == size


def _write_window(store: Path, plan: HarvestPlan, window: int, collected: Window, recipe: Recipe) -> int:
    """Write one window's shards, then its record (which marks the window complete); rows written."""
    infos = []
    for i, shard in enumerate(plan.window_shards(window)):
        # Shuffle while cutting: shard i holds shuffled rows i * rows_per_shard onwards. (On the
        # writer thread: putting rows in their shuffled places as the LM produced them, an
        # index_copy_ per batch, measured up to 2x slower on 2 busy cores, in the LM's thread.)
        piece = collected.rows.take(collected.order[i * plan.rows_per_shard:(i + 1) * plan.rows_per_shard])
        try:
            infos.append(write_shard(store / shard_name(shard), shard, piece, recipe.harvest.dtype,
                                     recipe.harvest.rows_per_sample))
        except OSError as err:  # write_shard removed its partial file
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                free = shutil.disk_usage(store).free
                smaller = " (or harvest into a new store with harvest.dtype=bfloat16, half the size)" \
                    if recipe.harvest.dtype == "float32" else ""
                raise DataError(
                    f"disk full while writing {shard_name(shard)} in {store} ({free / 2**20:,.0f} MiB "
                    f"free). Nothing incomplete was kept: free space{smaller} and re-run `sae harvest` "
                    f"-- complete shards are skipped."
                ) from None
            raise
    record = {"window": window, "shards": [vars(i) for i in infos], "stats": collected.stats}
    tmp = store / f".window-{window:06d}.json.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(store / f"window-{window:06d}.json")
    return len(collected.rows)


def shard_writers() -> int:
    """Threads writing windows beside the LM. Encoding, hashing (sha256: about 1 GB/s per core)
    and writing a window is CPU work of its own, and on a GPU machine one thread of it can cap a
    harvest's rows/s below what the device produces. One per 4 cores, at most 4 (each window
    waiting for a writer holds its rows in memory); SAE_SHARD_WRITERS overrides."""
    configured = os.environ.get("SAE_SHARD_WRITERS", "").strip()
    if configured:
        try:
            writers = int(configured)
        except ValueError:
            writers = 0
        if writers < 1:
            raise FrameworkError(f"SAE_SHARD_WRITERS={configured!r}: set it to a whole number of writer threads, "
                                 f"1 or more, or unset it (one per 4 cores, at most 4)")
        return writers
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def _remove_partials(store: Path) -> None:
    for partial in store.glob(".*.partial"):
        partial.unlink(missing_ok=True)


def _merge_manifest(store: Path, plan: HarvestPlan, model: BaseLM, recipe: Recipe) -> Manifest:
    records = [json.loads((store / f"window-{w:06d}.json").read_text()) for w in range(plan.n_windows)]
    cfg = recipe.harvest
    widths = model.hook_points()
    normalisation = {}
    for h, hook in enumerate(cfg.hook_points):
        count = sum(r["stats"][h]["count"] for r in records)
        total = torch.tensor([r["stats"][h]["sum"] for r in records], dtype=torch.float64).sum(0)
        norm_sum = sum(r["stats"][h]["norm_sum"] for r in records)
        normalisation[hook] = {"mean": (total / count).tolist(), "mean_norm": norm_sum / count}
    shards = [ShardInfo(**s) for r in records for s in r["shards"]]
    resolved = recipe_to_dict(recipe)
    return Manifest(
        model=model.identity, hook_points=list(cfg.hook_points), d=[widths[h] for h in cfg.hook_points],
        dtype=cfg.dtype, rows=sum(s.rows for s in shards), rows_per_sample=cfg.rows_per_sample,
        rows_per_shard=cfg.rows_per_shard, context_length=recipe.text.context_length,
        tokens_per_context=cfg.tokens_per_context, text=resolved["text"], split=plan.split,
        normalisation=normalisation, shards=shards, recipe=resolved,
    )


def harvest_differences(store: Path, recipe: Recipe) -> list[str] | None:
    """How the recipe that harvested `store` (or started to) differs from `recipe` in what the
    rows depend on (its harvest fingerprint); None when the store records no recipe."""
    claim = store / CLAIM
    if not claim.is_file():
        return None
    recorded = json.loads(claim.read_text())
    recorded.pop(CLAIM_LM, None)  # compared by check_harvested_lm: lm.path is not in the fingerprint
    return differences_from(recorded, recipe, "harvest")


def harvested_lm(store: Path) -> dict | None:
    """The identity (name, path or source, weights_sha256) of the LM that harvested `store`: its
    manifest's once complete, its claim's while partial; None when neither records one."""
    if (store / MANIFEST).is_file():
        try:
            return read_manifest(store).model
        except DataError:
            pass  # an unreadable manifest is reported by whatever reads the store
    if (store / CLAIM).is_file():
        return json.loads((store / CLAIM).read_text()).get(CLAIM_LM)
    return None


def check_harvested_lm(store: Path, recipe: Recipe, weights_sha256: str | None) -> None:
    """Refuse a store harvested from other LM weights than the recipe's (`weights_sha256`, as its
    identity records it): lm.path is left out of the recipe fingerprint so a moved LM still
    matches, which lets another pretrained LM, or a re-pretrained one, pass every key. Nothing is
    compared where either hash is unknown (a store from before the hash was recorded, a hub id not cached,
    an LM not on this machine)."""
    recorded = harvested_lm(store) or {}
    if not weights_sha256 or not recorded.get("weights_sha256") or recorded["weights_sha256"] == weights_sha256:
        return
    if recipe.pretrains_lm:
        named = f"lm.path={recipe.path('lm')}"
        fix = f"point lm.path at the LM that made the store (it was at {recorded.get('path', 'an unrecorded path')})"
    else:
        named = f"lm.name={recipe.lm.name}"
        fix = f"set lm.name to the LM that made the store ({recorded.get('source', recorded.get('name'))})"
    raise RecipeError(
        f"the activation store {store} was harvested from LM weights with sha256 "
        f"{recorded['weights_sha256'][:16]}..., but the LM this recipe names ({named}) has weights with sha256 "
        f"{weights_sha256[:16]}...: its rows are another LM's activations. Harvest this LM into a new "
        f"store (set harvest.output_dir to a new directory and run `sae harvest RECIPE`), or {fix}."
    )


def _claim(store: Path, recipe: Recipe, model: BaseLM) -> None:
    """Refuse to resume into a store that an unfinished harvest of another recipe or LM started."""
    differences = harvest_differences(store, recipe)
    if differences:
        raise RecipeError(
            f"{store} holds a partial harvest of a different recipe ({'; '.join(differences[:5])}); its "
            f"windows cannot be mixed with this one's. Delete {store} or set harvest.output_dir elsewhere."
        )
    check_harvested_lm(store, recipe, model.identity.get("weights_sha256"))
    if differences is None:
        tmp = store / f".{CLAIM}.tmp"
        tmp.write_text(json.dumps({**stage_fingerprint(recipe, "harvest"), CLAIM_LM: model.identity}, default=str))
        tmp.replace(store / CLAIM)


def harvest_split(model: BaseLM, recipe: Recipe, store: Path, split: str, n_tokens: int) -> Manifest | None:
    """Harvest one split into `store`; returns the manifest on rank 0 (None elsewhere)."""
    rank = current_rank()
    plan = make_plan(recipe, model, split, n_tokens)  # a recipe that cannot run claims nothing
    store.mkdir(parents=True, exist_ok=True)
    barrier()
    if rank.is_main:
        _remove_partials(store)
        _claim(store, recipe, model)
    barrier()
    mine = [w for w in range(plan.n_windows) if w % rank.world == rank.rank]
    todo = [w for w in mine if not _window_done(store, plan, w)]
    if len(todo) < len(mine):
        log.info("%s: %d of %d windows already complete; harvesting the rest", store, len(mine) - len(todo), len(mine))
    progress = Progress(f"harvest {split}", sum(plan.window_row_count(w) for w in todo), "rows")
    # Fault-injection tests set this to hold the harvest between windows while they kill it.
    pause = float(os.environ.get("SAE_HARVEST_WINDOW_DELAY_S", 0))
    # Windows are written (shuffle, encode, hash, fsync) by writer threads while the LM runs the next
    # window: on a GPU the writing overlaps the device's work, on a CPU it fills the gaps. At
    # most one window per writer waits to be written, so memory holds writers + 1 windows, and a
    # write error (a full disk) surfaces before many more windows are handed over.
    writers = shard_writers()
    with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="shard-writer") as pool:
        # On an error the pool's exit still waits for every write in flight to finish or fail
        # (each removes its own partial file): nothing half-written stays behind.
        pending: list[Future] = []
        for window in todo:
            collected = collect_window(model, recipe, plan, window)
            while len(pending) >= writers:
                progress.update(pending.pop(0).result())
            pending.append(pool.submit(_write_window, store, plan, window, collected, recipe))
            del collected  # the writer holds the only reference: freed once written
            time.sleep(pause)
        while pending:
            progress.update(pending.pop(0).result())
    barrier()
    if not rank.is_main:
        return None
    manifest = _merge_manifest(store, plan, model, recipe)
    write_manifest(store, manifest)
    return manifest


def _damaged_shards(recipe: Recipe, store: Path) -> list[str]:
    """Files of a complete store (train and held-out) that are gone or not at their recorded
    size. Sizes only: hashing every shard on each re-run would take minutes on a large store
    (`sae harvest RECIPE --verify` does that)."""
    locations = [store] + ([store / "heldout"] if recipe.harvest.heldout_tokens > 0 else [])
    damaged = []
    for location in locations:
        try:
            manifest = read_manifest(location)
        except DataError:
            damaged.append(str(location / MANIFEST))
            continue
        damaged += [str(location / s.name) for s in manifest.shards if not _has_size(location / s.name, s.bytes)]
    return damaged


def harvest(recipe: Recipe) -> Path | str:
    """The `sae harvest` stage: train (or `harvest.split`) store, then a held-out store inside it."""
    if is_url(recipe.harvest.output_dir):
        # A store harvested elsewhere and uploaded: nothing to write, but it must be readable.
        from framework.activations.reader import open_manifest

        manifest = open_manifest(recipe.harvest.output_dir)
        log.info("harvest.output_dir is a URL: training reads its %s rows from %s; harvest writes only "
                 "to a local directory (harvest there, upload, then point harvest.output_dir at it)",
                 f"{manifest.rows:,}", recipe.harvest.output_dir)
        return recipe.harvest.output_dir
    store = recipe.path("activations")
    if is_complete(store, recipe, "harvest"):
        check_harvested_lm(store, recipe, weights_sha256(recipe))
        damaged = _damaged_shards(recipe, store)
        if not damaged:
            log.info("activations in %s are complete; nothing to do", store)
            return store
        # The marker promised these shards: without it the windows they belong to are redone.
        log.warning("%s is marked complete but %s missing or not at the size its manifest records; "
                    "harvesting their windows again", store, ", ".join(damaged))
        (store / MARKER).unlink(missing_ok=True)
    if recipe.harvest.mode == "live":
        log.info("harvest.mode=live: activations are generated during training; nothing to write")
        return store
    rank = current_rank()
    init_process_group(rank)
    model = load_lm(recipe, device_index=rank.local_rank)
    model.check_hooks(recipe.harvest.hook_points)
    harvest_split(model, recipe, store, recipe.harvest.split, recipe.harvest.n_tokens)
    if recipe.harvest.heldout_tokens > 0:
        harvest_split(model, recipe, store / "heldout", "heldout", recipe.harvest.heldout_tokens)
    if rank.is_main:
        from framework.config import save_recipe

        save_recipe(recipe, store)
        mark_complete(store, recipe, "harvest", rows=read_manifest(store).rows)
    barrier()
    return store
