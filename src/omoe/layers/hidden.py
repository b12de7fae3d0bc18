"""An FFN block's hidden states under gate/up experts: the frozen ``h0 = act(g0) * u0`` and each
slot's change ``dh_s`` of it, formed from the experts' deltas (docs/method.md, "Numerics").

:func:`hidden_delta` is the reference form. :func:`fused_hidden_delta` is the same function run
through ``torch.compile`` (one loop instead of a dozen passes over ``(S, N, I)``); for SiLU, the
MLP activation of LLaMA-family models, its backward is written out (:func:`silu_delta_grads`) and
compiled too, instead of being derived from the forward graph: autograd's derived backward keeps
float32 ``(S, N, I)`` intermediates and runs as several loops (measured 1.7x slower on the SmolLM2
shape, ``scripts/bench_hidden.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from omoe.layers.kernels import fused, fused_enabled


def hidden_delta(act, g0, u0, dg, du, dtype: torch.dtype | None = None, h0: torch.Tensor | None = None):
    """Each slot's change of the gated hidden, ``act(g0 + dg) * (u0 + du) - act(g0) * u0``.

    Formed from the adapters' deltas, never as the difference of the two hidden products:
    ``(act(g0 + dg) - act(g0)) * u0 + act(g0 + dg) * du``. The one remaining difference,
    ``act(g0 + dg) - act(g0)``, is taken in float32 (at least) from the upcast ``g0``: its error is
    float32's relative to ``act(g0)``, not the model dtype's, and it is exactly 0 where ``dg`` is.
    The products are of small quantities with frozen values, so ``dtype`` keeps them to its own
    relative precision.

    Args:
        act: the MLP's activation.
        g0, u0: ``(N, I)`` frozen gate and up outputs.
        dg, du: ``(S, N, I)`` the gate and up experts' deltas, or None (projection not adapted).
        dtype: dtype of the result and of the products (default: that of ``g0``).
        h0: ``(N, I)`` the frozen hidden, to also return each slot's hidden ``h0 + dh`` (in one pass
            when fused).

    Returns:
        ``dh``, ``(S, N, I)``; with ``h0``, the pair ``(dh, h0 + dh)``.
    """
    dtype = dtype or g0.dtype
    if dg is None:
        dh = act(g0).to(dtype) * du.to(dtype)
    else:
        wide = torch.promote_types(g0.dtype, torch.float32)
        # act(g0) per slot, on a contiguous copy, not once: both activations then run the same kernel
        # on the same layout, so act(g0 + 0) equals act(g0) bit for bit, and in backward the two
        # gradients reaching g0 cancel exactly where dg = 0 (a sum over slots first would round apart).
        g0w = g0.to(wide).expand(dg.shape[0], *g0.shape).contiguous()  # (S, N, I)
        a1 = act(g0w + dg)  # (S, N, I)
        da = (a1 - act(g0w)).to(dtype)
        dh = da * u0.to(dtype) if du is None else torch.addcmul(da * u0.to(dtype), a1.to(dtype), du.to(dtype))
    return dh if h0 is None else (dh, (h0 + dh).to(h0.dtype))


def _silu_grad(g: torch.Tensor) -> torch.Tensor:
    """``d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g)))``."""
    s = torch.sigmoid(g)
    return s * (1 + g * (1 - s))


def silu_delta_grads(grad_dh, grad_h, g0, u0, dg, du):
    """Gradients of ``hidden_delta(F.silu, g0, u0, dg, du, dtype, h0)`` given those of its outputs.

    grad_dh, grad_h: ``(S, N, I)`` gradients of ``dh`` and of ``h = h0 + dh`` (either may be None).
    Returns ``(g0, u0, dg, du, h0)`` gradients in their inputs' dtypes (None where there is none),
    computed in float32 and each rounded once. With ``a = silu``, ``G = grad_dh + grad_h`` and
    ``dh = (a(g0 + dg) - a(g0)) u0 + a(g0 + dg) du``:
    ``d/ddg = G (u0 + du) a'(g0 + dg)``, ``d/ddu = G a(g0 + dg)``,
    ``d/dg0 = sum_s G (u0 (a'(g0 + dg) - a'(g0)) + du a'(g0 + dg))``,
    ``d/du0 = sum_s G (a(g0 + dg) - a(g0))``, ``d/dh0 = sum_s grad_h``.
    Where ``dg`` and ``du`` are 0 the gradients reaching ``g0`` and ``u0`` are exactly 0, as the
    reference's are.
    """
    wide = torch.float32
    grads = [t.to(wide) for t in (grad_dh, grad_h) if t is not None]
    G = grads[0] if len(grads) == 1 else grads[0] + grads[1]  # (S, N, I)
    g, u = g0.to(wide), u0.to(wide)  # (N, I)
    grad_h0 = None if grad_h is None else grad_h.to(wide).sum(0).to(g0.dtype)
    if dg is None:  # dh = a(g0) du
        grad_g0 = (G * du.to(wide) * _silu_grad(g)).sum(0)
        return grad_g0.to(g0.dtype), None, None, (G * F.silu(g)).to(du.dtype), grad_h0
    g1 = g + dg.to(wide)  # (S, N, I)
    a1, s1 = F.silu(g1), _silu_grad(g1)
    from_u0 = u * (s1 - _silu_grad(g))
    if du is None:
        grad_dg, grad_du, grad_g0 = G * u * s1, None, G * from_u0
    else:
        duw = du.to(wide)
        grad_dg, grad_du, grad_g0 = G * (u + duw) * s1, (G * a1).to(du.dtype), G * (from_u0 + duw * s1)
    grad_u0 = (G * (a1 - F.silu(g))).sum(0)
    return grad_g0.sum(0).to(g0.dtype), grad_u0.to(u0.dtype), grad_dg.to(dg.dtype), grad_du, grad_h0


_fused_forward = fused(hidden_delta)
_fused_grads = fused(silu_delta_grads)


class _SiluHiddenDelta(torch.autograd.Function):
    """:func:`hidden_delta` for SiLU with :func:`silu_delta_grads` as its backward, both compiled.
    Saves only its inputs."""

    @staticmethod
    def forward(ctx, g0, u0, dg, du, dtype, h0):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(g0, u0, dg, du)
        ctx.with_h0 = h0 is not None
        return _fused_forward(F.silu, g0, u0, dg, du, dtype, h0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_dh, grad_h=None):
        g0, u0, dg, du = ctx.saved_tensors
        if grad_dh is None and grad_h is None:
            return None, None, None, None, None, None
        grad_g0, grad_u0, grad_dg, grad_du, grad_h0 = _fused_grads(grad_dh, grad_h, g0, u0, dg, du)
        return grad_g0, grad_u0, grad_dg, grad_du, None, grad_h0 if ctx.with_h0 else None


def fused_hidden_delta(act, g0, u0, dg, du, dtype: torch.dtype | None = None, h0: torch.Tensor | None = None):
    """:func:`hidden_delta` in one compiled loop; for SiLU in training, with its backward written
    out (:func:`silu_delta_grads`). The reference form while fused kernels are off."""
    inputs = (g0, u0, dg, du, h0)
    if (
        act is F.silu
        and fused_enabled()
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in inputs)
    ):
        return _SiluHiddenDelta.apply(g0, u0, dg, du, dtype, h0)
    return _fused_forward(act, g0, u0, dg, du, dtype, h0)


class Hidden(NamedTuple):
    """An FFN block's hidden states: the frozen ``h0``, ``(N, I)``; each slot's change ``dh``,
    ``(S, N, I)``, or None (gate and up not adapted); each slot's ``h = h0 + dh`` when the down
    experts read it (from the same fused pass), else None."""

    h0: torch.Tensor
    dh: torch.Tensor | None
    h: torch.Tensor | None = None

    def slots(self) -> torch.Tensor:
        """``h0 + dh``, ``(S, N, I)``, or ``h0`` shared by the slots, ``(N, I)``."""
        if self.h is not None:
            return self.h
        return self.h0 if self.dh is None else self.h0 + self.dh
