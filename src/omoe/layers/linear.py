"""A single LoRA or DoRA adapter beside a frozen ``nn.Linear`` (OMoE Eq. (1); the baselines)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from omoe.errors import ConfigError
from omoe.layers.experts import LoRAExperts, without_bias
from omoe.layers.kernels import frozen_linear
from omoe.layers.quantized import quantization_of


class AdapterLinear(nn.Module):
    """``h = W0 x + delta(x)`` with one LoRA or DoRA expert; ``base_layer`` stays frozen."""

    def __init__(self, base_layer: nn.Linear, adapter: LoRAExperts):
        super().__init__()
        self.base_layer = base_layer
        self.omoe_lora = adapter
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_linear(self.base_layer, x)  # (..., out)
        if self.disabled:
            return y
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        frozen = partial(without_bias, y, self.base_layer)  # (N, out) W0 x, if the variant asks
        delta = self.omoe_lora(x2, None, frozen, self.base_layer).squeeze(0)  # (N, out)
        return y + delta.view(y.shape).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The frozen weight with the adapter folded in, in the base weight's dtype."""
        kind = quantization_of(self.base_layer)
        if kind is not None:
            raise ConfigError(
                f"cannot merge into a {kind}-quantized frozen weight (the sum would be rounded to the "
                "quantization grid); load the base model unquantized, load the adapter, then merge"
            )
        return self.omoe_lora.merged_weight(self.base_layer).to(self.base_layer.weight.dtype)  # (out, in)
