"""Quantized frozen bases (QLoRA-style): bitsandbytes 4-bit NF4 or 8-bit LLM.int8, applied by
transformers while the model loads; the adapters stay float32 and train on top.

bitsandbytes (0.50 tested) runs both on CUDA and on CPU: its CPU backend has the NF4 and int8 kernels
(on CPUs with AVX512-BF16 a fused NF4 kernel from the ``kernels`` package is tried first; without it
bitsandbytes logs a warning once and uses its own). The LM head and the embeddings stay unquantized,
as in QLoRA.
"""

from __future__ import annotations

import logging

import torch

from omoe.errors import ConfigError, OMoEError

QUANTIZATIONS = ("none", "8bit", "4bit")
_INSTALL = "pip install 'bitsandbytes>=0.50'"


def check_quantization(name: str) -> None:
    if name not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {name!r}; allowed: {', '.join(QUANTIZATIONS)}")


def bnb_config(name: str, compute_dtype: torch.dtype = torch.float32):
    """transformers' ``BitsAndBytesConfig`` for ``name`` (``8bit`` or ``4bit``).

    4-bit: NF4 with double quantization (QLoRA's), matmuls in ``compute_dtype`` (the model's dtype).
    8-bit: LLM.int8 (outlier threshold 6.0), frozen int8 weights.
    """
    check_quantization(name)
    if name == "none":
        raise ConfigError("bnb_config: quantization 'none' needs no config")
    # bitsandbytes' CPU backend logs a warning on import when the optional `kernels` package is absent
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise OMoEError(
            f"quantization {name!r} needs bitsandbytes, which is not installed: {_INSTALL}"
        ) from None
    from transformers import BitsAndBytesConfig

    if name == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
