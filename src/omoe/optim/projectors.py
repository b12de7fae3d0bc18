"""OWM projectors (Zeng et al. 2019) of the orthogonal expert optimizer: the math, pure torch.

For inputs ``x`` collected as the rows of ``X`` (n, d), OWM's recursive-least-squares projector,
started at ``P = I`` and updated once per input with ``k = P x; P <- P - k k^T / (alpha + x^T k)``,
equals after n updates (Sherman-Morrison, then Woodbury)

    P = (I + X^T X / alpha)^-1 = I - X^T (X X^T + alpha I)^-1 X            (n x n solve, no d x d)

so ``delta P`` only needs ``X``. Expert i's update is projected with the other experts' projectors:
``union`` (the default) = the projector of all their inputs together, ``P(X_{-i})``, which makes
``delta_i x = 0`` (up to alpha) for every x in the span of every other expert's inputs, as the
abstract of Liu et al. 2023 states; or ``mean`` = ``(1/(E-1)) sum_{j != i} P_j`` (the third-party
summary's "averaged projector matrices"), the same for E = 2 but for E > 2 only a damping: on x in
span(X_j) it keeps ``(1/(E-1)) sum_{l != i, j} P_l x``.
"""

from __future__ import annotations

import torch


def rls_update(P: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """OWM's step ``P <- P - k k^T / (alpha + x^T k)``, ``k = P x``, in place and batched.

    Args:
        P: ``(B, d, d)`` symmetric projectors.
        x: ``(B, d)`` one input mean per projector; a zero row leaves its projector unchanged.
    """
    k = torch.bmm(P, x.unsqueeze(-1)).squeeze(-1)  # (B, d)
    denom = alpha + (x * k).sum(-1)  # (B,)
    P.sub_(torch.einsum("bd,be->bde", k, k) / denom[:, None, None])


def project_out(delta: torch.Tensor, D: torch.Tensor, alpha: float, combine: str) -> torch.Tensor:
    """``delta_i P_{-i}`` in factored form, computed in float64.

    Args:
        delta: ``(E, m, d)`` one update per expert, its rows acting on d-dimensional inputs.
        D: ``(E, n, d)``, row block ``D[j]`` = the input directions of expert j, the same for every
            i; or ``(E, E, n, d)``, ``D[i, j]`` = expert j's directions as expert i sees them. Zero
            rows (unused slots) change nothing.
        combine: ``mean`` or ``union`` (see the module docstring).

    Returns:
        ``(E, m, d)`` in ``delta``'s dtype.
    """
    E = delta.shape[0]
    dd = delta.double()
    D = D.double()
    shared = D.dim() == 3
    if combine == "mean":
        spec = "jnd" if shared else "ijnd"  # D_j, or D_ij
        gram = D @ D.transpose(-1, -2)  # (E, n, n) or (E, E, n, n)
        gram.diagonal(dim1=-2, dim2=-1).add_(alpha)
        coeff = torch.einsum(f"imd,{spec}->ijnm", dd, D)  # D_ij delta_i^T: (E, E, n, m)
        solved = torch.linalg.solve(gram, coeff)  # (D_ij D_ij^T + alpha I)^-1 D_ij delta_i^T
        weight = (1 - torch.eye(E, dtype=dd.dtype, device=dd.device)) / max(1, E - 1)  # (E, E), 0 on i = j
        correction = torch.einsum(f"ij,ijnm,{spec}->imd", weight, solved, D)  # (E, m, d)
        return (dd - correction).to(delta.dtype)
    out = torch.empty_like(dd)
    for i in range(E):  # a loop over experts, each one (E-1)n x (E-1)n solve
        rows = torch.cat([(D[j] if shared else D[i, j]) for j in range(E) if j != i])  # ((E-1)n, d)
        gram = rows @ rows.T
        gram.diagonal().add_(alpha)
        coeff = torch.linalg.solve(gram, rows @ dd[i].T)  # ((E-1)n, m)
        out[i] = dd[i] - coeff.T @ rows
    return out.to(delta.dtype)


def dense_project(delta: torch.Tensor, P: torch.Tensor, combine: str) -> torch.Tensor:
    """``delta_i P_{-i}`` with dense projectors.

    Args:
        delta: ``(E, m, d)``.
        P: ``(E, d, d)``: ``P[j]`` = expert j's projector (``mean``), or ``P[i]`` = the projector of
            all other experts' inputs already (``union``).
    """
    if combine == "mean":
        E = P.shape[0]
        P = (P.sum(0, keepdim=True) - P) / max(1, E - 1)  # (E, d, d): mean over j != i
    return torch.bmm(delta, P)


def codes(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """The rank-r codes ``A_i x`` of every expert j's input directions under every expert i's A.

    A: ``(E, r, d)``, X: ``(E, n, d)``. Returns ``(E, E, n, r)``: ``[i, j]`` = ``X_j A_i^T``, the
    inputs expert i's B would see on expert j's tokens (B's projector is built from these).
    """
    return torch.einsum("ird,jnd->ijnr", A.double(), X.double())
