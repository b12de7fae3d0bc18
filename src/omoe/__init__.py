"""omoe: Orthogonal Mixture of LoRA Experts and its baselines for Hugging Face causal LMs."""

from omoe.config import OMoEConfig
from omoe.tuners.model import OMoEModel, get_omoe_model
from omoe.version import __version__

__all__ = ["OMoEConfig", "OMoEModel", "__version__", "get_omoe_model"]
