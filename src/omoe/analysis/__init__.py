"""Analysis of trained MoE adapters: expert diversity (cosine similarity, effective rank), routing
entropy and load, and t-SNE maps of the experts' representations (``omoe analyze``)."""

from omoe.analysis.metrics import by_expert, effective_rank, pairwise_cosine, rank_summary
from omoe.analysis.run import AnalysisSpec, analyze, base_model_of, summary_table

__all__ = [
    "AnalysisSpec",
    "analyze",
    "base_model_of",
    "by_expert",
    "effective_rank",
    "pairwise_cosine",
    "rank_summary",
    "summary_table",
]
