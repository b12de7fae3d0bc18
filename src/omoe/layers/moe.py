"""Mixture-of-LoRA-experts layers: one router and ``k`` experts per FFN block or per linear.

Vanilla MoE-LoRA and OMoE share these layers; they differ only in the mixer (``ExpertMixer`` or
``OrthogonalMixer``). Every tensor of experts is slot-major ``(S, N, d)``; see ``experts.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from omoe.layers.experts import LoRAExperts, _frozen_matmul, without_bias
from omoe.layers.mixing import ExpertMixer
from omoe.layers.router import Router, RouterStats, Routing


class TokenMask:
    """Shared by the MoE layers of one model: which flattened tokens are real (not padding).

    The model wrapper sets ``mask`` from the attention mask before each forward; a layer uses it
    only when its size matches the layer's token count (it does not during cached generation).
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def get(self, n_tokens: int) -> torch.Tensor | None:
        if self.mask is not None and self.mask.numel() == n_tokens:
            return self.mask
        return None


class ExpertCapture(NamedTuple):
    """Detached record of one forward pass, for analysis.

    raw: ``(S, N, d)`` expert representations ``E_s(x)`` before orthonormalisation.
    mixed: ``(S, N, d)`` what was mixed (``E'_s(x)`` for OMoE, ``E_s(x)`` for vanilla MoE).
    weights, indices: the routing, ``(S, N)`` each (``indices`` is None under soft routing).
    mask: ``(N,)`` real tokens, or None.
    all_raw: ``(E, N, d)`` every expert's ``E_e(x)`` on every token, so that experts can be compared
        on the same tokens: ``raw`` itself under soft routing; under top-k only when the layer's
        ``capture_all_experts`` is set (an extra dense pass over all experts), else None.
    """

    raw: torch.Tensor
    mixed: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor | None
    mask: torch.Tensor | None
    all_raw: torch.Tensor | None = None


class MoELayer(nn.Module):
    """What every MoE layer shares: routing, statistics, representation capture, disabling."""

    def __init__(
        self, base_layer: nn.Module, router: Router, mixer: ExpertMixer, token_mask: TokenMask | None
    ):
        super().__init__()
        self.base_layer = base_layer
        self.omoe_router = router
        self.mixer = mixer
        self.token_mask = token_mask or TokenMask()
        self.disabled = False
        self.capture = False
        self.capture_all_experts = False  # with capture: also every expert's E_e(x) under top-k
        self.last_router_stats: RouterStats | None = None
        self.last_capture: ExpertCapture | None = None

    def route(self, x: torch.Tensor) -> Routing:
        """x: ``(N, d)``. Records the router statistics of this pass."""
        routing = self.omoe_router(x)
        self.last_router_stats = Router.stats(routing, self.token_mask.get(x.shape[0]))
        return routing

    def wants_all_experts(self, routing: Routing) -> bool:
        """Whether this pass must also compute every expert's representation (capture under top-k)."""
        return self.capture and self.capture_all_experts and routing.indices is not None

    def mix(self, reps: torch.Tensor, routing: Routing, all_reps: torch.Tensor | None = None) -> torch.Tensor:
        """Transform (Gram-Schmidt for OMoE) and mix ``(S, N, d)`` representations into ``(N, d)``.

        ``all_reps``: ``(E, N, d)`` every expert's representation, recorded by a capture only.
        """
        if self.capture:
            mixed = self.mixer.transform(reps)
            if routing.indices is None:
                all_reps = reps
            self.last_capture = ExpertCapture(
                reps.detach(),
                mixed.detach(),
                routing.weights.detach(),
                None if routing.indices is None else routing.indices.detach(),
                self.token_mask.get(reps.shape[1]),
                None if all_reps is None else all_reps.detach(),
            )
            return self.mixer(mixed, routing.weights)
        if self.mixer.orthogonal and torch.is_grad_enabled():
            # Gram-Schmidt keeps several float32 (S, N, d) intermediates for backward; keep only
            # its input and recompute the (cheap, elementwise) rest in the backward pass.
            return checkpoint(self._transform_and_mix, reps, routing.weights, use_reentrant=False)
        return self._transform_and_mix(reps, routing.weights)

    def _transform_and_mix(self, reps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.mixer.transform(reps), weights)


class MoELinear(MoELayer):
    """``linear`` topology (MoELoRA / LoRAMoE layout): a router and experts on one linear map.

    ``E_s(x)`` is expert s's change of this linear's output.
    """

    def __init__(self, base_layer: nn.Linear, router, experts: LoRAExperts, mixer, token_mask=None):
        super().__init__(base_layer, router, mixer, token_mask)
        self.omoe_experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        if self.disabled:
            return y
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        routing = self.route(x2)
        base_out = without_bias(y, self.base_layer) if self.omoe_experts.is_dora else None
        reps = self.omoe_experts(x2, routing.indices, base_out, self.base_layer)  # (S, N, out)
        all_reps = None
        if self.wants_all_experts(routing):
            all_reps = self.omoe_experts(x2, None, base_out, self.base_layer)  # (E, N, out)
        return y + self.mix(reps, routing, all_reps).view(y.shape).to(y.dtype)


class MoEFeedForward(MoELayer):
    """``ffn`` topology (the paper's; MixLoRA layout): one router per block, ``k`` experts that are
    each a LoRA on gate, up and down sharing the frozen weights.

    ``E_s(x) = FFN_s(x) - FFN_0(x)``, with ``FFN(x) = down(act(gate(x)) * up(x))``. ``base_layer``
    is the original MLP module; any of ``gate``/``up``/``down`` experts may be None (not adapted).
    """

    def __init__(
        self, base_layer: nn.Module, router, experts: dict[str, LoRAExperts | None], mixer, token_mask=None
    ):
        super().__init__(base_layer, router, mixer, token_mask)
        self.omoe_experts = nn.ModuleDict({k: v for k, v in experts.items() if v is not None})

    def _hidden(self, x: torch.Tensor, indices, g0: torch.Tensor, u0: torch.Tensor):
        """Frozen hidden ``h0 = act(g0) * u0``, ``(N, I)``, and each slot's hidden ``(S, N, I)``."""
        adapted = [self.omoe_experts[p] for p in ("gate", "up") if p in self.omoe_experts]
        if torch.is_grad_enabled() and adapted and not any(e.is_dora for e in adapted):
            # Keep only the low-rank codes z = A dropout(x), (S, N, r), and recompute the (S, N, I)
            # gate/up outputs and the activation in backward: the hidden then costs about as much
            # memory as plain LoRA's instead of 3 (S, N, I) tensors per slot.
            zg, zu = (
                self.omoe_experts[p].down(self.omoe_experts[p].dropout(x), indices)
                if p in self.omoe_experts
                else None
                for p in ("gate", "up")
            )
            return checkpoint(self._hidden_from_codes, g0, u0, zg, zu, indices, use_reentrant=False)
        act = self.base_layer.act_fn
        g, u = (self._adapted(p, x, indices, base) for p, base in (("gate", g0), ("up", u0)))
        return act(g0) * u0, act(g) * u

    def _hidden_from_codes(self, g0, u0, zg, zu, indices):
        act = self.base_layer.act_fn
        g = g0 if zg is None else g0 + self.omoe_experts["gate"].up(zg, indices).to(g0.dtype)
        u = u0 if zu is None else u0 + self.omoe_experts["up"].up(zu, indices).to(u0.dtype)
        return act(g0) * u0, act(g) * u

    def _adapted(self, name: str, x, indices, base_out):
        """Per-slot output ``(S, N, I)`` of the gate or up projection (the frozen one if not adapted)."""
        if name not in self.omoe_experts:
            return base_out
        linear = getattr(self.base_layer, f"{name}_proj")
        experts = self.omoe_experts[name]
        raw = base_out
        if experts.is_dora and linear.bias is not None:
            raw = base_out - linear.bias
        return base_out + experts(x, indices, raw, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.base_layer
        if self.disabled:
            return mlp(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, H)
        routing = self.route(x2)
        w, idx = routing.weights, routing.indices  # (S, N)
        g0, u0 = mlp.gate_proj(x2), mlp.up_proj(x2)  # (N, I) each
        h0, h = self._hidden(x2, idx, g0, u0)  # (N, I), (S, N, I)
        if h.dim() == 2:  # neither gate nor up adapted: every slot shares the frozen hidden
            h = h.expand(w.shape[0], *h.shape)

        down_experts = self.omoe_experts["down"] if "down" in self.omoe_experts else None  # noqa: SIM401 (ModuleDict)
        if not (self.mixer.orthogonal or self.capture or (down_experts is not None and down_experts.is_dora)):
            # Vanilla LoRA experts: mixing is linear and commutes with the frozen down projection,
            # sum_s w_s (down(h_s) - down(h0)) = down(sum_s w_s (h_s - h0)) (no bias: it cancels),
            # so one down matmul replaces S of them (same result as the explicit form below).
            wd = w.to(h.dtype)
            h_mix = h0 + torch.einsum("sn,sni->ni", wd, h - h0)  # (N, I)
            out = mlp.down_proj(h_mix)
            if down_experts is not None:
                out = out + torch.einsum("sn,snd->nd", wd, down_experts(h, idx)).to(out.dtype)
            return out.view(*shape[:-1], -1)

        d0 = mlp.down_proj(h0)  # FFN_0(x), (N, H)
        reps = self._representations(h, idx, d0)  # (S, N, H)
        all_reps = None
        if self.wants_all_experts(routing):  # every expert on every token, for analysis
            _, h_all = self._hidden(x2, None, g0, u0)
            if h_all.dim() == 2:
                h_all = h_all.expand(self.omoe_router.num_experts, *h_all.shape)
            all_reps = self._representations(h_all, None, d0)  # (E, N, H)
        return (d0 + self.mix(reps, routing, all_reps).to(d0.dtype)).view(*shape[:-1], -1)

    def _representations(self, h: torch.Tensor, idx, d0: torch.Tensor) -> torch.Tensor:
        """``E_s(x) = FFN_s(x) - FFN_0(x)`` per slot, ``(S, N, H)``, from the slots' hidden ``(S, N, I)``."""
        down = self.base_layer.down_proj
        dh = _frozen_matmul(down, h)  # (S, N, H), no bias
        reps = dh - (d0 if down.bias is None else d0 - down.bias)  # frozen part of E_s(x)
        if "down" in self.omoe_experts:
            reps = reps + self.omoe_experts["down"](h, idx, dh, down)
        return reps
