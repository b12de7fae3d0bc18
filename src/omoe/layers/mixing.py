"""How expert representations are mixed: vanilla MoE-LoRA (Eq. (3)) or OMoE (Eq. (7))."""

from __future__ import annotations

import torch
from torch import nn

from omoe.layers.gram_schmidt import gram_schmidt


class ExpertMixer(nn.Module):
    """Vanilla MoE-LoRA, OMoE Eq. (3): ``sum_s G(x)_s E_s(x)``."""

    orthogonal = False

    def transform(self, reps: torch.Tensor) -> torch.Tensor:
        """The representations that get mixed; identity for vanilla MoE."""
        return reps

    def forward(self, reps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """reps: ``(S, N, d)`` (already transformed); weights: ``(S, N)``. Returns ``(N, d)``."""
        return torch.einsum("sn,snd->nd", weights.to(reps.dtype), reps)


class OrthogonalMixer(ExpertMixer):
    """OMoE, Eq. (5)-(7): Gram-Schmidt on the Stiefel manifold, then the router's mixture."""

    orthogonal = True

    def __init__(self, orthogonalize: bool = True, normalize: bool = True, eps: float = 1e-6):
        super().__init__()
        self.orthogonalize, self.normalize, self.eps = orthogonalize, normalize, eps

    def transform(self, reps: torch.Tensor) -> torch.Tensor:
        return gram_schmidt(reps, orthogonalize=self.orthogonalize, normalize=self.normalize, eps=self.eps)

    def extra_repr(self) -> str:
        return f"orthogonalize={self.orthogonalize}, normalize={self.normalize}, eps={self.eps:g}"
