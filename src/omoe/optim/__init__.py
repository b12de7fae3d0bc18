"""Optimizers for MoE experts: the orthogonal expert optimizer (Liu et al. 2023, arXiv 2310.09762)."""

from omoe.optim.config import OrthogonalConfig
from omoe.optim.orthogonal import OrthogonalExpertOptimizer

__all__ = ["OrthogonalConfig", "OrthogonalExpertOptimizer"]
