"""Deployment targets, one module each; ``TARGETS`` maps a target name to its ``Target``."""

from __future__ import annotations

import importlib

from mf_edge.converters.base import ExportResult, Runtime, Target
from mf_edge.errors import UserError

TARGET_MODULES = ("coreml", "executorch", "onnx", "tensorrt")


def get_target(name: str) -> Target:
    """The ``Target`` called ``name``; an unknown name raises ``UserError``."""
    if name not in TARGET_MODULES:
        raise UserError(f"unknown target {name!r}; choose one of {', '.join(TARGET_MODULES)}.")
    return importlib.import_module(f"mf_edge.converters.{name}").TARGET


__all__ = ["TARGET_MODULES", "ExportResult", "Runtime", "Target", "get_target"]
