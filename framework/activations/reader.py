"""Streaming activation shards back for training, one visible WebDataset chain per shard.

    manifest -> shard list -> (permute per epoch) -> split by rank -> tar samples -> decode
             -> (verify) -> rows -> fixed-size batches

Why the order is computed here rather than by a shuffle buffer: a training run must resume
exactly where it stopped without repeating or skipping rows (the paper never repeats data).
Rows were already shuffled across thousands of contexts when the harvest wrote them, so the
reader only permutes whole shards per epoch. Then the stream is a pure function of
(seed, epoch, rank, world), and resuming after N rows skips whole shards by their manifest row
counts without reading them. Each rank takes every world-th shard of the permuted list, so ranks
read disjoint rows and never the same bytes.

Shards are read through `webdataset`'s tar iterators, so a store can be a local directory or any
URL: what `webdataset.gopen` opens (`file:`, `http(s)://` through curl, `gs://`, `pipe:CMD`), and
other object stores (`s3://`, `az://`, ...) through fsspec when its backend package is installed.
A pipe command names each member with `{name}`: `pipe:aws s3 cp s3://bucket/store/{name} -`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from urllib.parse import urlparse

import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

from framework.activations.format import MANIFEST, Manifest, Rows, decode_sample
from framework.errors import DataError

log = logging.getLogger(__name__)


def member_url(location: str, name: str) -> str:
    """The URL of file `name` of the store at `location` (a directory, URL prefix, or a pipe
    command with a `{name}` placeholder)."""
    if "{name}" in location:
        return location.replace("{name}", name)
    return f"{location.rstrip('/')}/{name}"


def sub_store(location: str, name: str) -> str:
    """The location of a store nested in another (the held-out split in `heldout/`)."""
    if "{name}" in location:
        return location.replace("{name}", f"{name}/{{name}}")
    return f"{location.rstrip('/')}/{name}"


def open_url(url: str):
    """A binary stream of `url`: webdataset's openers where it has one for the scheme, fsspec
    (`s3://`, `az://`, ...) otherwise."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes or len(scheme) == 1:  # 1 letter: a drive
        return wds.gopen(url, "rb")
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except ImportError as err:
        raise DataError(
            f"cannot open {url}: no reader for {scheme}:// ({err}). Install the fsspec backend for it "
            f"(for example s3fs or adlfs), or give the store as a pipe command such as "
            f"'pipe:aws s3 cp {scheme}://bucket/store/{{name}} -'."
        ) from None


def open_manifest(location: str) -> Manifest:
    """The manifest of a store at a local path or any URL (see the module docstring)."""
    url = member_url(str(location), MANIFEST)
    try:
        with open_url(url) as stream:
            data = json.loads(stream.read())
    except (FileNotFoundError, OSError, ValueError) as err:
        raise DataError(
            f"cannot read {url} ({err}): the activation store is missing or its harvest did not "
            f"finish. Run `sae harvest RECIPE` (it resumes where it stopped)."
        ) from None
    return Manifest.from_dict(data)


class ActivationStore:
    """A harvested store: its manifest and where its shards are."""

    def __init__(self, location: str, verify: bool = False):
        self.location = str(location)
        self.manifest = open_manifest(self.location)
        self.verify = verify

    @property
    def n_shards(self) -> int:
        return len(self.manifest.shards)

    def shard_url(self, index: int) -> str:
        return member_url(self.location, self.manifest.shards[index].name)

    def check_compatible(self, hook: str, d_in: int, sae_name: str) -> None:
        """Refuse before training: the SAE's hook and width must be what the store holds."""
        m = self.manifest
        if hook not in m.hook_points:
            raise DataError(
                f"SAE {sae_name!r} reads hook point {hook!r} but the store {self.location} holds "
                f"{m.hook_points}; set sae.hook_point to one of them or harvest {hook!r}"
            )
        if m.width(hook) != d_in:
            raise DataError(
                f"SAE {sae_name!r} expects d={d_in} at {hook!r} but the store holds d={m.width(hook)}"
            )

    def iter_shard(self, index: int) -> Iterator[Rows]:
        """The rows of one shard, sample by sample, with errors that name the shard."""
        info = self.manifest.shards[index]
        url = self.shard_url(index)
        if self.verify:
            self.verify_shard(index)
        seen = 0
        try:
            # shard URL -> stream -> tar members -> samples grouped by key (webdataset's own
            # iterators, fed a stream opened here so fsspec URLs work too)
            with open_url(url) as stream:
                samples = group_by_keys(tar_file_expander(iter([{"url": url, "stream": stream}])))
                for sample in samples:
                    rows = decode_sample(sample, self.manifest.dtype, len(self.manifest.hook_points))
                    seen += len(rows)
                    yield rows
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(
                f"shard {info.name} listed in {self.location}/{MANIFEST} is missing; re-run "
                f"`sae harvest RECIPE` to rewrite it (it redoes only missing windows after you "
                f"delete that window's window-*.json)"
            ) from None
        except Exception as err:  # tarfile / numpy errors on a damaged file
            raise DataError(
                f"shard {info.name} in {self.location} is corrupt or truncated ({type(err).__name__}: "
                f"{err}). Check it with `sae harvest RECIPE --verify`, then delete it and its "
                f"window-*.json and re-run `sae harvest RECIPE`."
            ) from None
        if seen != info.rows:
            raise DataError(
                f"shard {info.name} in {self.location} holds {seen} rows, the manifest says {info.rows}: "
                f"it is truncated. Delete it and its window-*.json and re-run `sae harvest RECIPE`."
            )

    def verify_shard(self, index: int) -> None:
        info = self.manifest.shards[index]
        digest = hashlib.sha256()
        try:
            with open_url(self.shard_url(index)) as stream:
                for chunk in iter(lambda: stream.read(1 << 22), b""):
                    digest.update(chunk)
        except FileNotFoundError:
            raise DataError(f"shard {info.name} is missing from {self.location}") from None
        if digest.hexdigest() != info.sha256:
            raise DataError(
                f"shard {info.name} in {self.location} fails its checksum (sha256 {digest.hexdigest()[:12]}..., "
                f"manifest {info.sha256[:12]}...): it was changed or damaged after harvesting. "
                f"Delete it and its window-*.json and re-run `sae harvest RECIPE`."
            )

    def shard_order(self, epoch: int, seed: int, shuffle: bool) -> list[int]:
        if not shuffle:
            return list(range(self.n_shards))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(self.n_shards, generator=generator).tolist()

    def rank_shards(self, epoch: int, seed: int, shuffle: bool, rank: int, world: int) -> list[int]:
        if self.n_shards < world:
            raise DataError(
                f"the store {self.location} has {self.n_shards} shards for {world} ranks; every rank "
                f"needs its own. Harvest with a smaller harvest.rows_per_shard."
            )
        return self.shard_order(epoch, seed, shuffle)[rank::world]

    def rows_per_epoch(self, rank: int, world: int) -> int:
        """Rows the rank with the fewest rows reads in one epoch (epochs differ only in order,
        so this is the minimum over ranks of any epoch's split: computed for the worst case)."""
        sizes = sorted((s.rows for s in self.manifest.shards), reverse=True)
        return sum(sizes[-(len(sizes) // world):]) if world > 1 else sum(sizes)


class ActivationStream(IterableDataset):
    """Batches (one tensor per hook point) for one rank, starting after `start_row` rows."""

    def __init__(self, store: ActivationStore, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, epochs: int = 1, shuffle: bool = True, start_row: int = 0,
                 max_batches: int | None = None):
        super().__init__()
        self.store, self.batch_size, self.rank, self.world = store, batch_size, rank, world
        self.seed, self.epochs, self.shuffle = seed, epochs, shuffle
        self.start_row, self.max_batches = start_row, max_batches

    def _rows(self) -> Iterator[Rows]:
        to_skip = self.start_row
        for epoch in range(self.epochs):
            for index in self.store.rank_shards(epoch, self.seed, self.shuffle, self.rank, self.world):
                rows_here = self.store.manifest.shards[index].rows
                if to_skip >= rows_here:  # consumed before a resume: skip without reading
                    to_skip -= rows_here
                    continue
                yield from skip_rows(self.store.iter_shard(index), to_skip)
                to_skip = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return rebatch(self._rows(), self.batch_size, self.max_batches)

    def iter_rows(self) -> Iterator[Rows]:
        """Every row this rank reads (with tokens, contexts and positions), unbatched."""
        return self._rows()


def skip_rows(blocks: Iterator[Rows], n: int) -> Iterator[Rows]:
    """Drop the first n rows of a stream of blocks."""
    for rows in blocks:
        if n >= len(rows):
            n -= len(rows)
            continue
        yield rows.take(slice(n, None)) if n else rows
        n = 0


def rebatch(blocks: Iterator[Rows], batch_size: int, max_batches: int | None = None
            ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Blocks of any size -> batches of exactly `batch_size` rows (one float tensor per hook)."""
    pending: list[Rows] = []
    held = emitted = 0
    for rows in blocks:
        pending.append(rows)
        held += len(rows)
        while held >= batch_size:
            merged = Rows.cat(pending)
            batch, rest = merged.take(slice(0, batch_size)), merged.take(slice(batch_size, None))
            pending, held = ([rest] if len(rest) else []), len(rest)
            yield tuple(a.float() for a in batch.acts)
            emitted += 1
            if max_batches is not None and emitted >= max_batches:
                return
