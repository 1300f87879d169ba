"""``manifest.json``: what an output folder holds, how it was made and how its input is prepared.

The manifest is the contract of an output folder: ``mf-edge parity``/``predict``/``bench`` and the
standalone ``apps/classify`` demo read the model, weights, spec and preprocessing back from it.
"""

from __future__ import annotations

import json
import math
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from mf_edge.errors import UserError
from mf_edge.spec import PRECISIONS, ExportSpec, Preprocessing

MANIFEST = "manifest.json"
PARITY = "parity.json"
LABELS = "labels.txt"
FORMAT = "mf-edge-manifest/1"
TOOLS = ("mf-edge", "torch", "torchvision", "executorch", "torchao", "coremltools", "onnx", "onnxruntime",
         "onnxscript", "onnxsim", "tensorrt", "numpy")


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the tools an artifact depends on (``None`` when absent), and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_facts(out_dir: Path) -> dict[str, dict]:
    """Size and sha256 of each entry of ``out_dir`` but the manifest (an ``.mlpackage`` is one entry)."""
    from mf_edge.weights import sha256_file

    facts = {}
    for entry in sorted(out_dir.iterdir()):
        if entry.name in (MANIFEST,):
            continue
        size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file()) if entry.is_dir() \
            else entry.stat().st_size
        facts[entry.name] = {"bytes": size, "sha256": sha256_file(entry)}
    return facts


def preprocessing_dict(prep: Preprocessing) -> dict:
    """The eval transform in words and numbers, enough to reimplement it without PyTorch."""
    return {"resize_shorter_side": prep.resize_size, "center_crop": prep.image_size,
            "interpolation": prep.interpolation, "crop_pct": prep.crop_pct, "scale": 1 / 255,
            "mean": list(prep.mean), "std": list(prep.std), "color": "RGB", "layout": "NCHW"}


def build_manifest(spec: ExportSpec, model_facts: dict, weights: dict, target: str, artifact: str,
                   details: dict, parity: dict, out_dir: Path, quantization: dict | None = None,
                   labels: dict | None = None, rewrites: dict | None = None) -> dict:
    """The manifest of the output folder ``out_dir`` (files already written, parity already run)."""
    return {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model_facts,
        "weights": weights,
        "target": target,
        "precision": spec.precision,
        "artifact": artifact,
        "input": spec.to_dict()["input"],
        "output": {"name": "logits", "shape": [spec.batch_size, spec.num_classes], "dtype": "float32"},
        "preprocessing": preprocessing_dict(spec.preprocessing),
        "labels": labels,
        "spec": spec.to_dict(),
        "quantization": quantization,
        "rewrites": rewrites or {},
        "tools": tool_versions(),
        "files": file_facts(out_dir),
        "parity": parity_summary(parity),
        "details": details,
    }


def parity_summary(report: dict) -> dict:
    """The manifest's copy of a parity report: status, reason, runtime and each reference's metrics."""
    from mf_edge.parity import FALLBACK

    references = {name: r["metrics"] | {"passed": r["passed"]} for name, r in report["references"].items()}
    summary = {"status": report["status"], "reason": report["reason"], "runtime": report["runtime"],
               "references": references}
    if FALLBACK in report:  # TensorRT without a GPU: the ONNX checked in onnxruntime instead
        summary[FALLBACK] = parity_summary(report[FALLBACK])
    return summary


NON_FINITE = "non_finite"


def strict_json(data: dict, indent: int | None = 2) -> str:
    """``data`` as strict JSON (RFC 8259 has no NaN/Infinity): a non-finite number becomes ``null``,
    and the top-level ``non_finite`` entry names each such field and why it is null."""
    replaced: list[str] = []
    clean = _finite(data, "", replaced)
    if replaced:
        clean[NON_FINITE] = {"reason": "these numbers were NaN or infinite, which JSON cannot hold; written "
                                       "as null", "fields": replaced}
    return json.dumps(clean, indent=indent, default=str, allow_nan=False)


def _finite(value, where: str, replaced: list[str]):
    if isinstance(value, dict):
        return {key: _finite(item, f"{where}.{key}" if where else str(key), replaced)
                for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item, f"{where}[{i}]", replaced) for i, item in enumerate(value)]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        replaced.append(f"{where} ({value})")
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` as strict JSON (see ``strict_json``)."""
    path.write_text(strict_json(data) + "\n")


def read_manifest(out_dir: str | Path) -> dict:
    """The manifest of an output folder; a missing, corrupt or ill-typed one raises ``UserError``.

    The fields that ``parity``/``predict``/``bench`` read back are checked here (types, and the spec
    rebuilds), so a damaged manifest is one error line and never a ``KeyError``/``TypeError`` later.
    """
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{out_dir} has no {MANIFEST}; pass an output folder written by `mf-edge convert`.")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError: ValueError
        raise UserError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:120]}); convert the "
                        "model again.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not an mf-edge manifest ({FORMAT}); convert the model again.")
    for key, kind in FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            raise UserError(f"{path} is damaged: {key!r} is {type(manifest.get(key)).__name__}, not "
                            f"{kind.__name__}; convert the model again.")
    if not isinstance(manifest["model"].get("name"), str):
        raise UserError(f"{path} is damaged: 'model' has no name; convert the model again.")
    spec_from_manifest(manifest, path)
    return manifest


FIELDS = {"target": str, "artifact": str, "model": dict, "weights": dict, "spec": dict}
SPEC_FIELDS = {"model": str, "image_size": int, "num_classes": int, "batch_size": int, "dynamic_batch": bool,
               "precision": str, "options": dict}
PREPROCESSING_FIELDS = {"image_size": int, "crop_pct": float, "interpolation": str, "mean": list, "std": list}


def spec_from_manifest(manifest: dict, path: str | Path = MANIFEST) -> ExportSpec:
    """The ``ExportSpec`` an output folder was made with (``UserError`` when its fields are damaged)."""
    data = dict(manifest["spec"])
    data.pop("input", None)
    prep = data.pop("preprocessing", None)
    problem = _mistyped(data, SPEC_FIELDS, "spec") or (
        "spec.preprocessing is missing" if not isinstance(prep, dict) else
        _mistyped(prep, PREPROCESSING_FIELDS, "spec.preprocessing"))
    problem = problem or _out_of_range(data, prep)
    if problem:
        raise UserError(f"{path} is damaged: {problem}; convert the model again.")
    prep = Preprocessing(prep["image_size"], float(prep["crop_pct"]), prep["interpolation"],
                         tuple(prep["mean"]), tuple(prep["std"]))
    return ExportSpec(**{key: data[key] for key in SPEC_FIELDS}, preprocessing=prep)


INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _out_of_range(spec: dict, prep: dict) -> str | None:
    """The first value of a well-typed spec that no conversion could have written, in words."""
    checks = (
        (spec["image_size"] > 0 and spec["image_size"] % 32 == 0,
         "spec.image_size is not a positive multiple of 32"),
        (spec["batch_size"] >= 1 and spec["num_classes"] >= 1, "spec.batch_size/num_classes are below 1"),
        (spec["precision"] in PRECISIONS, f"spec.precision is not one of {', '.join(PRECISIONS)}"),
        (prep["image_size"] == spec["image_size"] and 0 < prep["crop_pct"] <= 1,
         "spec.preprocessing's image_size/crop_pct do not fit the spec"),
        (prep["interpolation"] in INTERPOLATIONS, "spec.preprocessing.interpolation is unknown"),
        (all(len(prep[k]) == 3 and all(_is_number(v) for v in prep[k]) for k in ("mean", "std"))
         and all(v > 0 for v in prep["std"]), "spec.preprocessing mean/std are not three numbers each "
                                             "(std positive)"),
    )
    return next((message for ok, message in checks if not ok), None)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _mistyped(data: dict, fields: dict[str, type], where: str) -> str | None:
    """The first field of ``data`` missing or of another type than ``fields`` says, in words."""
    for key, kind in fields.items():
        value = data.get(key)
        if kind is float:
            ok = _is_number(value)
        elif kind is list:  # a manifest still in memory holds tuples where its JSON holds lists
            ok = isinstance(value, list | tuple)
        else:
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            return f"{where}.{key} is {type(value).__name__}, not {kind.__name__}"
    return None
