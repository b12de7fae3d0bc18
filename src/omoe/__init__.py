"""omoe: Orthogonal Mixture of LoRA Experts and its baselines for Hugging Face causal LMs."""

__version__ = "0.1.0"

from omoe.config import OMoEConfig
from omoe.tuners.model import OMoEModel, get_omoe_model

__all__ = ["OMoEConfig", "OMoEModel", "__version__", "get_omoe_model"]
