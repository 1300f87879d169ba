"""mf-edge: MetaFormer vision models to Core ML, ExecuTorch, ONNX and TensorRT."""

from mf_edge.errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__", "convert", "count_macs", "count_params", "create_model",
           "get_model_info", "list_models"]


MODEL_NAMES = ("count_macs", "count_params", "create_model", "get_model_info", "list_models")


def __getattr__(name: str):
    """Lazy public names: ``import mf_edge`` stays light (no PyTorch), so the CLI starts, and answers
    Ctrl-C, before the heavy imports; ``mf_edge.convert`` pulls in the exporters only when used."""
    if name == "convert":
        from mf_edge.pipeline import convert

        return convert
    if name in MODEL_NAMES:
        from mf_edge import models

        return getattr(models, name)
    raise AttributeError(f"module 'mf_edge' has no attribute {name!r}")
