"""mf-edge: MetaFormer vision models to Core ML, ExecuTorch, ONNX and TensorRT."""

from __future__ import annotations

import importlib

from mf_edge.errors import UserError

__version__ = "0.1.0"

# imported on first use: PyTorch and the exporters load only when a model is built or converted
_LAZY = {"convert": "mf_edge.pipeline", "count_macs": "mf_edge.models",
         "count_params": "mf_edge.models", "create_model": "mf_edge.models",
         "get_model_info": "mf_edge.models", "list_models": "mf_edge.models",
         "register_model": "mf_edge.models"}

__all__ = ["UserError", "__version__", "convert", "count_macs", "count_params", "create_model",
           "get_model_info", "list_models", "register_model"]


def __getattr__(name: str):
    """Lazy ``mf_edge.convert``, ``mf_edge.create_model``...: plain ``import mf_edge`` stays light (no
    PyTorch), so the CLI starts, and answers Ctrl-C, before the heavy imports."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mf_edge' has no attribute {name!r}")
