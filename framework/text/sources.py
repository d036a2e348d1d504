"""Text sources: every corpus becomes one deterministic stream of `Document`s.

Later stages identify a token by (context id, position), so the same recipe must yield the same
documents in the same order on every machine and every run. Each reader therefore sorts what
it lists and names each document by a path *relative to the source* (plus a line or row
number), never by an absolute path: moving a corpus keeps its train/held-out split.

The default corpus is the Python standard library's own source (about 13 MB of .py without its
test suites): already on every machine that runs this code, so quickstarts need no download.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from framework.config import TextConfig
from framework.errors import DataError

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


class TextSourceError(DataError):
    """A text source that cannot be read; the message says what to change."""


@dataclass(frozen=True)
class Document:
    doc_id: str  # stable across machines: relative path (+ ":line" / ":row")
    text: str


def iter_documents(cfg: TextConfig) -> Iterator[Document]:
    """Every document of `cfg.source` in a fixed order, at most `cfg.max_documents` of them."""
    docs = _read_source(cfg)
    return islice(docs, cfg.max_documents) if cfg.max_documents is not None else docs


def _read_source(cfg: TextConfig) -> Iterator[Document]:
    if cfg.source == "stdlib":
        return _stdlib_documents()
    if cfg.source.startswith("hf:"):
        return _hf_documents(cfg)
    return _file_documents(cfg)


# ---- the Python standard library ---------------------------------------------------------------


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def stdlib_files() -> tuple[Path, ...]:
    """The running interpreter's stdlib .py files, without test suites or site-packages."""
    root = stdlib_root()
    files = (p for p in root.rglob("*.py") if not STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


@functools.cache
def stdlib_identity() -> dict:
    """Which standard library `text.source: stdlib` reads in this process: the Python version, the
    number of files and a digest of their names and bytes. It differs between Python builds
    (Debian packages idlelib and tkinter apart; two files hold the install prefix) and nothing in
    a recipe names it, so the pretrained LM records it (a stage run by another Python is warned)."""
    root = stdlib_root()
    digest = hashlib.sha256()
    for path in stdlib_files():
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return {"python": platform.python_version(), "files": len(stdlib_files()), "sha256": digest.hexdigest()[:16]}


def _stdlib_documents() -> Iterator[Document]:
    root = stdlib_root()
    for path in stdlib_files():
        # A few stdlib files are latin-1; replacing the odd byte beats dropping the file.
        text = path.read_bytes().decode("utf-8", errors="replace")
        yield Document(f"stdlib/{path.relative_to(root).as_posix()}", text)


# ---- local files: .txt, .jsonl, .parquet ---------------------------------------------------------


def _list_files(source: str) -> tuple[Path, list[Path]]:
    """(root that document ids are relative to, the matching files in sorted order)."""
    path = Path(source).expanduser()
    if path.is_file():
        root, files = path.parent, [path]
    elif path.is_dir():
        root, files = path, [p for p in path.rglob("*") if p.is_file()]
    elif glob.has_magic(source):
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
        root = Path(*path.parts[: _magic_index(path)])
    else:
        raise TextSourceError(
            f"text.source {source!r}: no such file or directory. Use 'stdlib', a path or glob of "
            f".txt/.jsonl/.parquet files, or 'hf:NAME[:CONFIG]'"
        )
    files = sorted(p for p in files if p.suffix in FILE_SUFFIXES)
    if not files:
        raise TextSourceError(
            f"text.source {source!r} matches no {'/'.join(FILE_SUFFIXES)} files; check the path or glob"
        )
    return root, files


def _magic_index(path: Path) -> int:
    return next(i for i, part in enumerate(path.parts) if glob.has_magic(part))


def _file_documents(cfg: TextConfig) -> Iterator[Document]:
    root, files = _list_files(cfg.source)
    readers = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
    for path in files:
        yield from readers[path.suffix](path, path.relative_to(root).as_posix(), cfg.text_field)


def _txt_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    yield Document(name, path.read_text(encoding="utf-8", errors="replace"))


def _jsonl_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise TextSourceError(
                    f"{path}:{number} has no field {text_field!r} (fields: {', '.join(record)}); "
                    f"set text.text_field to the field holding the text"
                )
            text = record[text_field]
            if text is not None and not isinstance(text, str):
                raise TextSourceError(f"{path}:{number}: field {text_field!r} holds {type(text).__name__}, not text; "
                                      f"set text.text_field to the field holding the text")
            yield Document(f"{name}:{number}", text or "")  # null: an empty document, as parquet's


def _parquet_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    columns = table.schema_arrow.names
    if text_field not in columns:
        raise TextSourceError(
            f"{path} has no column {text_field!r} (columns: {', '.join(columns)}); "
            f"set text.text_field to the column holding the text"
        )
    row = 0
    for batch in table.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield Document(f"{name}:{row}", text or "")
            row += 1


# ---- Hugging Face datasets ----------------------------------------------------------------------


def _hf_documents(cfg: TextConfig) -> Iterator[Document]:
    name, _, config = cfg.source[len("hf:"):].partition(":")
    dataset = _load_hf_dataset(name, config or None, cfg.hf_split)
    if cfg.text_field not in dataset.column_names:
        raise TextSourceError(
            f"dataset {name!r} has no column {cfg.text_field!r} (columns: "
            f"{', '.join(dataset.column_names)}); set text.text_field"
        )
    row = 0
    for batch in dataset.select_columns([cfg.text_field]).iter(batch_size=1024):
        for text in batch[cfg.text_field]:
            yield Document(f"{name}:{cfg.hf_split}:{row}", text or "")
            row += 1


def _load_hf_dataset(name: str, config: str | None, split: str):
    try:
        import datasets
    except ImportError:
        raise TextSourceError("text.source 'hf:...' needs the `datasets` package: pip install datasets") from None
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types: missing, offline, bad split
        raise TextSourceError(
            f"cannot load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): {err}. "
            f"Without network only datasets already in the local HF cache (or a local dataset "
            f"directory) load; or point text.source at local .txt/.jsonl/.parquet files"
        ) from None
