"""Adapter math: pure torch, no transformers imports."""

from omoe.layers.experts import DoRAExperts, LoRAExperts, expert_matmul
from omoe.layers.gram_schmidt import gram_schmidt
from omoe.layers.linear import AdapterLinear
from omoe.layers.mixing import ExpertMixer, OrthogonalMixer
from omoe.layers.moe import ExpertCapture, MoEFeedForward, MoELayer, MoELinear, TokenMask
from omoe.layers.router import Router, RouterStats, Routing, load_balancing_loss

__all__ = [
    "AdapterLinear",
    "DoRAExperts",
    "ExpertCapture",
    "ExpertMixer",
    "LoRAExperts",
    "MoEFeedForward",
    "MoELayer",
    "MoELinear",
    "OrthogonalMixer",
    "Router",
    "RouterStats",
    "Routing",
    "TokenMask",
    "expert_matmul",
    "gram_schmidt",
    "load_balancing_loss",
]
