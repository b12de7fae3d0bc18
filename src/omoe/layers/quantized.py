"""Frozen linears whose weight is quantized (bitsandbytes 4-bit NF4/FP4 or 8-bit LLM.int8).

The adapters call a frozen module for every product with its weight (``W0 x``, the FFN experts'
shared ``W_gate x``, ``W_up x``, ``W_down h``): those go through the quantized module's own kernel.
Only what needs the weight itself reads :func:`frozen_weight`, the dequantized ``W0``: DoRA's row
norms ``||W0||`` and ``A W0^T`` are computed from it, and so is ``W0 x`` of a frozen linear with a bias
and the float16 down projection of OMoE's training step. bitsandbytes is imported only when such a
weight is met.
"""

from __future__ import annotations

import torch
from torch import nn


def quantization_of(module: nn.Module) -> str | None:
    """``"4bit"`` or ``"8bit"`` for a bitsandbytes-quantized linear, else None."""
    kind = type(getattr(module, "weight", None)).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(kind)


def frozen_weight(module: nn.Module) -> torch.Tensor:
    """``(out, in)`` the weight a frozen linear applies: its own, or the dequantized one (float32 for
    8-bit, the 4-bit layer's storage dtype for 4-bit), without a graph."""
    weight = module.weight
    kind = quantization_of(module)
    if kind is None:
        return weight
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        if kind == "4bit":
            return bnbf.dequantize_4bit(weight.data, weight.quant_state)
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = module.state.SCB
        return bnbf.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype to feed a frozen linear: its weight's, or float32 for a quantized one (the
    bitsandbytes module casts its input to its own compute dtype)."""
    weight = module.weight
    return weight.dtype if weight.is_floating_point() else torch.float32
