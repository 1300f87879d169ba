"""mf-edge: MetaFormer vision models to Core ML, ExecuTorch, ONNX and TensorRT."""

from mf_edge.errors import UserError
from mf_edge.models import count_macs, count_params, create_model, get_model_info, list_models

__version__ = "0.1.0"

__all__ = ["UserError", "__version__", "convert", "count_macs", "count_params", "create_model",
           "get_model_info", "list_models"]


def __getattr__(name: str):
    """Lazy ``mf_edge.convert`` (the pipeline pulls in the exporters; plain imports stay light)."""
    if name == "convert":
        from mf_edge.pipeline import convert

        return convert
    raise AttributeError(f"module 'mf_edge' has no attribute {name!r}")
