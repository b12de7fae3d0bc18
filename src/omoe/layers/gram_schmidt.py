"""OMoE Eq. (5)-(6): put the experts' representations of each token on the Stiefel manifold.

Modified Gram-Schmidt over the (small) expert axis, vectorised over tokens. The loop runs over
experts, never over tokens. See docs/method.md, "Eq. (5)-(6)", for every choice made here.
"""

from __future__ import annotations

import torch


def gram_schmidt(
    reps: torch.Tensor,
    *,
    orthogonalize: bool = True,
    normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Orthonormalise expert representations token by token.

    Args:
        reps: expert representations with shape ``(S, ..., d)``: slot ``s`` holds ``E_s(x)`` of
            every token. Slots are processed in order, so ``E'_0`` keeps the direction of ``E_0``.
        orthogonalize: remove from each ``E_s`` its components along ``E'_0 .. E'_{s-1}``.
        normalize: rescale each result to unit norm (on the Stiefel manifold). When False the
            orthogonal residual keeps its own norm (ablation).
        eps: guard of the norm, ``v / sqrt(|v|^2 + eps^2)``: an all-zero representation (LoRA's
            B = 0 at initialisation) maps to exactly zero, and the map stays smooth there.

    Returns:
        float32 tensor with the shape of ``reps`` (float64 for float64 input, as in gradient checks).
    """
    v = reps.to(torch.promote_types(reps.dtype, torch.float32))
    eps2 = eps * eps
    basis: list[torch.Tensor] = []  # unit vectors q_0 .. q_{s-1}, each (..., d)
    out: list[torch.Tensor] = []
    for s in range(v.shape[0]):
        u = v[s]  # (..., d)
        if orthogonalize:
            # Modified GS: project the running residual, not the original E_s (better stability).
            for q in basis:
                u = u - (u * q).sum(-1, keepdim=True) * q
        inv_norm = torch.rsqrt((u * u).sum(-1, keepdim=True) + eps2)  # (..., 1)
        q = u * inv_norm
        basis.append(q)
        out.append(q if normalize else u)
    return torch.stack(out)  # (S, ..., d)
