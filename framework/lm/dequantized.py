"""A GGUF model's dequantised copy on disk, so that only the first load pays for the GGUF.

`transformers` reads a GGUF slowly: it parses the file's metadata once for the config, once for
the tokenizer and once more for the weights, then maps tensor names. For SmolLM2-135M that is
~50 s on two cores, in every process that loads it (each stage of a run, each torchrun rank), of
which dequantising the weights is ~3 s. The first load writes what it built as an ordinary
Hugging Face directory (config.json, model.safetensors in float32, the tokenizer) and later
loads read that in ~2 s.

The copy lives under `SAE_CACHE_DIR` (default `$XDG_CACHE_HOME/sae-framework`, else
`~/.cache/sae-framework`), one directory per GGUF content (its sha256) and `transformers`
version. Its `manifest.json` records the LM identity the GGUF load computed -- a model loaded
from the copy is named exactly as one loaded from the GGUF, so activation stores and checkpoints
do not tell them apart -- and sha256 fingerprints of the parameters and tokenizer, checked at
every load: a damaged copy is reported, removed and rebuilt from the GGUF. A copy that cannot be
written (disk full, read-only home) costs a warning, never the run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from framework.lm.base import Tokenizer
from framework.lm.hf import HFLM, load_hf, weights_sha256
from framework.lm.identity import parameters_sha256

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


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
    return cache_root() / f"{name}-{digest[:16]}-transformers-{transformers.__version__}"


def load_gguf(directory: Path, gguf_file: str, name: str, device: torch.device, dtype: torch.dtype) -> HFLM:
    """`load_hf` of a GGUF model, from its dequantised copy when there is a sound one."""
    copy = copy_dir(directory, gguf_file, name)
    lm = _read_copy(copy, name)
    if lm is None:
        # Always float32 on the CPU first: that is what the GGUF dequantises to and what is kept.
        lm = load_hf(str(directory), "cpu", torch.float32, gguf_file=gguf_file, name=name)
        _write_copy(lm, copy)
    return lm.to(device=device, dtype=dtype)


def _read_copy(copy: Path, name: str) -> HFLM | None:
    if not copy.exists():
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        manifest = json.loads((copy / MANIFEST).read_text())
        model = AutoModelForCausalLM.from_pretrained(str(copy), dtype=torch.float32)
        tokenizer = Tokenizer(AutoTokenizer.from_pretrained(str(copy)))
        damage = [what for what, found, recorded in (
            ("parameters", parameters_sha256(model), manifest["parameters_sha256"]),
            ("tokenizer", tokenizer.fingerprint, manifest["identity"]["tokenizer_sha256"]),
        ) if found != recorded]
        if damage:
            raise ValueError(f"its {' and '.join(damage)} differ from the sha256 recorded when it was written")
    except Exception as err:  # noqa: BLE001 -- any unreadable copy is rebuilt, whatever broke it
        log.warning("the dequantised copy of %s at %s is damaged (%s): removing it and loading the GGUF again",
                    name, copy, err)
        shutil.rmtree(copy, ignore_errors=True)
        return None
    return HFLM(model, tokenizer, name, manifest["identity"])


def _write_copy(lm: HFLM, copy: Path) -> None:
    """Written under a temporary name and renamed: a reader sees a whole copy or none, and two
    processes writing at once (torchrun ranks) leave one."""
    from safetensors.torch import save_model

    temporary = None
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{copy.name}.", dir=copy.parent))
        config = lm.model.config.to_dict()
        config.pop("quantization_config", None)  # the copy is plain float32, not a GGUF
        (temporary / "config.json").write_text(json.dumps(config, indent=2))
        save_model(lm.model, str(temporary / "model.safetensors"))  # tied embeddings stored once
        lm.tokenizer.hf.save_pretrained(str(temporary))
        manifest = {"parameters_sha256": parameters_sha256(lm.model), "identity": lm.identity}
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2))
        # mkdtemp's 0700 and safetensors' 0600 would keep the copy from others sharing the cache.
        for path in (temporary, *temporary.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.rename(temporary, copy)
        temporary = None
    except Exception as err:  # noqa: BLE001 -- ENOSPC reaches here as safetensors' own error type
        if not copy.is_dir():  # (an existing copy: another process renamed its copy there first)
            log.warning("could not keep a dequantised copy of %s at %s (%s); the next load reads the GGUF "
                        "again (set SAE_CACHE_DIR to a writable directory with ~%d MB free)",
                        lm.name, copy, err, _size_mb(lm))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _size_mb(lm: HFLM) -> int:
    return sum(p.numel() * 4 for p in lm.model.parameters()) // 10**6
