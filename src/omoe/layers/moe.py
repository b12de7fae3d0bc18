"""Mixture-of-LoRA-experts layers: one router and ``k`` experts per FFN block or per linear.

Vanilla MoE-LoRA and OMoE share these layers; they differ only in the mixer (``ExpertMixer`` or
``OrthogonalMixer``), as LoRA and DoRA experts differ only in their variant object: the layers call
both through one interface and never ask which one they hold. Every tensor of experts is
slot-major ``(S, N, d)``; see ``experts.py``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omoe.layers.experts import LoRAExperts, _frozen_matmul, autocast_float16, without_bias
from omoe.layers.hidden import Hidden, fused_hidden_delta, hidden_delta
from omoe.layers.kernels import frozen_linear, plain_activation, recompute_in_backward
from omoe.layers.mixing import ExpertMixer
from omoe.layers.quantized import frozen_weight
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
        return self.mixer.combine(reps, routing.weights)


class MoELinear(MoELayer):
    """``linear`` topology (MoELoRA / LoRAMoE layout): a router and experts on one linear map.

    ``E_s(x)`` is expert s's change of this linear's output.
    """

    def __init__(self, base_layer: nn.Linear, router, experts: LoRAExperts, mixer, token_mask=None):
        super().__init__(base_layer, router, mixer, token_mask)
        self.omoe_experts = experts
        experts.float32_up = mixer.wide_gradients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_linear(self.base_layer, x)  # (..., out)
        if self.disabled:
            return y
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        routing = self.route(x2)
        frozen = partial(without_bias, y, self.base_layer)  # (N, out) W0 x, if the variant asks
        reps = self.omoe_experts(x2, routing.indices, frozen, self.base_layer)  # (S, N, out)
        all_reps = None
        if self.wants_all_experts(routing):
            all_reps = self.omoe_experts(x2, None, frozen, self.base_layer)  # (E, N, out)
        return y + self.mix(reps, routing, all_reps).view(y.shape).to(y.dtype)


class MoEFeedForward(MoELayer):
    """``ffn`` topology (the paper's; MixLoRA layout): one router per block, ``k`` experts that are
    each a LoRA on gate, up and down sharing the frozen weights.

    ``E_s(x) = FFN_s(x) - FFN_0(x)``, with ``FFN(x) = down(act(gate(x)) * up(x))``, computed from the
    experts' own deltas (docs/method.md, "Numerics"):
    ``E_s = W_down dh_s + (down expert s)(h0 + dh_s)``, ``dh_s`` from :func:`hidden_delta`.
    ``base_layer`` is the original MLP module; any of ``gate``/``up``/``down`` experts may be None
    (not adapted).
    """

    def __init__(
        self, base_layer: nn.Module, router, experts: dict[str, LoRAExperts | None], mixer, token_mask=None
    ):
        super().__init__(base_layer, router, mixer, token_mask)
        self.omoe_experts = nn.ModuleDict({k: v for k, v in experts.items() if v is not None})
        for e in self.omoe_experts.values():
            e.float32_up = mixer.wide_gradients

    def _hidden(self, x: torch.Tensor, indices, g0: torch.Tensor, u0: torch.Tensor):
        """Frozen hidden ``h0 = act(g0) * u0``, ``(N, I)``, and each slot's change of it ``dh_s``,
        ``(S, N, I)``, or None when neither gate nor up is adapted (every slot's hidden is ``h0``).

        ``dh`` has the dtype of ``h0``, or float32 when that is float16 in training: there the
        Gram-Schmidt gradient it carries back at B = 0 (``1/eps`` times LoRA's) needs float32's range.
        """
        adapted = [self.omoe_experts[p] for p in ("gate", "up") if p in self.omoe_experts]
        act = self.base_layer.act_fn
        if not adapted:
            return Hidden(act(g0) * u0, None)
        if self.recompute_hidden(x) and all(e.low_rank_delta for e in adapted):
            zg, zu = self._low_rank_codes(x, indices)
            return checkpoint(self._hidden_from_codes, g0, u0, zg, zu, indices, use_reentrant=False)
        dg, du = (self._projection_delta(p, x, indices, base) for p, base in (("gate", g0), ("up", u0)))
        return self._hidden_from_deltas(g0, u0, dg, du)

    def _hidden_from_deltas(self, g0, u0, dg, du) -> Hidden:
        act = self.base_layer.act_fn
        h0 = act(g0) * u0  # (N, I), as the base MLP forms it
        dtype = self._delta_dtype(g0)
        plain = plain_activation(act)  # fused for the activations it knows, else the reference form
        delta = partial(fused_hidden_delta, plain) if plain is not None else partial(hidden_delta, act)
        if "down" in self.omoe_experts:  # the down experts read h = h0 + dh: made in the same pass
            return Hidden(h0, *delta(g0, u0, dg, du, dtype, h0))
        return Hidden(h0, delta(g0, u0, dg, du, dtype))

    @staticmethod
    def recompute_hidden(x: torch.Tensor) -> bool:
        """Whether training keeps only the low-rank codes ``z = A dropout(x)``, ``(S, N, r)``, and
        recomputes the ``(S, N, I)`` gate/up deltas and the hidden change in backward.

        On accelerators, yes: the hidden then costs about as much memory as plain LoRA's instead of
        two ``(S, N, I)`` tensors per block. On CPU, no: there compute is the scarce resource (the
        recomputation is 4% of a SmolLM2 step) and memory is not (455 MiB more saved activations
        on 8 x 128 tokens; ``omoe bench`` reports both).
        """
        return recompute_in_backward(x)

    def _low_rank_codes(self, x: torch.Tensor, indices):
        """``A dropout(x)`` of the gate and up experts, ``(S, N, r)`` each (None where not adapted)."""
        return tuple(
            self.omoe_experts[p].down(self.omoe_experts[p].dropout(x), indices)
            if p in self.omoe_experts
            else None
            for p in ("gate", "up")
        )

    def _hidden_from_codes(self, g0, u0, zg, zu, indices):
        dg = None if zg is None else self.omoe_experts["gate"].up(zg, indices)  # (S, N, I)
        du = None if zu is None else self.omoe_experts["up"].up(zu, indices)
        return self._hidden_from_deltas(g0, u0, dg, du)

    def _delta_dtype(self, g0: torch.Tensor) -> torch.dtype:
        if g0.dtype == torch.float16 and self.mixer.wide_gradients and torch.is_grad_enabled():
            return torch.float32
        return g0.dtype

    def _projection_delta(self, name: str, x, indices, base_out):
        """Per-slot delta ``(S, N, I)`` of the gate or up projection's experts, or None if not adapted."""
        if name not in self.omoe_experts:
            return None
        linear = getattr(self.base_layer, f"{name}_proj")
        return self.omoe_experts[name](x, indices, partial(without_bias, base_out, linear), linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.base_layer
        if self.disabled:
            return mlp(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, H)
        routing = self.route(x2)
        w, idx = routing.weights, routing.indices  # (S, N)
        g0, u0 = frozen_linear(mlp.gate_proj, x2), frozen_linear(mlp.up_proj, x2)  # (N, I) each
        hidden = self._hidden(x2, idx, g0, u0)
        h0, dh = hidden.h0, hidden.dh  # (N, I) as the base MLP forms it; (S, N, I) or None

        down_experts = self.omoe_experts["down"] if "down" in self.omoe_experts else None  # noqa: SIM401 (ModuleDict)
        low_rank_down = down_experts is None or down_experts.low_rank_delta
        if self.mixer.linear and not self.capture and low_rank_down:
            # Vanilla LoRA experts: mixing is linear and commutes with the frozen down projection,
            # sum_s w_s E_s = down(h0 + sum_s w_s dh_s) - down(h0) + sum_s w_s (down expert s)(h_s),
            # so one down matmul replaces S of them (same result as the explicit form below).
            h_mix = h0 if dh is None else (h0 + torch.einsum("sn,sni->ni", w.to(dh.dtype), dh)).to(h0.dtype)
            out = frozen_linear(mlp.down_proj, h_mix)  # (N, H)
            if down_experts is not None:
                h = hidden.slots()  # (N, I) shared, or (S, N, I)
                out = out + torch.einsum("sn,snd->nd", w.to(out.dtype), down_experts(h, idx)).to(out.dtype)
            return out.view(*shape[:-1], -1)

        d0 = frozen_linear(mlp.down_proj, h0)  # FFN_0(x), (N, H)
        reps = self._representations(hidden, idx, d0, w.shape[0])  # (S, N, H)
        all_reps = None
        if self.wants_all_experts(routing):  # every expert on every token, for analysis
            every = self._hidden(x2, None, g0, u0)
            all_reps = self._representations(every, None, d0, self.omoe_router.num_experts)  # (E, N, H)
        return (d0 + self.mix(reps, routing, all_reps).to(d0.dtype)).view(*shape[:-1], -1)

    def _representations(self, hidden: Hidden, idx, d0: torch.Tensor, slots: int) -> torch.Tensor:
        """``E_s(x) = FFN_s(x) - FFN_0(x) = W_down dh_s + (down expert s)(h0 + dh_s)`` per slot, ``(S, N, H)``.

        hidden: the frozen hidden and its changes (:class:`Hidden`); d0: ``(N, H)`` FFN_0(x).
        Exactly zero for untrained experts: no term is a difference of two full products.
        """
        h0, dh = hidden.h0, hidden.dh
        down = self.base_layer.down_proj
        reps = None if dh is None else _frozen_down(down, dh, h0.dtype)  # (S, N, H) W_down dh_s, no bias
        if "down" in self.omoe_experts:
            frozen = partial(_frozen_down_out, d0, down, reps)  # W_down h_s, if the variant asks
            delta = self.omoe_experts["down"](hidden.slots(), idx, frozen, down)  # (S, N, H)
            reps = delta if reps is None else reps + delta
        if reps is None:  # no projection adapted: nothing to add
            reps = d0.new_zeros(slots, *d0.shape)
        return reps


def _frozen_down_out(d0: torch.Tensor, down: nn.Module, w_dh: torch.Tensor | None) -> torch.Tensor:
    """``W_down h_s = W_down h0 + W_down dh_s`` without bias: d0 ``(N, H)`` is ``FFN_0(x)``, w_dh
    ``(S, N, H)`` the slots' ``W_down dh_s`` or None; returns ``(N, H)`` or ``(S, N, H)``."""
    d0_raw = d0 if down.bias is None else d0 - down.bias
    return d0_raw if w_dh is None else d0_raw + w_dh


def _frozen_down(down: nn.Module, dh: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W_down dh`` without bias, ``(S, N, H)``; dh float32, computed in the model's ``dtype``.

    In float16 (autocast or a float16 model) and training, through :class:`_Float16FrozenLinear`:
    Gram-Schmidt's gradient at ``E_s = 0`` is ``1/eps`` times LoRA's and would overflow float16
    in this matmul's backward.
    """
    in_float16 = autocast_float16(dh.device.type) or (dtype == down.weight.dtype == torch.float16)
    if in_float16 and torch.is_grad_enabled() and dh.requires_grad:
        return _Float16FrozenLinear.apply(dh, frozen_weight(down))  # dequantized if down is quantized
    return _frozen_matmul(down, dh.to(dtype))


class _Float16FrozenLinear(torch.autograd.Function):
    """``x W^T`` in float16 for a frozen ``W``, float32 in and out. The backward scales the incoming
    gradient by a power of two (exact) so that its largest entry lies in (1/2, 1], which float16
    holds with room for the matmul's sums, and undoes the scale in float32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(torch.float16), weight.to(torch.float16)).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        scale = torch.exp2(-torch.ceil(torch.log2(grad.abs().amax().float().clamp_min(2.0**-64))))
        with torch.autocast(grad.device.type, enabled=False):
            g = F.linear((grad * scale).to(torch.float16), weight.to(torch.float16).t())  # (.., in)
        return g.float() / scale, None
