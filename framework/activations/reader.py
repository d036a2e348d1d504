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
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from framework.activations.format import MANIFEST, Manifest, Rows, decode_sample
from framework.config import is_url
from framework.errors import DataError

log = logging.getLogger(__name__)
# A harvest re-run redoes the window of any shard that is missing or not at its recorded size.
RERUN_HARVEST = "re-run `sae harvest RECIPE`, which harvests that shard's window again, identically"
REHARVEST = f"Delete it and {RERUN_HARVEST}."


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


def heldout_split_present(location: str) -> bool:
    """Whether a local held-out split directory exists (readable or not). Remote stores cannot
    tell a missing split from a broken one: False."""
    return not is_url(location) and Path(location).is_dir()


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
    return Manifest.from_dict(data, url)


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

    def iter_shard(self, index: int, keep: Callable[[int, int], bool] | None = None,
                   verify: bool = True) -> Iterator[Rows | Skipped]:
        """The rows of one shard, sample by sample, with errors that name the shard.

        `keep(first, end)` (rows first..end-1 of the shard) says whether a sample is wanted; one
        that is not is read past without decoding and comes out as `Skipped` (its row count).
        `verify=False` leaves the checksum (of a store opened with verify) to another reader."""
        info = self.manifest.shards[index]
        url = self.shard_url(index)
        if self.verify and verify:
            self.verify_shard(index)
        per_sample = self.manifest.rows_per_sample
        seen = 0

        def wanted(sample_index: int) -> bool:
            # Every sample of a shard holds rows_per_sample rows, the last one the rest.
            first = sample_index * per_sample
            end = min(first + per_sample, info.rows)
            return keep is None or end <= first or keep(first, end)

        try:
            # shard URL -> stream -> tar members -> samples grouped by key (webdataset's
            # group_by_keys, fed members of a stream opened here, so fsspec URLs work too)
            with open_url(url) as stream:
                for sample in group_by_keys(tar_members(stream, url, wanted)):
                    expected = min(per_sample, info.rows - seen)
                    if _declined(sample):
                        seen += expected
                        yield Skipped(expected)
                        continue
                    rows = decode_sample(sample, self.manifest.dtype, len(self.manifest.hook_points))
                    widths = [a.shape[1] for a in rows.acts]
                    if widths != self.manifest.d:
                        raise DataError(
                            f"shard {info.name} in {self.location} holds rows {widths} wide where its "
                            f"{MANIFEST} says d={self.manifest.d} ({', '.join(self.manifest.hook_points)}). "
                            f"Check the store with `sae harvest RECIPE --verify` (a shard from elsewhere fails its "
                            f"checksum); if it passes, {MANIFEST} was edited: delete it and re-run `sae harvest "
                            f"RECIPE`, which rebuilds it from the harvested windows"
                        )
                    if len(rows) != expected:
                        raise DataError(
                            f"sample {sample.get('__key__')} of shard {info.name} in {self.location} holds "
                            f"{len(rows)} rows where the manifest's rows_per_sample={per_sample} says "
                            f"{expected}: the shard does not match its manifest. {REHARVEST}"
                        )
                    seen += len(rows)
                    yield rows
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(
                f"shard {info.name} listed in {self.location}/{MANIFEST} is missing; {RERUN_HARVEST}"
            ) from None
        except Exception as err:  # tarfile / numpy errors on a damaged file
            raise DataError(
                f"shard {info.name} in {self.location} is corrupt or truncated ({type(err).__name__}: "
                f"{err}). Check it with `sae harvest RECIPE --verify`. {REHARVEST}"
            ) from None
        if seen != info.rows:
            raise DataError(
                f"shard {info.name} in {self.location} holds {seen} rows, the manifest says {info.rows}: "
                f"it is truncated. {REHARVEST}"
            )

    def checksum_problem(self, index: int) -> str | None:
        """What is wrong with the shard's bytes ("missing", or another sha256 than the manifest's);
        None when they are the ones harvested."""
        info = self.manifest.shards[index]
        digest = hashlib.sha256()
        try:
            with open_url(self.shard_url(index)) as stream:
                for chunk in iter(lambda: stream.read(1 << 22), b""):
                    digest.update(chunk)
        except FileNotFoundError:
            return "missing"
        if digest.hexdigest() != info.sha256:
            return (f"fails its checksum (sha256 {digest.hexdigest()[:12]}..., manifest {info.sha256[:12]}...): "
                    f"changed or damaged after harvesting")
        return None

    def verify_shard(self, index: int) -> None:
        problem = self.checksum_problem(index)
        if problem == "missing":
            raise DataError(f"shard {self.manifest.shards[index].name} is missing from {self.location}; "
                            f"{RERUN_HARVEST}")
        if problem:
            raise DataError(f"shard {self.manifest.shards[index].name} in {self.location} {problem}. {REHARVEST}")

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


def open_heldout_store(store_location: str, verify: bool = False) -> ActivationStore | None:
    """The held-out split of the store at `store_location`, or None where it has none. A split
    that is there but unreadable raises: its rows must not quietly be replaced by others."""
    location = sub_store(store_location, "heldout")
    try:
        return ActivationStore(location, verify=verify)
    except DataError:
        if heldout_split_present(location):
            raise
        return None


def tar_members(stream, url: str, wanted: Callable[[int], bool]) -> Iterator[dict]:
    """The members of a tar stream as webdataset's file samples ({"fname", "data", "__url__"}),
    for its group_by_keys; the members of a sample `wanted(index)` declines (index: the sample's
    position in the tar, counted by key as group_by_keys groups them) come with data None.

    A local file is read with random access: tarfile reads each header and seeks past data, and
    a member's data is read in one call, straight into a buffer its array then views (webdataset's
    streaming expander reads every member in 10 KiB pieces through Python: reading a 4,096-row
    batch of d 576 took 7.3 ms on one CPU core, half of it in tarfile's read loop). A declined
    sample's members are never read: DataLoader workers each read only their own batches. Other
    streams (pipes, object stores) are read through webdataset's expander, start to end."""
    if not _local_file(stream, url):
        index, key = -1, None
        for member in tar_file_expander(iter([{"url": url, "stream": stream}])):
            if "fname" not in member:  # {}: webdataset's end-of-sample mark
                yield member
                continue
            prefix = base_plus_ext(member["fname"])[0]
            if prefix is not None and prefix != key:
                index, key = index + 1, prefix
            yield member if prefix is None or wanted(index) else {**member, "data": None}
        return
    index, key, take = -1, None, True
    with tarfile.open(fileobj=stream, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            prefix = base_plus_ext(info.name)[0]
            if prefix is not None and prefix != key:
                index, key = index + 1, prefix
                take = wanted(index)
            data = None
            if take or prefix is None:
                data = bytearray(info.size)
                stream.seek(info.offset_data)
                if stream.readinto(data) != info.size:
                    raise tarfile.ReadError(f"unexpected end of data in {info.name}")
            yield {"fname": info.name, "data": data, "__url__": url}


def _local_file(stream, url: str) -> bool:
    scheme = urlparse(url).scheme
    seekable = getattr(stream, "seekable", None)
    return (scheme in ("", "file") or len(scheme) == 1) and seekable is not None and seekable()


def _declined(sample: dict) -> bool:
    return any(value is None for key, value in sample.items() if not key.startswith("__"))


class Skipped:
    """Rows of a sample read past without decoding (not needed by this reader): only a count."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def take(self, index: slice) -> Skipped:
        return Skipped(len(range(self.n)[index]))


class ActivationStream(IterableDataset):
    """Batches (one tensor per hook point) for one rank, starting after `start_row` rows.

    In DataLoader worker processes (train.num_workers > 0), worker w of W yields batches w,
    w + W, w + 2W, ... of the same sequence, which the DataLoader's round-robin puts back in
    order: the batches are those of one process, whatever the number of workers. Each worker
    reads every shard that holds rows of its batches, decodes only the samples they need, and
    checks a shard's checksum (harvest.verify_on_read) only if it yields the shard's first batch,
    which the DataLoader hands out before any later batch of that shard."""

    def __init__(self, store: ActivationStore, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, epochs: int = 1, shuffle: bool = True, start_row: int = 0,
                 max_batches: int | None = None, dtype: torch.dtype | None = torch.float32):
        """`dtype`: of the batches; None keeps the store's (training's loader: a bfloat16 store's
        batches then cross to the device at half the bytes, and widen there)."""
        super().__init__()
        self.store, self.batch_size, self.rank, self.world = store, batch_size, rank, world
        self.seed, self.epochs, self.shuffle = seed, epochs, shuffle
        self.start_row, self.max_batches, self.dtype = start_row, max_batches, dtype

    def _rows(self, share: WorkerShare | None = None) -> Iterator[Rows | Skipped]:
        """The rows after `start_row`, block by block. With a worker's `share`, the rows of other
        workers' batches may come out as `Skipped`. Rows before `start_row` in a shard partly
        consumed before a resume are never decoded."""
        to_skip, position = self.start_row, 0
        for epoch in range(self.epochs):
            for index in self.store.rank_shards(epoch, self.seed, self.shuffle, self.rank, self.world):
                rows_here = self.store.manifest.shards[index].rows
                if to_skip >= rows_here:  # consumed before a resume: skip without reading
                    to_skip -= rows_here
                    continue
                # shard row r is stream position `origin + r`; this shard gives positions first..end-1
                origin, skip_here = position - to_skip, to_skip
                first, end = position, origin + rows_here
                if share is not None and not share.needs(first, end):
                    yield Skipped(end - first)  # none of this worker's rows: not even opened
                else:
                    def keep(lo: int, hi: int, origin=origin, skip_here=skip_here) -> bool:
                        if hi <= skip_here:
                            return False
                        return share is None or share.needs(origin + max(lo, skip_here), origin + hi)

                    verify = share is None or share.owns(first)
                    yield from skip_rows(self.store.iter_shard(index, keep, verify), to_skip)
                position = end
                to_skip = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        worker = get_worker_info()
        if worker is None or worker.num_workers == 1:
            return rebatch(self._rows(), self.batch_size, self.max_batches, dtype=self.dtype)
        share = WorkerShare(worker.id, worker.num_workers, self.batch_size, self.max_batches)
        return rebatch(self._rows(share), self.batch_size, self.max_batches, share, self.dtype)

    def iter_rows(self) -> Iterator[Rows]:
        """Every row this rank reads (with tokens, contexts and positions), unbatched."""
        return self._rows()


class WorkerShare:
    """The batches DataLoader worker `worker` of `workers` yields: worker, worker + workers, ...
    (those below `max_batches`, when it is given)."""

    def __init__(self, worker: int, workers: int, batch_size: int, max_batches: int | None):
        self.worker, self.workers, self.batch_size, self.max_batches = worker, workers, batch_size, max_batches

    def owns(self, position: int) -> bool:
        """Whether the batch holding stream row `position` is this worker's."""
        return (position // self.batch_size) % self.workers == self.worker

    def needs(self, first: int, end: int) -> bool:
        """Whether stream rows first..end-1 overlap one of this worker's batches."""
        if end <= first:
            return False
        last = (end - 1) // self.batch_size
        if self.max_batches is not None:
            last = min(last, self.max_batches - 1)
        start = first // self.batch_size
        start += (self.worker - start) % self.workers  # its first batch from there on
        return start <= last

    def last_batch(self) -> int | None:
        """Its last batch (-1: none), or None when the stream's length is not given."""
        if self.max_batches is None:
            return None
        top = self.max_batches - 1
        return top - (top - self.worker) % self.workers if top >= self.worker else -1


def _compact(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it where it views a larger block (a batch smaller than a tar sample): a
    worker would otherwise send, and pinning copy, the whole sample."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def skip_rows(blocks: Iterator[Rows | Skipped], n: int) -> Iterator[Rows | Skipped]:
    """Drop the first n rows of a stream of blocks."""
    for rows in blocks:
        if n >= len(rows):
            n -= len(rows)
            continue
        yield rows.take(slice(n, None)) if n else rows
        n = 0


def rebatch(blocks: Iterator[Rows | Skipped], batch_size: int, max_batches: int | None = None,
            share: WorkerShare | None = None, dtype: torch.dtype | None = torch.float32
            ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Blocks of any size -> batches of exactly `batch_size` rows (one tensor per hook, in `dtype`,
    or as stored for None).

    With a worker's `share`: only its batches of that sequence, whose rows must all be real (the
    rows of others may arrive as `Skipped`); it stops after its last one."""
    last = max_batches - 1 if max_batches is not None else None
    if share is not None:
        last = share.last_batch()
    if last is not None and last < 0:
        return
    pending: list[Rows] = []
    batch = position = 0  # the batch being filled; rows of the stream seen so far
    for block in blocks:
        offset, size = 0, len(block)
        while offset < size:
            take = min(size - offset, (batch + 1) * batch_size - position)
            if share is None or batch % share.workers == share.worker:
                if isinstance(block, Skipped):
                    raise RuntimeError(f"batch {batch} needs rows that were skipped without decoding")
                pending.append(block.take(slice(offset, offset + take)) if (offset, take) != (0, size) else block)
            offset += take
            position += take
            if position == (batch + 1) * batch_size:
                if pending:
                    merged = pending[0] if len(pending) == 1 else Rows.cat(pending)
                    yield tuple(_compact(a) if dtype is None else a.to(dtype) for a in merged.acts)
                pending = []
                if batch == last:
                    return  # before reading on: the next block may open another shard
                batch += 1
