"""The ``executorch`` target's folder: its ``Target`` (``target.py``) and what only it needs."""

from mf_edge.converters.executorch.target import TARGET

__all__ = ["TARGET"]
