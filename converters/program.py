"""Shared export helpers for the targets: ``torch.export`` with the spec's batch, and the fp16 wrapper."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from mf_edge.spec import ExportSpec

MAX_DYNAMIC_BATCH = 256


class Float16Model(nn.Module):
    """Runs ``model`` in float16 behind a float32 interface: casts the input down, the logits up."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def example_batch(spec: ExportSpec, seed: int = 0) -> torch.Tensor:
    """The tracing input: the spec's shape, with at least 2 images for a dynamic batch.

    (``torch.export`` specialises a dimension traced at size 1.)
    """
    batch = max(spec.batch_size, 2) if spec.dynamic_batch else spec.batch_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *spec.input_shape[1:]), generator=generator)


def dynamic_shapes(spec: ExportSpec) -> tuple[dict[int, Dim]] | None:
    """``torch.export`` dynamic shapes: the batch dimension (1..``MAX_DYNAMIC_BATCH``) when asked."""
    return ({0: Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},) if spec.dynamic_batch else None


def export_program(model: nn.Module, spec: ExportSpec) -> ExportedProgram:
    """``torch.export`` of ``model`` in eval mode on ``example_batch(spec)``, batch dynamic if asked."""
    with torch.no_grad():
        return torch.export.export(model, (example_batch(spec),), dynamic_shapes=dynamic_shapes(spec))
