"""The QAT graph and the QAT checkpoint's loading side (below the training loop, used by PTQ's export).

``qat_graph`` builds the graph ``mf-edge train --qat`` trains: the deployment-form model captured with
``calibration.graph.capture`` and prepared by ``prepare_qat_pt2e`` with the target's scheme, whose
observers ``FakeQuantizing`` turns into fake-quant modules. ``restore_for_export`` and
``quantize_qat_checkpoint`` are the loading side, called by ``quantize_for_export``: for a model whose
weights came from a QAT checkpoint they rebuild the same graph, load its state strictly and freeze the
observers, so ``convert_pt2e`` gives the int8 program without calibrating again. The training side
(``mf_edge.train.qat``) builds on these.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
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
    disable_observer,
    enable_fake_quant,
)
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationSpec, Quantizer

from mf_edge.checkpoint_facts import FORMAT
from mf_edge.console import step
from mf_edge.errors import UserError
from mf_edge.spec import ExportSpec

if TYPE_CHECKING:
    from mf_edge.calibration.quantize import QuantizedModel, QuantizeOptions

PRECISION = "int8"
GRAPH_CONSTANT_PREFIX = "_tensor_constant"
OBSERVER_PREFIX = "activation_post_process_"
PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


def read_qat_section(path: str | Path) -> dict | None:
    """The ``"qat"`` section of the checkpoint at ``path``, or ``None`` for any other weights file."""
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours to judge: plain weights are validated by mf_edge.weights
        return None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return payload.get("qat")
    return None


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
    scheme = scheme_for(options.target, PRECISION)
    with step(f"converting the QAT graph ({facts['scheme']})"):
        simulated = convert_quantized(prepared, scheme)  # the scheme's bias grid too, as PTQ's
    details = {"scheme": scheme.describe(), "keep_float": [],
               "kept_float_layers": [], "observer": "qat (moving-average fake quantization)",
               "calibration": facts, "options": options.to_dict()}
    return QuantizedModel(simulated, simulated, details)
