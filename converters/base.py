"""The one interface every deployment target implements.

A target is one module in ``mf_edge.converters`` exposing a ``TARGET`` object with: ``name``,
``precisions`` and ``default_precision``, ``artifact`` (the file name it writes), ``next_step`` (what to
do with an output folder, ``{output}`` standing for its path), ``export(model, spec, out_dir)`` and
``runtime(out_dir, spec)``. The CLI, parity and bench only use this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from torch import nn

from mf_edge.spec import ExportSpec


@dataclass
class ExportResult:
    """What ``export`` produced: the artifact files and facts for the manifest."""

    files: list[Path]
    details: dict = field(default_factory=dict)


@runtime_checkable
class Runtime(Protocol):
    """A loaded artifact: ``run`` takes a normalised ``[B, 3, H, W]`` float32 batch, returns logits."""

    name: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Target(Protocol):
    name: str
    precisions: tuple[str, ...]
    default_precision: str
    artifact: str
    next_step: str

    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> ExportResult:
        """Write the artifact for ``model`` into ``out_dir`` (a temporary folder the caller publishes)."""
        ...

    def runtime(self, out_dir: Path, spec: ExportSpec) -> Runtime:
        """Load the artifact in ``out_dir`` in this target's own runtime.

        Raises ``mf_edge.errors.RuntimeUnavailable`` with the reason where this host cannot run it.
        """
        ...
