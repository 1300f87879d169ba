"""Quantization-aware training on the graph the int8 export quantizes, and the QAT checkpoint contract.

The QAT graph is built exactly as ``mf-edge convert --precision int8`` builds its PTQ graph: the
deployment rewrites and ``Target.prepare`` (``deployment_model``), ``calibration.graph.capture``
(``torch.export``, batch dimension free) and the target's scheme (``calibration.schemes``), whose
observers ``FakeQuantizing`` turns into fake-quant modules for ``prepare_qat_pt2e``. Training starts
from the PTQ-calibrated model: the activation ranges PTQ's calibration gives on training images.

A QAT checkpoint (see ``mf_edge.train.checkpoint``) keeps

- ``"model"``: the float official-layout weights QAT started from (parity's float reference), and
- ``"qat"``: ``{"target", "precision", "scheme", "image_size", "frozen", "state"}``, where ``state`` is
  the prepared graph's state dict: the trained parameters of the deployment graph and every
  ``activation_post_process_*`` fake-quant module (scale, zero point, observer range).

``restore_for_export`` is the loading side, called by ``mf_edge.calibration.quantize_for_export``: for
a model whose weights came from a QAT checkpoint it rebuilds the same graph, loads ``state`` strictly
and freezes the observers, so ``convert_pt2e`` gives the int8 program without calibrating again.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.fx import GraphModule
from torchao.quantization.pt2e import (
    FakeQuantize,
    FakeQuantizeBase,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    allow_exported_model_train_eval,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationSpec, Quantizer

from mf_edge.console import step
from mf_edge.errors import UserError
from mf_edge.spec import ExportSpec
from mf_edge.train.checkpoint import read_qat_section

if TYPE_CHECKING:
    from mf_edge.calibration.quantize import QuantizedModel, QuantizeOptions

PRECISION = "int8"
GRAPH_CONSTANT_PREFIX = "_tensor_constant"
OBSERVER_PREFIX = "activation_post_process_"
BATCH_NORM_TRAINING_OPS = ("_native_batch_norm_legit", "cudnn_batch_norm", "batch_norm")
PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


def deployment_model(model: nn.Module, spec: ExportSpec, target: str) -> nn.Module:
    """``model`` in the form the pipeline quantizes it for ``target`` (as ``mf_edge.pipeline.quantize``)."""
    from mf_edge.converters import get_target
    from mf_edge.rewrites import rewrite_for_deployment

    chosen = get_target(target)
    rewritten = rewrite_for_deployment(model, chosen.name)
    prepare = getattr(chosen, "prepare", None)
    return prepare(rewritten, spec) if prepare is not None else rewritten


def fake_quant_constructor(spec: QuantizationSpec):
    """A ``FakeQuantize`` with a moving-average observer for the format ``spec`` describes."""
    per_channel = spec.qscheme in PER_CHANNEL
    observer = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
    kwargs = {"ch_axis": spec.ch_axis} if per_channel else {}
    return FakeQuantize.with_args(observer=observer, quant_min=spec.quant_min, quant_max=spec.quant_max,
                                  dtype=spec.dtype, qscheme=spec.qscheme, eps=2**-12, **kwargs)


class FakeQuantizing(Quantizer):
    """A PTQ quantizer whose annotations get fake-quant modules instead of observers (for QAT)."""

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        return self.quantizer.transform_for_annotation(model)

    def annotate(self, model: GraphModule) -> GraphModule:
        self.quantizer.annotate(model)
        for node in model.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if annotation is None:
                continue
            inputs = annotation.input_qspec_map
            annotation.input_qspec_map = {arg: self._fake(spec) for arg, spec in inputs.items()}
            annotation.output_qspec = self._fake(annotation.output_qspec)
        return model

    @staticmethod
    def _fake(spec):
        if not isinstance(spec, QuantizationSpec) or spec.is_dynamic:
            return spec
        return replace(spec, observer_or_fake_quant_ctr=fake_quant_constructor(spec))

    def validate(self, model: GraphModule) -> None:
        self.quantizer.validate(model)


def fake_quant_modules(module: nn.Module) -> list[FakeQuantizeBase]:
    return [m for m in module.modules() if isinstance(m, FakeQuantizeBase)]


def qat_graph(deploy: nn.Module, spec: ExportSpec, target: str) -> tuple[GraphModule, str, GraphModule]:
    """The prepared QAT graph of a deployment-form model, its scheme's name and the captured float graph."""
    from mf_edge.calibration.graph import capture
    from mf_edge.calibration.observers import DEFAULT_OBSERVER
    from mf_edge.calibration.schemes import build_quantizer, scheme_for

    scheme = scheme_for(target, PRECISION)
    if not scheme.calibrated:
        raise UserError(f"the {target} int8 scheme ({scheme.name}) has no static activation ranges to "
                        "train; QAT needs a calibrated int8 scheme.")
    captured = capture(deploy, spec.image_size)
    quantizer = FakeQuantizing(build_quantizer(scheme, DEFAULT_OBSERVER))
    prepared = prepare_qat_pt2e(copy.deepcopy(captured), quantizer)
    allow_exported_model_train_eval(prepared)
    if not fake_quant_modules(prepared):
        raise UserError(f"the {target} int8 scheme quantizes nothing in {spec.model}; nothing to train.")
    return prepared, scheme.name, captured


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


def graph_state(prepared: GraphModule) -> dict[str, torch.Tensor]:
    """Parameters and fake-quant buffers of the prepared graph (its lifted constants are rebuilt)."""
    return {k: v for k, v in prepared.state_dict().items() if not k.startswith(GRAPH_CONSTANT_PREFIX)}


def load_graph_state(prepared: GraphModule, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``graph_state`` output into a graph prepared the same way."""
    expected = graph_state(prepared)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state)  # observer buffers are resized on load
                       if expected[k].shape != state[k].shape and OBSERVER_PREFIX not in k)
    if missing or unexpected or misshaped:
        raise UserError(
            f"the QAT state in {source} does not fit this model's quantized graph ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped, e.g. "
            f"{(missing + unexpected + misshaped)[:3]}); convert with the model, image size and target it "
            "was trained for, or run `mf-edge train --qat` again."
        )
    # Observers read their state-dict version from ``_metadata`` (without it they reset ``eps``); the
    # graph was prepared the same way, so its own metadata describes the saved state.
    versioned = OrderedDict(state)
    versioned._metadata = prepared.state_dict()._metadata  # type: ignore[attr-defined]
    prepared.load_state_dict(versioned, strict=False)


def check_same_graph(section: dict, graph_sha256: str, source: str) -> None:
    """The graph QAT trained must be the graph being rebuilt (same model, rewrites, scheme, mf-edge)."""
    if section["graph_sha256"] != graph_sha256:
        raise UserError(f"{source} was trained on another int8 graph of this model (its deployment rewrites "
                        "or quantization scheme changed since, e.g. with another mf-edge version); run "
                        "`mf-edge train --qat` again from its float weights.")


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
            module, scheme, captured = qat_graph(deployment_model(model, spec, target), spec, target)
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


def restore_for_export(model: nn.Module, spec: ExportSpec, target: str) -> tuple[GraphModule, dict] | None:
    """The QAT-trained prepared graph and its facts if ``model``'s weights came from a QAT checkpoint.

    ``model`` is the deployment-form model ``quantize_for_export`` receives (it carries
    ``mf_edge_weights``); any other weights give ``None``. The graph has frozen observers and is ready
    for ``convert_pt2e``; a checkpoint trained for another target or image size raises ``UserError``.
    """
    path = (getattr(model, "mf_edge_weights", None) or {}).get("path")
    section = read_qat_section(Path(path)) if path else None
    if section is None:
        return None
    if spec.precision != PRECISION or section["target"] != target or spec.image_size != section["image_size"]:
        raise UserError(
            f"{path} is a QAT checkpoint for --target {section['target']} --precision {PRECISION} at image "
            f"size {section['image_size']}; convert it with those (asked: --target {target} --precision "
            f"{spec.precision}, image size {spec.image_size}) or use the float weights it started from."
        )
    from mf_edge.calibration.graph import graph_sha256

    prepared, scheme, captured = qat_graph(model, spec, target)
    check_same_graph(section, graph_sha256(captured), path)
    load_graph_state(prepared, section["state"], path)
    prepared.apply(disable_observer)
    prepared.apply(enable_fake_quant)
    facts = {"source": "qat checkpoint", "file": str(path), "scheme": scheme,
             "observers_frozen": section["frozen"]}
    return prepared, facts


def quantize_qat_checkpoint(
    model: nn.Module, spec: ExportSpec, options: QuantizeOptions
) -> QuantizedModel | None:
    """``quantize_for_export``'s result for a model whose weights are a QAT checkpoint, else ``None``.

    ``options`` are PTQ's ``QuantizeOptions``; the int8 program comes from the checkpoint's trained
    graph and ranges, so no calibration runs; ``--keep-float`` and the calibration options are refused.
    """
    from mf_edge.calibration.quantize import QuantizedModel, convert_quantized
    from mf_edge.calibration.schemes import scheme_for

    restored = restore_for_export(model, spec, options.target)
    if restored is None:
        return None
    if options.keep_float:
        raise UserError("--keep-float does not apply to a QAT checkpoint (its layers were trained "
                        "quantized); drop --keep-float, or train again with the float weights.")
    calibrating = [flag for flag, given in (("--calib-data", options.calib_data),
                                            ("--calibration", options.calibration),
                                            ("--observer", options.observer),
                                            ("--max-drop", options.max_drop is not None)) if given]
    if calibrating:
        raise UserError(f"{', '.join(calibrating)} do(es) not apply to a QAT checkpoint (its ranges were "
                        f"learned in training, no calibration runs); drop {', '.join(calibrating)}.")
    prepared, facts = restored
    with step(f"converting the QAT graph ({facts['scheme']})"):
        simulated = convert_quantized(prepared)
    details = {"scheme": scheme_for(options.target, PRECISION).describe(), "keep_float": [],
               "kept_float_layers": [], "observer": "qat (moving-average fake quantization)",
               "calibration": facts, "options": options.to_dict()}
    return QuantizedModel(simulated, simulated, details)
