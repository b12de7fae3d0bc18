"""Earlier forms of the expert layers, kept as references for ``omoe bench`` and its scripts only.

:class:`BeforeMoEFeedForward` is the OMoE representation as it was computed before issue 9 (commit
e06f846): ``E_s = down(h_s) - down(h0)``, the difference of two full products, which bf16 turns into
rounding noise (docs/method.md, "Numerics"). Never use it for training: it exists so that the cost
of the exact form can be measured against it in one run, with the same kernels as the layer of now
(the frozen weights' casts included), so that only the representation differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from omoe.layers.hidden import Hidden
from omoe.layers.kernels import frozen_linear
from omoe.layers.moe import MoEFeedForward


class BeforeMoEFeedForward(MoEFeedForward):
    """The representation as computed before issue 9: ``E_s = down(h_s) - down(h0)``, with
    ``h_s = act(g0 + dg_s) * (u0 + du_s)`` formed whole. Only the two steps that differ are
    overridden; routing, recomputation, capture and mixing are the layer's own."""

    def _hidden_from_deltas(self, g0, u0, dg, du) -> Hidden:
        act = self.base_layer.act_fn
        g = g0 if dg is None else g0 + dg.to(g0.dtype)  # (S, N, I)
        u = u0 if du is None else u0 + du.to(u0.dtype)
        return Hidden(act(g0) * u0, None, act(g) * u)  # h0, no dh, h_s

    def _representations(self, hidden: Hidden, idx, d0: torch.Tensor, slots: int) -> torch.Tensor:
        down = self.base_layer.down_proj
        h = hidden.slots()  # (S, N, I)
        dh = frozen_linear(down, h)  # (S, N, H) down(h_s), no bias
        return dh - d0 + self.omoe_experts["down"](h, idx, lambda: dh, down)


def _switch(model: nn.Module, old: type, new: type) -> list[nn.Module]:
    """Give every layer of exactly class ``old`` in ``model`` the class ``new`` (same parameters)."""
    layers = [m for m in model.modules() if type(m) is old]
    for layer in layers:
        layer.__class__ = new
    return layers


@contextmanager
def before_representation(model: nn.Module) -> Iterator[int]:
    """:func:`use_before_representation` inside the block, the representation of now after it."""
    layers = _switch(model, MoEFeedForward, BeforeMoEFeedForward)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.__class__ = MoEFeedForward


def use_before_representation(model: nn.Module) -> int:
    """Switch every :class:`MoEFeedForward` of ``model`` to the pre-issue-9 representation, in
    place (same parameters); returns how many were switched."""
    return len(_switch(model, MoEFeedForward, BeforeMoEFeedForward))
