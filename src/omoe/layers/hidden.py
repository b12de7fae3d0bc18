"""An FFN block's hidden states under gate/up experts: the frozen ``h0 = act(g0) * u0`` and each
slot's change ``dh_s`` of it, formed from the experts' deltas (docs/method.md, "Numerics").

:func:`hidden_delta` is the reference form. :func:`fused_hidden_delta` is the same function run
through ``torch.compile``: one loop instead of a dozen passes over ``(S, N, I)``, and a compiled
backward derived from it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from omoe.layers.kernels import fused


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


fused_hidden_delta = fused(hidden_delta)  # one loop instead of a dozen passes (layers/kernels.py)


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
