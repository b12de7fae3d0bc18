"""Faster forms of the hot spots of the expert layers, with the plain PyTorch forms as reference.

Besides the matmuls, these dominated an OMoE step on a CPU (``omoe bench``, torch.profiler):

- **Dropout masks.** ``aten::bernoulli_`` draws one random number per element on one thread: 18%
  of an OMoE step and 24% of a PEFT LoRA step on the SmolLM2 shape. :class:`Dropout` draws one
  64-bit word per four elements and compares 16-bit fields with a threshold instead.
- **Casts of the frozen weights.** CPU autocast casts a frozen float32 weight to bf16 again at every
  call (its cast cache keeps only trainable leaves): 134 M elements per SmolLM2 step.
  :func:`frozen_linear` keeps one bf16 copy per frozen weight (same bits as autocast's cast).
- **Elementwise passes over ``(S, N, d)``**: the hidden change (:mod:`omoe.layers.hidden`, a dozen
  passes over ``(S, N, I)``) and Gram-Schmidt with the mixture
  (:func:`omoe.layers.mixing.orthogonal_mix`) run through :func:`fused` (``torch.compile``), which
  turns each into a few loops.

The casts give bit-identical results; the others give the same distribution and the same exact
zeros as the reference: the compiled functions change only the rounding of the non-zero values
(their intermediates stay float32), and an untrained adapter is still the base model bit for bit.
``OMOE_FUSED=0`` in the environment, or :func:`reference_kernels`, switches all of them back to the
reference forms, with the recomputation in backward of before (:func:`recompute_in_backward`;
``omoe bench`` times its "before" rows that way). Where ``torch.compile`` cannot work (no C++
compiler, an unsupported platform) the compiled functions fall back to the reference with one warning.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch._functorch.config
import torch.nn.functional as F
from torch import nn

_state = {"fused": os.environ.get("OMOE_FUSED", "1") != "0", "broken": False}

# Dropout probabilities are rounded to multiples of 2**-16 (the mask compares 16-bit fields).
_MASK_LEVELS = 1 << 16


@contextmanager
def reference_kernels() -> Iterator[None]:
    """Use the reference forms (``aten::bernoulli_`` dropout, eager hidden change and its autograd
    backward, recomputation in backward on CPU too) inside."""
    before = _state["fused"]
    _state["fused"] = False
    try:
        yield
    finally:
        _state["fused"] = before


def fused_enabled() -> bool:
    """Whether the compiled kernels are in use: not switched off (``OMOE_FUSED=0``,
    :func:`reference_kernels`) and ``torch.compile`` has not failed."""
    return _state["fused"] and not _state["broken"]


def recompute_in_backward(x: torch.Tensor) -> bool:
    """Whether training recomputes cheap ``(S, N, d)`` activations of the expert layers in backward
    instead of saving them (the gate/up hidden change, Gram-Schmidt's intermediates).

    On accelerators, yes: memory is the scarce resource there. On CPU, no: compute is, and memory is
    not (``omoe bench`` reports both); under :func:`reference_kernels` the CPU recomputes too, as
    every device did before the CPU kernels.
    """
    return torch.is_grad_enabled() and (x.device.type != "cpu" or not _state["fused"])


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A keep mask (bool, ``shape``) with keep probability ``1 - p`` (p rounded to a multiple of
    2**-16), and the scale ``1 / keep probability`` that makes ``mask * x * scale`` unbiased.

    One call of the generator per 64 bits: four independent uniform 16-bit fields per draw.
    """
    n = shape.numel()
    threshold = round(p * _MASK_LEVELS)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    fields = words.view(torch.int16)[:n].view(shape)  # uniform over int16
    keep = fields >= threshold - _MASK_LEVELS // 2
    return keep, _MASK_LEVELS / (_MASK_LEVELS - threshold)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a faster mask on CPU (:func:`dropout_mask`); elsewhere, or with
    :func:`reference_kernels`, exactly ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or not _state["fused"] or self.inplace:
            return super().forward(x)
        keep, scale = dropout_mask(x.shape, self.p, x.device)
        return torch.where(keep, x * scale, 0)


_RECOMPILE_LIMIT = 64


def plain_activation(act: Callable) -> Callable | None:
    """The stateless function of an activation module that :func:`fused` code may take (``F.silu``
    for ``nn.SiLU`` and transformers' ``SiLUActivation``), or None. A module instance would be
    compiled for anew with every model, and past the recompile limit run eagerly."""
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is F.silu:
        return F.silu
    return None


def fused(function: Callable) -> Callable:
    """``torch.compile`` of an elementwise ``function`` (dynamic shapes), used while fused kernels
    are on; the reference ``function`` otherwise, and for good once compiling has failed."""
    compiled: list[Callable] = []

    def run(*args, **kwargs):
        if not _state["fused"] or _state["broken"] or torch.compiler.is_compiling():
            return function(*args, **kwargs)
        try:
            if not compiled:
                # Process-wide (torch reads it again at the first backward): a compiled backward
                # must allow retain_graph (gradcheck, two losses over one graph), which donated
                # buffers, a memory saving of compiled backwards, forbid.
                torch._functorch.config.donated_buffer = False
                compiled.append(torch.compile(function, dynamic=True))
            # One compilation per dtype/None pattern of the inputs; past torch's default limit of 8
            # a call would silently run eagerly and round differently from the compiled ones.
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                return compiled[0](*args, **kwargs)
        except Exception as error:  # only torch.compile's own failures fall back
            if not type(error).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            _state["broken"] = True
            warnings.warn(
                f"omoe: torch.compile failed ({type(error).__name__}); using the plain forms of the expert "
                "hidden and Gram-Schmidt (slower, same results up to rounding). OMOE_FUSED=0 skips the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
            return function(*args, **kwargs)

    return run


# id(frozen weight) -> ((data_ptr, version, dtype), cast): one low-precision copy per frozen weight;
# an entry goes when its weight is garbage-collected.
_casts: dict[int, tuple] = {}


def _cast_once(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, kept until the weight changes (storage moved or written in place)."""
    key = (weight.data_ptr(), weight._version, dtype)
    hit = _casts.get(id(weight))
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad(), torch.inference_mode(False):  # usable later in training and in eval alike
        cast = weight.to(dtype)
    if hit is None:
        weakref.finalize(weight, _casts.pop, id(weight), None)
    _casts[id(weight)] = (key, cast)
    return cast


def frozen_linear(module: nn.Module, x: torch.Tensor, plain: Callable | None = None) -> torch.Tensor:
    """``module(x)`` for a frozen linear. Under CPU autocast to a lower precision, a plain float32
    ``nn.Linear`` whose weight needs no gradient runs on a bf16 (or fp16) copy of its weight made
    once (what autocast would make at every call, so the result is the same bit for bit).

    plain: what computes ``module(x)`` otherwise (default: calling ``module``).
    """
    plain = plain or module
    if (
        type(module) is not nn.Linear
        or x.device.type != "cpu"
        or not _state["fused"]
        or not torch.is_autocast_enabled("cpu")
    ):
        return plain(x)
    weight, bias = module.weight, module.bias
    dtype = torch.get_autocast_dtype("cpu")
    if weight.requires_grad or weight.dtype != torch.float32 or x.dtype not in (torch.float32, dtype):
        return plain(x)
    return F.linear(x.to(dtype), _cast_once(weight, dtype), None if bias is None else _cast_once(bias, dtype))
