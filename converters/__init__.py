"""Deployment targets, one folder each, behind the ``Target`` contract (``converters/base.py``).

``get_target(name)`` gives the registered ``Target``; the built-in ones are imported on first use (their
modules import heavy toolkits lazily anyway), ``register_target`` adds another (a plugin, or a toy
target in a test) without touching any other module.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from mf_edge.converters.base import BenchFacts, BenchReference, ExportResult, Runtime, Target
from mf_edge.errors import UserError

# The built-in targets: name -> the module exporting its ``TARGET`` (in the order schemes are listed).
BUILTIN_TARGETS = {name: f"mf_edge.converters.{name}"
                   for name in ("executorch", "onnx", "tensorrt", "coreml")}
TARGET_MODULES = tuple(sorted(BUILTIN_TARGETS))
_registered: dict[str, Target] = {}
_files: dict[str, str] = {}  # registered (not built-in) target -> the file defining it


def register_target(target: Target, replace: bool = False) -> Target:
    """Make ``target`` available under ``target.name`` to the pipeline, the CLI and bench.

    A name already taken is a ``ValueError`` unless ``replace``; returns ``target``.
    """
    if not isinstance(target, Target):
        raise TypeError(f"{target!r} does not implement mf_edge.converters.base.Target; subclass it.")
    if not replace and (target.name in _registered or target.name in BUILTIN_TARGETS):
        raise ValueError(f"a target called {target.name!r} exists already; pass replace=True to override it")
    _registered[target.name] = target
    _files[target.name] = inspect.getfile(type(target))
    return target


def unregister_target(name: str) -> None:
    """Remove a target added with ``register_target`` (the built-in ones come back on next use)."""
    _registered.pop(name, None)
    _files.pop(name, None)


def target_file(name: str) -> str | None:
    """The file defining a registered (not built-in) target, for processes that must load it again
    (``mf-edge bench`` measures each runtime in a fresh interpreter); ``None`` for a built-in one."""
    return _files.get(name)


def load_target_file(path: str | Path) -> Target:
    """Import the file at ``path`` and register the ``TARGET`` it defines (unless its import did)."""
    spec = importlib.util.spec_from_file_location(f"mf_edge_target_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise UserError(f"{path} is not a Python file defining a target.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so its classes know their module (inspect, pickle)
    spec.loader.exec_module(module)
    target = module.TARGET
    if _registered.get(target.name) is not target:
        register_target(target, replace=True)
    return target


def target_names() -> tuple[str, ...]:
    """Every target name: the built-in ones, then those registered, in registration order."""
    return tuple(dict.fromkeys((*BUILTIN_TARGETS, *_registered)))


def get_target(name: str) -> Target:
    """The ``Target`` called ``name``; an unknown name raises ``UserError``."""
    if name not in _registered:
        if name not in BUILTIN_TARGETS:
            raise UserError(f"unknown target {name!r}; choose one of {', '.join(sorted(target_names()))}.")
        _registered[name] = importlib.import_module(BUILTIN_TARGETS[name]).TARGET
    return _registered[name]


__all__ = ["BUILTIN_TARGETS", "TARGET_MODULES", "BenchFacts", "BenchReference", "ExportResult", "Runtime",
           "Target", "get_target", "load_target_file", "register_target", "target_file", "target_names",
           "unregister_target"]
