"""MoE-LoRA router (OMoE Eq. (2)-(3)): ``G(x) = softmax(W_g x)``, soft, top-k or switch routing."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from omoe.registry import ROUTINGS


class Routing(NamedTuple):
    """Which experts each token uses, slot-major so that slot tensors stack with representations.

    weights: ``(S, N)`` mixing weight of slot ``s`` for token ``n``.
    indices: ``(S, N)`` expert of each slot, ascending along ``S``; ``None`` under soft routing,
        where slot ``s`` is expert ``s`` and ``S`` equals the number of experts.
    probs: ``(N, E)`` full softmax of the router, float32 (for statistics and the aux loss).
    """

    weights: torch.Tensor
    indices: torch.Tensor | None
    probs: torch.Tensor


class RouterStats(NamedTuple):
    """Router statistics of one forward pass; ``aux_loss`` keeps its graph so it can be trained.

    aux_loss: scalar Switch/Mixtral load-balancing loss ``E * sum_e f_e * P_e``.
    load: ``(E,)`` mean routing weight per expert over the (unpadded) tokens.
    token_fraction: ``(E,)`` share of token-to-expert assignments, ``f_e / S``.
    entropy: scalar mean entropy of the router's softmax, in nats.
    """

    aux_loss: torch.Tensor
    load: torch.Tensor
    token_fraction: torch.Tensor
    entropy: torch.Tensor


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor | None, mask: torch.Tensor | None = None):
    """Switch Transformer / Mixtral auxiliary loss ``E * sum_e f_e * P_e``.

    Args:
        probs: ``(N, E)`` router softmax.
        indices: ``(S, N)`` selected experts, or ``None`` when every token uses every expert (then
            ``f_e = 1`` and the loss is the constant ``E``: soft routing has nothing to balance).
        mask: ``(N,)`` bool, True for real tokens; padded tokens are left out of both means.

    Returns:
        ``(loss, f)`` with ``f`` of shape ``(E,)``: assignments to expert ``e`` per token.
    """
    n_tokens, n_experts = probs.shape
    if mask is None:
        mask = torch.ones(n_tokens, dtype=torch.bool, device=probs.device)
    m = mask.to(probs.dtype)  # (N,)
    denom = m.sum().clamp_min(1.0)
    p_mean = (probs * m[:, None]).sum(0) / denom  # (E,)
    if indices is None:
        f = torch.ones(n_experts, dtype=probs.dtype, device=probs.device) * (m.sum() > 0)
    else:
        one_hot = F.one_hot(indices, n_experts).to(probs.dtype)  # (S, N, E)
        f = (one_hot * m[None, :, None]).sum((0, 1)) / denom  # (E,)
    return n_experts * (f * p_mean).sum(), f


class Router(nn.Module):
    """Linear gate without bias, ``G(x) = softmax(W_g x)`` (OMoE Eq. (2)).

    routing="soft": every expert, weights = softmax.
    routing="topk": the ``top_k`` largest, renormalised to sum to 1 (Eq. (3)).
    routing="switch": the largest only, weighted by its raw probability (Switch Transformer), so the
        router still receives a gradient.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        routing: str = "soft",
        top_k: int | None = None,
        init_std: float = 0.02,
        device=None,
    ):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {tuple(ROUTINGS)}, got {routing!r}")
        self.num_experts = num_experts
        self.routing = routing
        self.top_k = num_experts if routing == "soft" else (1 if routing == "switch" else top_k)
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, x: torch.Tensor) -> Routing:
        """x: ``(N, d)`` token features. The softmax is computed in float32 (or float64 inputs' dtype)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.weight.to(dtype))  # (N, E)
        probs = logits.softmax(-1)
        if self.routing == "soft":
            return Routing(probs.t(), None, probs)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, K)
        if self.routing == "topk":
            top_p = top_p / top_p.sum(-1, keepdim=True)
        # Ascending expert order per token: Gram-Schmidt is order dependent, and index order makes
        # top-k with k = E give the same result as soft routing.
        top_i, order = top_i.sort(dim=-1)
        top_p = top_p.gather(-1, order)
        return Routing(top_p.t(), top_i.t(), probs)

    @staticmethod
    def stats(routing: Routing, mask: torch.Tensor | None = None) -> RouterStats:
        """Aux loss, load and entropy of ``routing`` over the tokens where ``mask`` is True."""
        probs = routing.probs
        aux, f = load_balancing_loss(probs, routing.indices, mask)
        n_tokens = probs.shape[0]
        with torch.no_grad():
            m = torch.ones(n_tokens, device=probs.device) if mask is None else mask.to(probs.dtype)
            denom = m.sum().clamp_min(1.0)
            weights = routing.weights.t().detach().to(probs.dtype)  # (N, S)
            if routing.indices is None:
                dense = weights
            else:
                dense = torch.zeros_like(probs).scatter_(1, routing.indices.t(), weights)  # (N, E)
            load = (dense * m[:, None]).sum(0) / denom
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
            entropy = (entropy * m).sum() / denom
            slots = routing.weights.shape[0]
        return RouterStats(aux, load, f.detach() / slots, entropy)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, num_experts={self.num_experts}, routing={self.routing}, top_k={self.top_k}"
