"""Whether a recipe's 16-bit precision or dtype runs natively on this machine's CPU.

On CPU, torch hands bfloat16 and float16 matrix products to oneDNN only where the CPU has the
instructions for them (AVX-512 on x86: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`); elsewhere
(an AVX2-only CPU) it runs them in a plain reference kernel. On a 2-core AVX2 machine a
(512 × 576) @ (576 × 4,096) product took 5.2 s in bfloat16 and in float16 against 33 ms in
float32: a bf16 recipe that takes minutes on a GPU or an AVX-512 CPU would take days there. The
recipe stays valid (the same one runs on a GPU), so this is a warning that names the fix, not
an error.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# train.precision / pretrain.precision values, and lm.dtype's, that multiply in 16 bits
_HALF = {"bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "16-mixed": "float16", "16-true": "float16",
         "bfloat16": "bfloat16", "float16": "float16"}


def native_on_cpu(dtype: str) -> bool:
    """Whether this CPU multiplies `dtype` ("bfloat16" or "float16") matrices natively."""
    check = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch without the check: assume it is
        return True


def warn_if_emulated_on_cpu(key: str, precision: str, on_cpu: bool) -> None:
    """Log a warning when `precision` (the recipe's value of `key`: a Lightning precision or a
    dtype) runs on a CPU without native 16-bit matrix products."""
    dtype = _HALF.get(precision)
    if not on_cpu or dtype is None or native_on_cpu(dtype):
        return
    log.warning(
        "%s=%s on a CPU without native %s matrix products (%s; oneDNN needs AVX-512 for them): torch "
        "runs them in a reference kernel, about 150x slower than float32 on an AVX2 machine. Use "
        "%s=%s on this machine; keep %s for GPUs and AVX-512 CPUs.",
        key, precision, dtype, torch.backends.cpu.get_cpu_capability(), key,
        "float32" if precision == dtype else "32-true", precision,
    )
