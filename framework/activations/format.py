"""The activation shard format: plain WebDataset tar files plus one manifest.json.

Why tar + .npy: any tool can list a shard (`tar tf`), any language can read .npy (a 128-byte
header and raw little-endian data), and WebDataset streams tar from a local disk, `pipe:`,
http(s) or object storage without a custom server. Nothing is pickled, so reading a store from
elsewhere cannot run code.

A shard `shard-{index:06d}.tar` holds samples of up to `rows_per_sample` rows. Sample `k` of
shard `s` is the group of members with the key `{s:06d}_{k:06d}`:

    {key}.acts{h}.npy    (rows, d_h) activations of hook point h (manifest "hook_points"[h]) in
                         the manifest's dtype; bfloat16, which .npy cannot name, is stored as
                         uint16 holding the raw bfloat16 bits
    {key}.token.npy      (rows,) int32  token id at that position
    {key}.context.npy    (rows,) int64  context id (in the text split's packing order)
    {key}.position.npy   (rows,) int16  position of the token inside its context

`manifest.json` describes the whole store (see `Manifest`); a shard listed there is complete and
its sha256 is recorded. Shards are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from framework.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What the .npy member holds for each store dtype.
NUMPY_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass
class ShardInfo:
    name: str
    rows: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    model: dict  # the LM's identity: name, revision or weights hash, tokenizer
    hook_points: list[str]
    d: list[int]  # width of each hook point
    dtype: str
    rows: int
    rows_per_sample: int
    rows_per_shard: int
    context_length: int
    tokens_per_context: int
    text: dict  # the text source section and the split harvested
    split: str
    # Per hook: mean (d,) and mean L2 norm of the rows, so training can scale inputs to norm
    # sqrt(d) and analysis can mean-ablate.
    normalisation: dict[str, dict]
    shards: list[ShardInfo]
    recipe: dict
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def width(self, hook: str) -> int:
        return self.d[self.hook_points.index(hook)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> Manifest:
        """The manifest in `data` (a manifest.json read at `where`); DataError if it is not one
        this version reads."""
        version = data.get("format_version", FORMAT_VERSION) if isinstance(data, dict) else FORMAT_VERSION
        if version != FORMAT_VERSION:  # first: another format may have other fields
            raise DataError(f"{where or MANIFEST} is in shard format {version}; this version of the framework "
                            f"reads format {FORMAT_VERSION}. Use the framework version that harvested it, or "
                            f"re-harvest into an empty directory.")
        try:
            data = dict(data)
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            return cls(**data)
        except (TypeError, KeyError, ValueError) as err:
            raise DataError(f"{where or MANIFEST} is not a valid manifest ({type(err).__name__}: {err}); "
                            f"re-run `sae harvest RECIPE` into an empty directory.") from None


def read_manifest(store: str | os.PathLike) -> Manifest:
    """The manifest of a local store directory, with an error that says what to do."""
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"no {MANIFEST} in {store}: the activation store is missing or its harvest did not "
            f"finish. Run `sae harvest RECIPE` (it resumes where it stopped)."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a valid manifest ({err}); re-run `sae harvest RECIPE`.") from None
    return Manifest.from_dict(data, str(path))


def write_manifest(store: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(store) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(manifest.to_json())
    tmp.replace(path)
    return path


def _npy_member(array: np.ndarray) -> io.BytesIO:
    """The .npy encoding of `array`, positioned at its start, ready for tarfile to copy."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    buffer.seek(0)
    return buffer


class _HashingWriter:
    """A file wrapper that hashes what passes through it, so a shard's sha256 costs no second
    read of the file."""

    def __init__(self, raw):
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """Activations as the numpy array written to disk (bfloat16 as its raw uint16 bits)."""
    cast = acts.to(TORCH_DTYPES[dtype]).contiguous().cpu()
    if dtype == "bfloat16":
        return cast.view(torch.int16).numpy().view(np.uint16)
    return cast.numpy()


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


@dataclass
class Rows:
    """A block of rows: activations per hook plus where each row came from."""

    acts: list[torch.Tensor]  # per hook point: (rows, d_h)
    token: torch.Tensor  # (rows,) int
    context: torch.Tensor  # (rows,) int
    position: torch.Tensor  # (rows,) int

    def __len__(self) -> int:
        return len(self.token)

    def take(self, index: torch.Tensor | slice) -> Rows:
        return Rows([a[index] for a in self.acts], self.token[index], self.context[index], self.position[index])

    @staticmethod
    def cat(blocks: list[Rows]) -> Rows:
        return Rows(
            [torch.cat([b.acts[h] for b in blocks]) for h in range(len(blocks[0].acts))],
            torch.cat([b.token for b in blocks]),
            torch.cat([b.context for b in blocks]),
            torch.cat([b.position for b in blocks]),
        )


def write_shard(path: Path, shard_index: int, rows: Rows, dtype: str, rows_per_sample: int) -> ShardInfo:
    """Write a complete shard atomically: temporary name, fsync, rename. Returns its info."""
    tmp = path.with_name(f".{path.name}.partial")
    # Converted once per shard rather than per sample: one pass over the rows.
    stored = [to_storage(a, dtype) for a in rows.acts]
    token = rows.token.numpy().astype(np.int32)
    context = rows.context.numpy().astype(np.int64)
    position = rows.position.numpy().astype(np.int16)
    try:
        with open(tmp, "wb") as raw:
            out = _HashingWriter(raw)
            with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                tar.copybufsize = 1 << 22  # members are copied in 4 MiB pieces, not tarfile's 16 KiB
                for k, start in enumerate(range(0, len(rows), rows_per_sample)):
                    block = slice(start, start + rows_per_sample)
                    key = f"{shard_index:06d}_{k:06d}"
                    members = {f"acts{h}.npy": a[block] for h, a in enumerate(stored)}
                    members.update({"token.npy": token[block], "context.npy": context[block],
                                    "position.npy": position[block]})
                    for ext, array in members.items():
                        data = _npy_member(array)
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = data.getbuffer().nbytes
                        tar.addfile(info, data)
            raw.flush()
            os.fsync(raw.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # its own partial only: other writers (threads, ranks) share the directory
        raise
    size = tmp.stat().st_size
    if size != out.size:
        raise OSError(errno.EIO, f"{tmp} holds {size} bytes, {out.size} were written")
    tmp.replace(path)
    return ShardInfo(name=path.name, rows=len(rows), sha256=out.digest.hexdigest(), bytes=size)


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def npy_array(data: bytes | bytearray) -> np.ndarray:
    """The array in .npy bytes, as np.load(allow_pickle=False) reads it, but viewing `data` (writable
    when it is a bytearray) instead of copying it, and parsing each distinct header once: np.load
    parses every header with ast.literal_eval and copies the data, 2 of the 7 ms it took to read a
    4,096-row batch (5 members per sample) on one CPU core."""
    if bytes(data[:6]) != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy member")
    start = 10 if data[6] == 1 else 12  # magic, version, then a 2- (v1) or 4-byte header length
    end = start + int.from_bytes(data[8:start], "little")
    header = bytes(data[:end])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        stream = io.BytesIO(header)
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
        if dtype.hasobject:
            raise ValueError("a .npy member of Python objects (pickled): refused")
        if len(_NPY_HEADERS) > 1024:  # a handful of distinct headers per store; bounded anyway
            _NPY_HEADERS.clear()
        parsed = _NPY_HEADERS[header] = (dtype, shape, fortran)
    dtype, shape, fortran = parsed
    if isinstance(data, bytes):  # immutable (a streamed member): a writable copy, as np.load makes
        data = bytearray(data)
    count = math.prod(shape)
    array = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return array.reshape(shape, order="F" if fortran else "C")


def decode_sample(sample: dict, dtype: str, n_hooks: int) -> Rows:
    """A WebDataset sample (member extension -> bytes) back into rows."""

    def load(ext: str) -> np.ndarray:
        if ext not in sample:
            raise DataError(
                f"sample {sample.get('__key__')} of {sample.get('__url__')} has no {ext} member: "
                f"the shard is truncated or not an activation shard. Run `sae harvest RECIPE --verify`."
            )
        return npy_array(sample[ext])

    return Rows(
        acts=[from_storage(load(f"acts{h}.npy"), dtype) for h in range(n_hooks)],
        token=torch.from_numpy(load("token.npy").astype(np.int64)),
        context=torch.from_numpy(load("context.npy")),
        position=torch.from_numpy(load("position.npy").astype(np.int64)),
    )
