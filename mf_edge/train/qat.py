"""Quantization-aware training on the graph the int8 export quantizes, and the QAT checkpoint contract.

The QAT graph is built exactly as ``mf-edge convert --precision int8`` builds its PTQ graph: the
deployment rewrites and ``Target.prepare`` (``converters.prepare.prepare_for_target``),
``calibration.graph.capture`` (``torch.export``, batch dimension free) and the target's scheme
(``calibration.schemes``), whose observers ``FakeQuantizing`` turns into fake-quant modules for
``prepare_qat_pt2e``. Training starts from the PTQ-calibrated model: the activation ranges PTQ's
calibration gives on training images.

A QAT checkpoint (see ``mf_edge.train.checkpoint``) keeps

- ``"model"``: the float official-layout weights QAT started from (parity's float reference), and
- ``"qat"``: ``{"target", "precision", "scheme", "image_size", "frozen", "state"}``, where ``state`` is
  the prepared graph's state dict: the trained parameters of the deployment graph and every
  ``activation_post_process_*`` fake-quant module (scale, zero point, observer range).

The graph itself and the loading side (``restore_for_export``, called by
``mf_edge.calibration.quantize_for_export``) live below the training loop, in ``mf_edge.calibration.qat``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.fx import GraphModule
from torchao.quantization.pt2e import (
    FakeQuantizeBase,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)

from mf_edge.calibration.qat import (  # noqa: F401  (re-exported: the QAT checkpoint's loading side)
    PRECISION,
    FakeQuantizing,
    check_same_graph,
    fake_quant_modules,
    graph_state,
    load_graph_state,
    qat_graph,
    quantize_qat_checkpoint,
    restore_for_export,
)
from mf_edge.console import step
from mf_edge.converters import get_target
from mf_edge.converters.prepare import prepare_for_target
from mf_edge.spec import ExportSpec

BATCH_NORM_TRAINING_OPS = ("_native_batch_norm_legit", "cudnn_batch_norm", "batch_norm")


def ptq_ranges(captured: GraphModule, target: str, images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Clipped ``(low, high)`` activation ranges PTQ's calibration gives on ``images``, by observed node."""
    from mf_edge.calibration.data import CalibrationSet
    from mf_edge.calibration.graph import is_activation, observed_source, observers
    from mf_edge.calibration.observers import DEFAULT_OBSERVER
    from mf_edge.calibration.quantize import QuantizeOptions, calibrate_graph, prepare_and_load
    from mf_edge.calibration.schemes import scheme_for

    scheme = scheme_for(target, PRECISION)
    calib = CalibrationSet(images, [f"train:{i}" for i in range(len(images))], "", "training images")
    stats = calibrate_graph(captured, [scheme], DEFAULT_OBSERVER, calib, QuantizeOptions(target=target))
    calibrated = prepare_and_load(copy.deepcopy(captured), scheme, DEFAULT_OBSERVER, (), stats,
                                  images.shape[-1])
    ranges = {}
    for node, observer in observers(calibrated):
        source = observed_source(node)
        if is_activation(source):
            scale, zero_point = observer.calculate_qparams()
            scale, zero_point = float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])
            low, high = observer.quant_min - zero_point, observer.quant_max - zero_point
            ranges[source.name] = (low * scale, high * scale)
    return ranges


@torch.no_grad()
def start_from_ptq(prepared: GraphModule, ranges: dict[str, tuple[float, float]], image_size: int) -> int:
    """Weight fake-quants observe their weights, activation ones take PTQ's ranges; returns how many."""
    from mf_edge.calibration.graph import is_activation, observed_source

    prepared.apply(disable_fake_quant)
    prepared.apply(enable_observer)
    device = next(prepared.parameters()).device
    prepared(torch.zeros(1, 3, image_size, image_size, device=device))
    started = 0
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not isinstance(prepared.get_submodule(node.target), FakeQuantizeBase):
            continue
        fake_quant = prepared.get_submodule(node.target)
        source = observed_source(node)
        if is_activation(source):
            if source.name not in ranges:
                raise RuntimeError(f"PTQ calibration has no range for {source.name}")
            low, high = ranges[source.name]
            fake_quant.activation_post_process.min_val.fill_(low)
            fake_quant.activation_post_process.max_val.fill_(high)
            started += 1
        scale, zero_point = fake_quant.calculate_qparams()
        fake_quant.scale.resize_(scale.shape).copy_(scale)
        fake_quant.zero_point.resize_(zero_point.shape).copy_(zero_point)
    prepared.apply(enable_fake_quant)
    return started


def freeze_batch_norm_stats(prepared: GraphModule) -> int:
    """Switch training-mode batch norms of the graph to their running statistics; returns how many.

    MetaFormers have none (their norms are LayerNorms), so this finds nothing on the zoo models.
    """
    changed = 0
    for node in prepared.graph.nodes:
        name = getattr(node.target, "__name__", "")
        is_batch_norm = node.op == "call_function" and name.split(".")[0] in BATCH_NORM_TRAINING_OPS
        if is_batch_norm and len(node.args) > 5 and node.args[5] is True:
            node.args = (*node.args[:5], False, *node.args[6:])
            changed += 1
    if changed:
        prepared.recompile()
    return changed


@contextmanager
def observers_paused(module: nn.Module) -> Iterator[None]:
    """Evaluate without letting validation images move the observer ranges."""
    saved = [(m, m.observer_enabled.clone()) for m in fake_quant_modules(module)]
    module.apply(disable_observer)
    try:
        yield
    finally:
        for fake_quant, enabled in saved:
            fake_quant.observer_enabled.copy_(enabled)


class QATModel:
    """A prepared QAT graph with the float weights it started from and its target's scheme."""

    def __init__(self, module: GraphModule, target: str, scheme: str, spec: ExportSpec,
                 start_weights: dict[str, torch.Tensor], graph_sha256: str) -> None:
        self.module, self.target, self.scheme, self.spec = module, target, scheme, spec
        self.graph_sha256 = graph_sha256
        self.start_weights = {k: v.detach().cpu().clone() for k, v in start_weights.items()}
        self.frozen = False

    @classmethod
    def prepare(cls, model: nn.Module, target: str, spec: ExportSpec,
                calibration: torch.Tensor | None) -> QATModel:
        """``model``'s QAT graph for ``target``, started from PTQ's ranges on ``calibration`` if given."""
        from mf_edge.calibration.graph import graph_sha256

        with step(f"preparing the {target} int8 graph for QAT"):
            deploy = prepare_for_target(model, spec, get_target(target))
            module, scheme, captured = qat_graph(deploy, spec, target)
        if calibration is not None:
            with step(f"PTQ calibration on {len(calibration)} training images"):
                start_from_ptq(module, ptq_ranges(captured, target, calibration), spec.image_size)
        return cls(module, target, scheme, spec, model.state_dict(), graph_sha256(captured))

    def freeze(self) -> None:
        """Stop observer updates (scales and zero points stay as learned) and batch-norm statistics."""
        self.module.apply(disable_observer)
        freeze_batch_norm_stats(self.module)
        self.frozen = True

    def float_state(self) -> dict[str, torch.Tensor]:
        return self.start_weights

    def section(self) -> dict:
        """The checkpoint's ``"qat"`` section (see the module docstring)."""
        return {"target": self.target, "precision": PRECISION, "scheme": self.scheme,
                "image_size": self.spec.image_size, "frozen": self.frozen, "graph_sha256": self.graph_sha256,
                "state": {k: v.detach().cpu().clone() for k, v in graph_state(self.module).items()}}

    def load_state(self, section: dict) -> None:
        check_same_graph(section, self.graph_sha256, "the --resume checkpoint")
        load_graph_state(self.module, section["state"], "the --resume checkpoint")
        if section["frozen"]:
            self.freeze()
