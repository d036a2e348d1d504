"""A GGUF model's dequantised copy on disk, so that only the first load pays for the GGUF.

`transformers` reads a GGUF slowly: it parses the file's metadata once for the config, once for
the tokenizer and once more for the weights, then maps tensor names. For SmolLM2-135M that is
~50 s on two cores, in every process that loads it (each stage of a run, each torchrun rank), of
which dequantising the weights is ~3 s. The first load writes what it built as an ordinary
Hugging Face directory (config.json, model.safetensors in float32, the tokenizer) and later
loads read that in ~2 s.

The copy lives under `SAE_CACHE_DIR` (default `$XDG_CACHE_HOME/sae-framework`, else
`~/.cache/sae-framework`), one directory per GGUF content (its sha256), `transformers` version
and COPY_FORMAT. Trust and damage:
- only a copy this user owns is read (it is private to them, as `mkdtemp` makes it): a copy
  someone else could have written would put their weights under SmolLM2's name;
- its manifest records the GGUF's sha256 and the sha256 of every file of the copy, checked at
  every load (~1 s): a damaged copy (cut short, changed) is reported, removed and rebuilt;
- the LM identity is computed as `load_hf` computes it for the GGUF (`hf_identity`), so
  activation stores and checkpoints do not tell the two loads apart;
- one process builds the copy while the others wait for it (an exclusive `flock` on a file
  beside it; readers share it): the ranks of a first torchrun job read the GGUF once, not once
  each;
- a copy that cannot be written (disk full, read-only cache) costs a warning, never the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from framework.artifacts import files_sha256
from framework.lm.base import Tokenizer
from framework.lm.hf import HFLM, hf_identity, load_hf, weights_sha256
from framework.locks import lock_file

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
COPY_FORMAT = 1  # raised whenever what a copy holds or how it is checked changes


def cache_root() -> Path:
    configured = os.environ.get("SAE_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sae-framework"


def copy_dir(directory: Path, gguf_file: str, name: str) -> Path:
    """Where the dequantised copy of `directory/gguf_file` is (or would be) kept."""
    import transformers

    digest = weights_sha256(directory, gguf_file)
    return cache_root() / f"{name}-{digest[:16]}-transformers-{transformers.__version__}-copy{COPY_FORMAT}"


def load_gguf(directory: Path, gguf_file: str, name: str, device: torch.device, dtype: torch.dtype) -> HFLM:
    """`load_hf` of a GGUF model, from its dequantised copy when there is a sound one of this
    user's. The returned model's `loaded_from` says which it was."""
    copy = copy_dir(directory, gguf_file, name)
    existed = copy.exists()
    with _locked(copy, fcntl.LOCK_SH):  # readers side by side; a builder has the lock to itself
        lm = _read_copy(copy, directory, gguf_file, name)
    if lm is None:
        unusable = existed and copy.exists()  # another user's, or damaged and not removable: left alone
        with contextlib.nullcontext() if unusable else _locked(copy, fcntl.LOCK_EX, clear_leftovers=True):
            if not unusable and copy.exists():  # another process built it while this one waited
                lm = _read_copy(copy, directory, gguf_file, name)
            if lm is None:
                # Always float32 on the CPU first: what the GGUF dequantises to and what is kept.
                lm = load_hf(str(directory), "cpu", torch.float32, gguf_file=gguf_file, name=name)
                lm.loaded_from = directory / gguf_file
                if not unusable:
                    _write_copy(lm, copy)
    return lm.to(device=device, dtype=dtype)


def _read_copy(copy: Path, directory: Path, gguf_file: str, name: str) -> HFLM | None:
    if not copy.exists():
        return None
    if copy.stat().st_uid != os.getuid():
        log.warning("the dequantised copy of %s at %s belongs to another user, so its weights are not trusted: "
                    "loading the GGUF (set SAE_CACHE_DIR to a directory of your own)", name, copy)
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        manifest = json.loads((copy / MANIFEST).read_text())
        changed = sorted(file for file, digest in manifest["files_sha256"].items()
                         if files_sha256([copy / file]) != digest)
        if changed or manifest["gguf_sha256"] != weights_sha256(directory, gguf_file):
            raise ValueError(f"{', '.join(changed) or 'its GGUF'} differ from the sha256 recorded when it was written")
        model = AutoModelForCausalLM.from_pretrained(str(copy), dtype=torch.float32, use_safetensors=True)
        tokenizer = Tokenizer(AutoTokenizer.from_pretrained(str(copy)))
    except Exception as err:  # noqa: BLE001 -- whatever broke it, the copy is rebuilt from the GGUF
        removed = _remove(copy)
        log.warning("the dequantised copy of %s at %s cannot be used (%s: %s): %s; loading the GGUF", name, copy,
                    type(err).__name__, err, "removed, to be rebuilt" if removed else
                    "it cannot be removed either, so set SAE_CACHE_DIR to a directory of your own")
        return None
    lm = HFLM(model, tokenizer, name, hf_identity(name, str(directory), model, tokenizer, str(directory), gguf_file))
    lm.loaded_from = copy
    log.info("loaded %s from its dequantised copy at %s", name, copy)
    return lm


def _write_copy(lm: HFLM, copy: Path) -> None:
    """Written under a temporary name and renamed: a reader sees a whole copy or none."""
    from safetensors.torch import save_model

    temporary = None
    try:
        temporary = Path(tempfile.mkdtemp(prefix=f".{copy.name}.", dir=copy.parent))  # private: mode 0700
        config = lm.model.config.to_dict()
        config.pop("quantization_config", None)  # the copy is plain float32, not a GGUF
        (temporary / "config.json").write_text(json.dumps(config, indent=2))
        save_model(lm.model, str(temporary / "model.safetensors"))  # tied embeddings stored once
        lm.tokenizer.hf.save_pretrained(str(temporary))
        manifest = {"gguf_sha256": lm.identity["weights_sha256"],
                    "files_sha256": {path.name: files_sha256([path]) for path in sorted(temporary.iterdir())}}
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.rename(temporary, copy)
        temporary = None
        log.info("kept a dequantised copy of %s at %s for later loads", lm.name, copy)
    except Exception as err:  # noqa: BLE001 -- ENOSPC reaches here as safetensors' own error type
        log.warning("could not keep a dequantised copy of %s at %s (%s); the next load reads the GGUF again "
                    "(set SAE_CACHE_DIR to a writable directory with ~%d MB free)", lm.name, copy, err, _size_mb(lm))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def _locked(copy: Path, kind: int, clear_leftovers: bool = False) -> Iterator[None]:
    """Hold the copy's lock file (`flock`, shared or exclusive: blocking) while the body runs.
    Under the exclusive lock, what an earlier builder left half-written (killed mid-write) is
    removed. Where no lock file can be made, nothing is locked (nor can the copy be written
    there: the write's warning says so)."""
    with lock_file(copy.parent / f".{copy.name}.lock", mode=0o600) as fd:
        if fd is not None:
            fcntl.flock(fd, kind)
            if clear_leftovers:
                for leftover in copy.parent.glob(f".{copy.name}.*"):
                    if leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
        yield


def _remove(copy: Path) -> bool:
    """Renamed aside first, so that no reader finds half of it; then deleted."""
    aside = copy.with_name(f".{copy.name}.removed-{os.getpid()}")
    try:
        os.rename(copy, aside)
    except OSError:
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


def _size_mb(lm: HFLM) -> int:
    return sum(p.numel() * 4 for p in lm.model.parameters()) // 10**6
