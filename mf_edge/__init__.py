"""mf-edge: MetaFormer vision models to Core ML, ExecuTorch, ONNX and TensorRT."""

from mf_edge.errors import UserError
from mf_edge.models import count_macs, count_params, create_model, get_model_info, list_models

__version__ = "0.1.0"

__all__ = ["UserError", "__version__", "count_macs", "count_params", "create_model", "get_model_info",
           "list_models"]
