"""``quantize_for_export``: the pipeline's quantize step for ``int8`` and ``w8``.

The target-prepared float model is captured with ``torch.export``, annotated by the target's scheme
(``schemes.build_quantizer``), given activation ranges (from a calibration file, else by calibrating
on images now) and converted with ``convert_pt2e``. The converted module computes the quantized
model in PyTorch (quantize/dequantize around float kernels): it is both what the target exports and
the simulation parity compares the artifact with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule
from torchao.quantization.pt2e import ObserverBase, allow_exported_model_train_eval
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from mf_edge.calibration.data import DEFAULT_CALIB_SIZE, CalibrationSet, load_calibration_set
from mf_edge.calibration.graph import (
    capture,
    graph_sha256,
    is_activation,
    observed_source,
    observers,
    params_sha256,
)
from mf_edge.calibration.observers import DEFAULT_OBSERVER, observer_class
from mf_edge.calibration.qat import quantize_qat_checkpoint
from mf_edge.calibration.schemes import (
    Scheme,
    build_quantizer,
    check_keep_float,
    matches_keep_float,
    scheme_for,
    snap_biases_to_accumulator_grid,
)
from mf_edge.calibration.statistics import (
    DEFAULT_BATCH,
    NodeStats,
    collect_statistics,
    merge_states,
)
from mf_edge.calibration.store import CalibrationRecord, load_record
from mf_edge.console import step
from mf_edge.errors import UserError
from mf_edge.spec import ExportSpec


@dataclass
class QuantizeOptions:
    """The PTQ options of one export (``convert``'s ``--calib-data``, ``--calibration``, ...)."""

    target: str
    calib_data: str | None = None
    calibration: str | None = None
    calib_size: int = DEFAULT_CALIB_SIZE
    observer: str | None = None
    keep_float: tuple[str, ...] = ()
    device: str | None = None
    batch_size: int = DEFAULT_BATCH
    seed: int = 0
    cache_dir: str | None = None
    max_drop: float | None = None

    @classmethod
    def from_mapping(cls, options: QuantizeOptions | dict) -> QuantizeOptions:
        """Options from a dict (paths may be ``Path``); an unknown key is a ``UserError``."""
        if isinstance(options, QuantizeOptions):
            return options
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(f"unknown PTQ option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(known))}.")
        if not options.get("target"):
            raise UserError("quantize_for_export needs the target name in its options "
                            "({'target': 'onnx', ...}).")
        values = {k: v for k, v in options.items() if v is not None}
        for key in ("calib_data", "calibration", "cache_dir"):
            if key in values:
                values[key] = str(values[key])
        values["keep_float"] = tuple(values.get("keep_float") or ())
        if values.get("observer"):
            observer_class(values["observer"])
        return cls(**values)

    def to_dict(self) -> dict:
        """JSON-able options, as the manifest records them (enough to redo the quantization)."""
        data = asdict(self)
        data["keep_float"] = list(self.keep_float)
        return data


@dataclass
class QuantizedModel:
    """What the pipeline exports (``module``), its PyTorch simulation (``simulated``) and manifest facts."""

    module: nn.Module
    simulated: nn.Module
    details: dict = field(default_factory=dict)


def prepare_and_load(graph_module: GraphModule, scheme: Scheme, observer: str, keep_float: tuple[str, ...],
                     stats: NodeStats, image_size: int) -> GraphModule:
    """``prepare_pt2e`` with the scheme's quantizer, weight observers run, activation states loaded."""
    prepared = prepare_pt2e(graph_module, build_quantizer(scheme, observer, keep_float))
    with torch.no_grad():  # weight and constant observers see their tensors; activations are replaced below
        prepared(torch.zeros(1, 3, image_size, image_size))
    sources: dict[int, tuple[ObserverBase, list[str]]] = {}
    for node, module in observers(prepared):
        source = observed_source(node)
        if is_activation(source) and not getattr(module, "is_dynamic", False):
            sources.setdefault(id(module), (module, []))[1].append(source.name)
    for module, names in sources.values():  # one observer may watch several values (shared qparams)
        missing = [name for name in names if name not in stats]
        if missing:
            raise UserError(f"the calibration does not cover node {missing[0]!r} of the {scheme.name} "
                            "graph; run `mf-edge calibrate` again (without --target: every target).")
        for key, value in merge_states([stats[name] for name in names]).items():  # not load_state_dict:
            getattr(module, key).resize_(value.shape).copy_(value)  # unversioned, it resets eps to 1e-7
    return prepared


def convert_quantized(prepared: GraphModule, scheme: Scheme | None = None) -> GraphModule:
    """``convert_pt2e``: observers become quantize/dequantize ops, weights are stored as int8; with a
    ``scheme.bias_grid`` the biases are rounded to the int32 accumulator grid its runtime uses."""
    converted = convert_pt2e(prepared)
    if scheme is not None and scheme.bias_grid:
        snap_biases_to_accumulator_grid(converted)
    return allow_exported_model_train_eval(converted)  # targets and parity may call .eval() on it


def kept_float_layers(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """The quantizable layers (conv, linear) that ``--keep-float`` leaves in float."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear)) and matches_keep_float(name, patterns)]


def quantize_for_export(model: nn.Module, spec: ExportSpec,
                        options: QuantizeOptions | dict) -> QuantizedModel:
    """Quantize the target-prepared ``model`` for ``spec.precision`` with the target's scheme.

    ``options`` (``QuantizeOptions`` or a dict with ``target``) gives the calibration source for
    ``int8``: ``calibration`` (a file from ``mf-edge calibrate``, reused without running images) or
    ``calib_data`` (images calibrated on now). ``w8`` needs neither. Weights from a QAT checkpoint
    (``mf-edge train --qat``) bring their trained graph and ranges: no calibration.
    """
    opts = QuantizeOptions.from_mapping(options)
    trained = quantize_qat_checkpoint(model, spec, opts)
    if trained is not None:
        return trained
    scheme = scheme_for(opts.target, spec.precision)
    check_keep_float(opts.keep_float, model)
    record = _checked_record(spec, opts) if scheme.calibrated else None
    with step(f"torch.export for quantization ({scheme.name})"):
        graph = capture(model, spec.image_size)
    facts: dict = {"scheme": scheme.describe(), "keep_float": list(opts.keep_float),
                   "kept_float_layers": kept_float_layers(model, opts.keep_float),
                   "float_parameter_bytes": sum(4 * p.numel() for p in model.parameters())}
    observer, stats = DEFAULT_OBSERVER, {}
    if scheme.calibrated:
        observer, stats, calibration = _calibration(graph, spec, scheme, opts, record)
        facts.update(observer=observer, calibration=calibration)
    else:
        facts.update(observer=None, calibration=None)
    keep_float = opts.keep_float
    if opts.max_drop is not None:  # the fewest worst layers in float for the budget (calibration.sensitivity)
        if not scheme.calibrated:
            raise UserError(f"--max-drop needs a calibrated int8 scheme, not {scheme.name}; drop --max-drop.")
        from mf_edge.calibration.sensitivity import keep_float_for_budget

        keep_float, facts["max_drop"] = keep_float_for_budget(graph, spec, scheme, observer, stats, opts,
                                                                        model)
        facts.update(keep_float=list(keep_float), kept_float_layers=kept_float_layers(model, keep_float))
    with step(f"quantizing ({scheme.name})"):
        prepared = prepare_and_load(graph, scheme, observer, keep_float, stats, spec.image_size)
        simulated = convert_quantized(prepared, scheme)  # with the biases the runtime's kernels add
    facts["options"] = opts.to_dict()
    module = model if scheme.applied_by == "coremltools" else simulated
    return QuantizedModel(module, simulated, facts)


def _checked_record(spec: ExportSpec, opts: QuantizeOptions) -> CalibrationRecord | None:
    """The calibration file of ``opts`` checked against the request (before any export work)."""
    if not opts.calibration:
        if not opts.calib_data:
            raise UserError(f"{spec.precision} for {opts.target} needs calibration images: pass --calib-data "
                            "DIR (a folder of images) or --calibration FILE (from `mf-edge calibrate`).")
        return None
    record = load_record(opts.calibration)
    if opts.observer and opts.observer != record.observer:
        raise UserError(f"calibration file {record.path} used the {record.observer} observer, not "
                        f"{opts.observer}; drop --observer or calibrate again with --observer "
                        f"{opts.observer}.")
    record.check_matches(spec.model, spec.image_size, spec.num_classes)
    record.check_covers(opts.target)
    return record


def _calibration(graph: GraphModule, spec: ExportSpec, scheme: Scheme, opts: QuantizeOptions,
                 record: CalibrationRecord | None) -> tuple[str, NodeStats, dict]:
    """The activation statistics for ``graph``: from the calibration file, else calibrated now."""
    if record is not None:
        stats = record.stats_for(opts.target, graph_sha256(graph), params_sha256(graph))
        return record.observer, stats, {**record.calibration_set, "file": record.describe()}
    observer = opts.observer or DEFAULT_OBSERVER
    observer_class(observer)
    calib = load_calibration_set(opts.calib_data, spec.preprocessing, opts.calib_size, opts.seed,
                                 opts.cache_dir)
    stats = calibrate_graph(graph, [scheme], observer, calib, opts)
    return observer, stats, {**calib.describe(), "file": None}


def calibrate_graph(graph: GraphModule, schemes: list[Scheme], observer: str, calib: CalibrationSet,
                    opts: QuantizeOptions) -> NodeStats:
    """Statistics of every node any of ``schemes`` observes, from ``calib``'s images."""
    from mf_edge.calibration.graph import activation_nodes

    nodes = sorted({name for scheme in schemes
                    for name in activation_nodes(graph, build_quantizer(scheme, observer))})
    return collect_statistics(graph, nodes, calib.images, observer, opts.device, opts.batch_size)


def load_calibration(path: str | Path) -> CalibrationRecord:
    """A calibration file from ``mf-edge calibrate`` (see ``calibration.store``)."""
    return load_record(path)
