"""Training IP-Adapters (needs `accelerate`; not imported by the inference path)."""

from .config import TrainConfig
from .loop import Trainer, main, train

__all__ = ["TrainConfig", "Trainer", "main", "train"]
