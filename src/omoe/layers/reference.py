"""Earlier forms of the expert layers, kept as references for ``omoe bench`` and its scripts only.

:class:`BeforeMoEFeedForward` is the OMoE representation as it was computed before issue 9 (commit
e06f846): ``E_s = down(h_s) - down(h0)``, the difference of two full products, which bf16 turns into
rounding noise (docs/method.md, "Numerics"). Never use it for training: it exists so that the cost
of the exact form can be measured against it in one run, with the same kernels as the layer of now
(the frozen weights' casts included), so that only the representation differs.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

from omoe.layers.kernels import frozen_linear
from omoe.layers.moe import MoEFeedForward


class BeforeMoEFeedForward(MoEFeedForward):
    """The representation as computed before issue 9: ``E_s = down(h_s) - down(h0)``."""

    def _hidden(self, x, indices, g0, u0):
        adapted = [self.omoe_experts[p] for p in ("gate", "up") if p in self.omoe_experts]
        if self.recompute_hidden(x) and adapted and all(e.low_rank_delta for e in adapted):
            zg, zu = self._low_rank_codes(x, indices)
            return checkpoint(self._hidden_from_codes, g0, u0, zg, zu, indices, use_reentrant=False)
        act = self.base_layer.act_fn
        g, u = (
            base + self.omoe_experts[p](x, indices, lambda b=base: b, getattr(self.base_layer, f"{p}_proj"))
            for p, base in (("gate", g0), ("up", u0))
        )
        return act(g0) * u0, act(g) * u

    def _hidden_from_codes(self, g0, u0, zg, zu, indices):
        act = self.base_layer.act_fn
        g = g0 if zg is None else g0 + self.omoe_experts["gate"].up(zg, indices).to(g0.dtype)
        u = u0 if zu is None else u0 + self.omoe_experts["up"].up(zu, indices).to(u0.dtype)
        return act(g0) * u0, act(g) * u

    def forward(self, x):
        mlp = self.base_layer
        if self.disabled:
            return mlp(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, H)
        routing = self.route(x2)
        g0, u0 = frozen_linear(mlp.gate_proj, x2), frozen_linear(mlp.up_proj, x2)  # (N, I)
        h0, h = self._hidden(x2, routing.indices, g0, u0)  # (N, I), (S, N, I)
        d0 = frozen_linear(mlp.down_proj, h0)  # (N, H)
        dh = frozen_linear(mlp.down_proj, h)  # (S, N, H), no bias
        reps = dh - d0 + self.omoe_experts["down"](h, routing.indices, lambda: dh, mlp.down_proj)
        return (d0 + self.mix(reps, routing).to(d0.dtype)).view(*shape[:-1], -1)


def use_before_representation(model: nn.Module) -> int:
    """Switch every :class:`MoEFeedForward` of ``model`` to the pre-issue-9 representation, in
    place (same parameters); returns how many were switched."""
    layers = [m for m in model.modules() if type(m) is MoEFeedForward]
    for layer in layers:
        layer.__class__ = BeforeMoEFeedForward
    return len(layers)
