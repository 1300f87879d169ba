"""Fine-tuning and quantization-aware training of the zoo models, on one device or under ``torchrun``."""

from mf_edge.train.config import TrainConfig
from mf_edge.train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
