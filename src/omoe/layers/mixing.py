"""How expert representations are mixed: vanilla MoE-LoRA (Eq. (3)) or OMoE (Eq. (7))."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from omoe.layers.gram_schmidt import gram_schmidt
from omoe.layers.kernels import fused, fused_enabled, recompute_in_backward


class ExpertMixer(nn.Module):
    """Vanilla MoE-LoRA, OMoE Eq. (3): ``sum_s G(x)_s E_s(x)``.

    The mixers share one interface, so an MoE layer never asks which one it holds: ``transform``,
    ``forward`` (mix), ``combine`` (both, as training runs them), and two properties the layer may
    use: ``linear`` (the mixture is linear in the representations, so it commutes with a frozen
    linear map) and ``wide_gradients`` (its backward can leave float16's range).
    """

    orthogonal = False  # which mixer, for reports (omoe analyze)
    linear = True
    wide_gradients = False

    def transform(self, reps: torch.Tensor) -> torch.Tensor:
        """The representations that get mixed; identity for vanilla MoE."""
        return reps

    def forward(self, reps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """reps: ``(S, N, d)`` (already transformed); weights: ``(S, N)``. Returns ``(N, d)``."""
        return torch.einsum("sn,snd->nd", weights.to(reps.dtype), reps)

    def combine(self, reps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Transform and mix: reps ``(S, N, d)``, weights ``(S, N)``; returns ``(N, d)``."""
        return self(self.transform(reps), weights)


class OrthogonalMixer(ExpertMixer):
    """OMoE, Eq. (5)-(7): Gram-Schmidt on the Stiefel manifold, then the router's mixture."""

    orthogonal = True
    linear = False
    # Gram-Schmidt's gradient at E = 0 is 1/eps times LoRA's: beyond float16's range.
    wide_gradients = True

    def __init__(self, orthogonalize: bool = True, normalize: bool = True, eps: float = 1e-6):
        super().__init__()
        self.orthogonalize, self.normalize, self.eps = orthogonalize, normalize, eps

    def transform(self, reps: torch.Tensor) -> torch.Tensor:
        return gram_schmidt(reps, orthogonalize=self.orthogonalize, normalize=self.normalize, eps=self.eps)

    def combine(self, reps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if recompute_in_backward(reps):
            # Gram-Schmidt keeps several float32 (S, N, d) intermediates for backward; on accelerators
            # keep only its input and recompute the (cheap, elementwise) rest in the backward pass.
            return checkpoint(super().combine, reps, weights, use_reentrant=False)
        if fused_enabled():  # Gram-Schmidt and the mixture in compiled loops (layers/kernels.py)
            return _fused_orthogonal_mix(reps, weights, self.orthogonalize, self.normalize, self.eps)
        return super().combine(reps, weights)

    def extra_repr(self) -> str:
        return f"orthogonalize={self.orthogonalize}, normalize={self.normalize}, eps={self.eps:g}"


def orthogonal_mix(reps, weights, orthogonalize: bool, normalize: bool, eps: float) -> torch.Tensor:
    """``sum_s w_s E'_s`` (Eq. (7)) with ``E'`` the Gram-Schmidt of ``reps`` (Eq. (5)-(6)), written
    as a weighted sum over the slot axis (not a batched matmul of ``N`` tiny ``(1, S) @ (S, d)``
    products) so that ``torch.compile`` fuses it with Gram-Schmidt. reps ``(S, N, d)``, weights
    ``(S, N)``; returns float32 ``(N, d)``."""
    q = gram_schmidt(reps, orthogonalize=orthogonalize, normalize=normalize, eps=eps)  # (S, N, d)
    return (weights.to(q.dtype).unsqueeze(-1) * q).sum(0)


_fused_orthogonal_mix = fused(orthogonal_mix)
