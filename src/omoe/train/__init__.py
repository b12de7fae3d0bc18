"""Training: ``TrainConfig`` (one YAML = one run), ``train()`` (the loop), checkpoints and metrics.

``omoe train --config configs/paper.yaml`` is the command; see ``docs/training.md``.
"""

from omoe.train.config import DataConfig, LoggingConfig, OptimConfig, TrainConfig, load_config
from omoe.train.loop import lr_factor
from omoe.train.trainer import TrainResult, train

__all__ = [
    "DataConfig",
    "LoggingConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "load_config",
    "lr_factor",
    "train",
]
