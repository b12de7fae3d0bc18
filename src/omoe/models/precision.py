"""Which autocast dtype a run uses: ``precision`` (auto, fp32, bf16, fp16) on a device.

``auto`` is bf16 where the hardware computes it natively (CUDA with bf16 support; a CPU with the
``avx512_bf16`` or ``amx_bf16`` instructions), fp16 on older CUDA GPUs, and fp32 elsewhere: without
those instructions a CPU emulates bf16 matmuls by conversions, so fp32 is the safe choice there.
Weights and optimizer state stay fp32 whatever the precision; only the computation is autocast.

``OMOE_CPU_BF16=0`` (or ``1``) in the environment overrides the CPU detection; the test suite sets
it to 0 so that its numbers do not depend on the machine it runs on.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from omoe.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bf16 instructions
CPU_BF16_ENV = "OMOE_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (or ``OMOE_CPU_BF16`` says so)."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ConfigError(f"{CPU_BF16_ENV}={forced!r}; allowed: 0, 1 (or unset: detect)")
        return forced == "1"
    return cpu_flags_have_bf16()


@functools.lru_cache(maxsize=1)
def cpu_flags_have_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # torch's own CPUID check
    if probe is not None and probe():
        return True
    try:
        return cpuinfo_has_bf16(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:  # not Linux: rely on torch's probe alone
        return False


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether the ``flags`` lines of a ``/proc/cpuinfo`` text name a native bf16 instruction set."""
    flags = {
        flag
        for line in cpuinfo.splitlines()
        if line.split(":", 1)[0].strip() == "flags"
        for flag in line.split(":", 1)[1].split()
    }
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None = plain fp32."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        raise ConfigError(f"precision fp16 needs CUDA; on {device.type} use auto, fp32 or bf16")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``fp32``: what a run records as the precision it actually used."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast(dtype: torch.dtype | None, device: torch.device | str):
    """A context manager autocasting to ``dtype`` on ``device`` (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
