"""Hardware fallbacks behind one interface: which device and which precision this machine runs well.

bf16 is fast on GPUs and on CPUs with AVX-512 BF16 or AMX (Sapphire Rapids and newer), and
emulated at about 1% of fp32 speed on plain AVX2 CPUs (a 1024x1024 matmul). Config values of "auto" resolve here, so one config serves every machine.
"""

from __future__ import annotations

import functools


@functools.cache
def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


@functools.cache
def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: be conservative
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_dtype(device: str) -> str:
    """The half-precision-or-better dtype name this device computes fastest in."""
    if device == "cuda" or cpu_has_fast_bf16():
        return "bfloat16"
    return "float32"
