"""Calibration files: the statistics of one calibration run, reusable by every target's export.

A file (safetensors) holds, per target graph, the observer state of every node the targets' schemes
observe (``g<i>/<node>/<buffer>`` tensors) and, as JSON metadata, what they were computed for: model
name, image size, classes, weights, observer, the calibration set (count and sha256 of its file
list) and each graph's structure and parameter hashes. ``convert --calibration FILE`` loads it
instead of calibrating again and refuses one made for another model, image size or weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mf_edge.calibration.statistics import NodeStats
from mf_edge.errors import UserError

FORMAT = "mf-edge-calibration/1"


@dataclass
class GraphCalibration:
    """The statistics of one target graph (targets whose prepared models give the same graph share it)."""

    targets: list[str]
    graph_sha256: str
    params_sha256: str
    stats: NodeStats = field(repr=False)


@dataclass
class CalibrationRecord:
    """Everything a calibration file holds."""

    model: str
    image_size: int
    num_classes: int
    weights: dict
    observer: str
    calibration_set: dict
    graphs: list[GraphCalibration]
    versions: dict = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None

    @property
    def targets(self) -> list[str]:
        return [target for graph in self.graphs for target in graph.targets]

    def metadata(self) -> dict:
        meta = asdict(self)
        meta.pop("path")
        meta.pop("sha256")
        meta["graphs"] = [{k: v for k, v in asdict(g).items() if k != "stats"} | {"nodes": sorted(g.stats)}
                          for g in self.graphs]
        return {"format": FORMAT, **meta}

    def save(self, path: str | Path) -> Path:
        """Write the file atomically (temporary name, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"g{i}/{node}/{key}": value.contiguous()
                   for i, graph in enumerate(self.graphs) for node, state in graph.stats.items()
                   for key, value in state.items()}
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(partial), metadata={"mf_edge_calibration": json.dumps(self.metadata())})
        os.replace(partial, path)
        self.path, self.sha256 = path, file_sha256(path)
        return path

    def describe(self) -> dict:
        """Manifest facts about the file a quantized export used."""
        return {"file": str(self.path) if self.path else None, "sha256": self.sha256,
                "observer": self.observer, "targets": self.targets}

    def check_matches(self, model: str, image_size: int, num_classes: int) -> None:
        """Refuse a file made for another model, image size or class count."""
        made = f"{self.model} at {self.image_size}px, {self.num_classes} classes"
        if (self.model, self.image_size, self.num_classes) != (model, image_size, num_classes):
            raise UserError(f"calibration file {self.path} was made for {made}, not {model} at "
                            f"{image_size}px, {num_classes} classes; run `mf-edge calibrate {model} "
                            f"--image-size {image_size}` for this model.")

    def check_covers(self, target: str) -> None:
        """Refuse a target the file has no statistics for."""
        if target not in self.targets:
            raise UserError(f"calibration file {self.path} covers {', '.join(self.targets)}, not {target}; "
                            f"run `mf-edge calibrate {self.model} --target {target}` (or without --target "
                            "for all).")

    def stats_for(self, target: str, graph_sha: str, params_sha: str) -> NodeStats:
        """The statistics of the graph ``target`` exports; a mismatch is a ``UserError`` saying why."""
        for graph in self.graphs:
            if graph.graph_sha256 == graph_sha:
                if graph.params_sha256 != params_sha:
                    raise UserError(f"calibration file {self.path} was made with other weights than this "
                                    f"{self.model} (parameter sha256 differs); calibrate again with the same "
                                    "--weights.")
                return graph.stats
        self.check_covers(target)
        made = f"mf-edge {self.versions.get('mf_edge')}, torch {self.versions.get('torch')}"
        raise UserError(f"calibration file {self.path} does not match the {target} graph of {self.model} "
                        f"(made by {made}); run `mf-edge calibrate` again.")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_record(path: str | Path) -> CalibrationRecord:
    """Read a calibration file; a missing, corrupt or foreign file raises ``UserError``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist; make one with `mf-edge calibrate MODEL "
                        "--calib-data DIR`.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("mf_edge_calibration", "null"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"calibration file {path} is corrupt ({str(exc)[:80]}); make it again with "
                        "`mf-edge calibrate`.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not an mf-edge calibration file ({FORMAT}); make one with "
                        "`mf-edge calibrate`.")
    graphs = []
    for i, graph in enumerate(meta["graphs"]):
        stats: NodeStats = {node: {} for node in graph["nodes"]}
        prefix = f"g{i}/"
        for key, value in tensors.items():
            if key.startswith(prefix):
                node, buffer = key[len(prefix):].rsplit("/", 1)
                stats[node][buffer] = value
        graphs.append(GraphCalibration(graph["targets"], graph["graph_sha256"], graph["params_sha256"],
                                       stats))
    return CalibrationRecord(meta["model"], meta["image_size"], meta["num_classes"], meta["weights"],
                             meta["observer"], meta["calibration_set"], graphs, meta.get("versions", {}),
                             path, file_sha256(path))


def versions() -> dict:
    """Versions that shape the graph and its node names."""
    import torchao

    import mf_edge

    return {"mf_edge": mf_edge.__version__, "torch": torch.__version__, "torchao": torchao.__version__}
