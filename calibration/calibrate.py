"""``calibrate``: one calibration run for several targets, saved as a calibration file.

Each target's prepared model (``converters.prepare.prepare_for_target``) is captured; targets whose graphs are
identical share one set of statistics. Every graph is calibrated once on the same images with the
union of the nodes its targets' schemes observe, so ``convert --calibration FILE`` can then export
each of those targets without running a single image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torch.fx import GraphModule

from mf_edge.calibration.data import DEFAULT_CALIB_SIZE, load_calibration_set
from mf_edge.calibration.graph import capture, graph_sha256, params_sha256
from mf_edge.calibration.observers import DEFAULT_OBSERVER, observer_class
from mf_edge.calibration.quantize import QuantizeOptions, calibrate_graph
from mf_edge.calibration.schemes import Scheme, calibrated_targets, scheme_for
from mf_edge.calibration.statistics import DEFAULT_BATCH
from mf_edge.calibration.store import CalibrationRecord, GraphCalibration, versions
from mf_edge.console import step
from mf_edge.converters import get_target
from mf_edge.converters.prepare import make_spec, prepare_for_target
from mf_edge.errors import UserError


@dataclass
class _Graph:
    module: GraphModule
    targets: list[str] = field(default_factory=list)
    schemes: list[Scheme] = field(default_factory=list)


def default_output(model: str, image_size: int) -> Path:
    """``mf-edge-out/<model>-<size>px-calibration.safetensors``."""
    return Path("mf-edge-out") / f"{model}-{image_size}px-calibration.safetensors"


def calibrate(model: nn.Module, calib_data: str | Path, targets: list[str] | None = None,
              image_size: int | None = None, calib_size: int = DEFAULT_CALIB_SIZE,
              observer: str = DEFAULT_OBSERVER, device: str | None = None, batch_size: int = DEFAULT_BATCH,
              seed: int = 0, cache_dir: str | Path | None = None) -> CalibrationRecord:
    """Calibrate ``model`` (from ``create_model``) for ``targets`` (default: every int8 target)."""
    observer_class(observer)
    targets = list(dict.fromkeys(targets or calibrated_targets()))
    specs = {}
    for name in targets:
        scheme_for(name, "int8")
        specs[name] = make_spec(model, get_target(name), "int8", image_size)
    spec = next(iter(specs.values()))
    calib = load_calibration_set(calib_data, spec.preprocessing, calib_size, seed, cache_dir)
    graphs: dict[str, _Graph] = {}
    for name, target_spec in specs.items():
        with step(f"torch.export of the {name} graph"):
            module = capture(prepare_for_target(model, target_spec, get_target(name)), target_spec.image_size)
        entry = graphs.setdefault(graph_sha256(module), _Graph(module))
        entry.targets.append(name)
        entry.schemes.append(scheme_for(name, "int8"))
    options = QuantizeOptions(target=targets[0], device=device, batch_size=batch_size, seed=seed)
    calibrated = [GraphCalibration(entry.targets, sha, params_sha256(entry.module),
                                   calibrate_graph(entry.module, entry.schemes, observer, calib, options))
                  for sha, entry in graphs.items()]
    return CalibrationRecord(spec.model, spec.image_size, spec.num_classes, dict(model.mf_edge_weights),
                             observer, calib.describe(), calibrated, versions())


def save_new(record: CalibrationRecord, output: str | Path | None, force: bool = False) -> Path:
    """Save ``record`` to ``output`` (default ``default_output``); an existing file needs ``force``."""
    path = Path(output) if output else default_output(record.model, record.image_size)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to replace it or --output another file.")
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass a file name to --output.")
    return record.save(path)
