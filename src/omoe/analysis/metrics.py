"""Diversity of expert representations: pairwise cosine similarity and effective rank.

Pure torch. ``reps`` tensors are slot-major, ``(S, N, d)``: slot ``s`` of token ``n`` (slot = expert
under soft routing or for ``ExpertCapture.all_raw``; the ``s``-th selected expert under top-k).
"""

from __future__ import annotations

import math

import torch


def pairwise_cosine(reps: torch.Tensor, eps: float = 1e-12) -> dict | None:
    """Cosine similarity between the slots of each token, averaged over tokens and slot pairs.

    Args:
        reps: ``(S, N, d)``; a zero vector has cosine 0 with everything (``eps`` guards the norm).

    Returns:
        ``{"mean": signed mean, "mean_abs": mean of |cos|, "max_abs": largest |cos|}``, or None when
        there are fewer than two slots (nothing to compare).
    """
    S = reps.shape[0]
    if S < 2 or reps.shape[1] == 0:
        return None
    x = reps.double()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)  # (S, N, d)
    gram = torch.einsum("snd,tnd->nst", unit, unit)  # (N, S, S)
    i, j = torch.triu_indices(S, S, offset=1)
    cos = gram[:, i, j]  # (N, pairs)
    return {"mean": cos.mean().item(), "mean_abs": cos.abs().mean().item(), "max_abs": cos.abs().max().item()}


def effective_rank(matrix: torch.Tensor) -> float:
    """Roy & Vetterli (2007): ``exp(H(p))`` with ``p = sigma / sum(sigma)`` over the singular values of
    ``matrix`` ``(M, d)`` (not centred). 0 for an all-zero matrix; between 1 and ``min(M, d)`` else."""
    sigma = torch.linalg.svdvals(matrix.double())
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def by_expert(reps: torch.Tensor, indices: torch.Tensor | None, num_experts: int) -> dict[int, torch.Tensor]:
    """Group slot representations by expert: ``{expert: (M_e, d)}`` (experts with no token left out).

    ``indices``: ``(S, N)`` expert of each slot, or None when slot ``s`` is expert ``s``.
    """
    if indices is None:
        return {e: reps[e] for e in range(reps.shape[0])}
    out = {}
    for e in range(num_experts):
        picked = reps[indices == e]  # (M_e, d)
        if picked.shape[0]:
            out[e] = picked
    return out


def rank_summary(groups: dict[int, torch.Tensor]) -> dict:
    """Effective rank of each expert's representations and of all of them together."""
    per_expert = {e: effective_rank(v) for e, v in groups.items()}
    joint = effective_rank(torch.cat(list(groups.values()))) if groups else 0.0
    mean = sum(per_expert.values()) / len(per_expert) if per_expert else 0.0
    return {"per_expert": {str(e): r for e, r in per_expert.items()}, "mean": mean, "joint": joint}
