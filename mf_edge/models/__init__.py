"""The MetaFormer model zoo: architecture, registry and ``create_model``."""

from mf_edge.models.factory import ModelStats, count_macs, count_params, create_model, model_stats
from mf_edge.models.metaformer import MetaFormer, MetaFormerConfig
from mf_edge.models.zoo import REGISTRY, ModelInfo, get_model_info, list_models

__all__ = [
    "REGISTRY",
    "MetaFormer",
    "MetaFormerConfig",
    "ModelInfo",
    "ModelStats",
    "count_macs",
    "count_params",
    "create_model",
    "get_model_info",
    "list_models",
    "model_stats",
]
