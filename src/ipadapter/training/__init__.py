"""Training IP-Adapters (needs `accelerate`; not imported by the inference path)."""

from .config import TrainConfig
from .loop import Trainer, TrainingInterrupted, main, train

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "main", "train"]
