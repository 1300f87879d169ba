"""The ``onnx`` target's folder: its ``Target`` (``target.py``) and what only it needs."""

from mf_edge.converters.onnx.target import TARGET

__all__ = ["TARGET"]
