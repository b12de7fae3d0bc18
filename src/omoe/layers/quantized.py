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


def keep_4bit_trainable(model: nn.Module) -> None:
    """Keep bitsandbytes' 4-bit linears on the kernels that backpropagate.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for a forward-only kernel
    the first time the layer runs in eval mode without grad, and from then on uses that kernel in
    training too, which has no autograd: the gradient to the layer's input is silently wrong (torch
    warns "an autograd kernel was not registered"). Adapters need that gradient, and DoRA reads the
    weight in the standard layout, so: turn the repacking off and undo it where it already happened
    (bitsandbytes' own inverse; it re-quantizes a double-quantized absmax, which moves the weights by
    about 1e-4 of their size).
    """
    for module in model.modules():
        if quantization_of(module) != "4bit" or not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
