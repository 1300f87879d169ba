"""The MetaFormer model zoo: architecture, registry and ``create_model``.

The registry (``zoo``) is plain data; the PyTorch side (``MetaFormer``, ``create_model``, counts) is
imported on first use, so listing the zoo and ``mf-edge --help`` start without PyTorch.
"""

from __future__ import annotations

import importlib

from mf_edge.models.config import MetaFormerConfig
from mf_edge.models.zoo import REGISTRY, ModelInfo, get_model_info, list_models, register_model

_LAZY = {"MetaFormer": "metaformer", "ModelStats": "stats", "count_macs": "factory",
         "count_params": "factory", "create_model": "factory", "model_stats": "factory"}

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
    "register_model",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"mf_edge.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mf_edge.models' has no attribute {name!r}")
