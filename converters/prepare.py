"""The request and the model as a target takes them: ``make_spec`` and ``prepare_for_target``.

Below the pipeline, so every caller (``pipeline``, ``mf-edge calibrate``, QAT, sensitivity) builds the
same spec and the same prepared graph.
"""

from __future__ import annotations

from torch import nn

from mf_edge.converters.base import Target
from mf_edge.models.zoo import ModelInfo
from mf_edge.rewrites import rewrite_for_deployment
from mf_edge.spec import ExportSpec


def make_spec(model: nn.Module | ModelInfo, target: Target, precision: str | None = None,
              image_size: int | None = None, batch_size: int = 1, dynamic_batch: bool = False,
              options: dict | None = None) -> ExportSpec:
    """The ``ExportSpec`` of one request: checked shape and precision, the model's preprocessing.

    ``model`` is a model from ``create_model`` (its head's class count and, unless ``image_size`` is
    given, the size it was built for are used) or, to check a request before loading any weights, a
    ``ModelInfo``.
    """
    info = model if isinstance(model, ModelInfo) else model.mf_edge_info
    image_size = image_size or getattr(model, "mf_edge_image_size", None)
    return ExportSpec.for_model(info, image_size=image_size, batch_size=batch_size,
                                dynamic_batch=dynamic_batch, precision=target.check_precision(precision),
                                num_classes=getattr(model, "num_classes", None), **(options or {}))


def prepare_for_target(model: nn.Module, spec: ExportSpec, target: Target) -> nn.Module:
    """The float model as ``target`` exports it: deployment rewrites, then the target's own ``prepare``.

    ``mf-edge calibrate`` and QAT use this same model, so their graphs are the one ``quantize`` builds.
    The copy records in ``mf_edge_rewrites`` what both rewrites changed.
    """
    rewritten = rewrite_for_deployment(model, target.rewrites)  # exact (mf_edge.rewrites)
    prepared = target.prepare(rewritten, spec)
    prepared.mf_edge_rewrites = {**getattr(rewritten, "mf_edge_rewrites", {}),  # type: ignore[attr-defined]
                                 **getattr(prepared, "mf_edge_rewrites", {})}
    return prepared
