"""The one path every artifact takes: model -> quantize -> export -> verify -> publish.

Each step is one function, so ``convert`` and the commands that enter the path elsewhere
(``parity`` and ``predict`` on a published folder, ``calibrate``, ``bench``) share them:

1. ``load_model``   the float PyTorch model (``create_model``)
2. ``quantize``     target rewrite (``Target.prepare``), then PTQ for int8/w8
                    (``mf_edge.calibration.quantize_for_export``)
3. ``export``       ``Target.export`` into a staging folder
4. ``verify``       the artifact in its own runtime vs the references -> ``parity.json``
5. ``publish``      ``manifest.json``, then an atomic move into the output folder
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from mf_edge import parity as parity_lib
from mf_edge.checkpoint_facts import trained_defaults
from mf_edge.console import note, progress, step
from mf_edge.converters import ExportResult, Target, get_target
from mf_edge.converters.prepare import make_spec, prepare_for_target  # noqa: F401
from mf_edge.data import ParityInputs, load_image, parity_inputs, preprocess
from mf_edge.errors import ParityFailure, RuntimeUnavailable, UserError
from mf_edge.labels import IMAGENET_1K, label_name, labels_for
from mf_edge.manifest import (
    LABELS,
    MANIFEST,
    PARITY,
    build_manifest,
    read_manifest,
    spec_from_manifest,
    write_json,
)
from mf_edge.models.zoo import get_model_info
from mf_edge.publish import check_output, partial_file, remove_stale, staged_output
from mf_edge.spec import ExportSpec

DEFAULT_OUTPUT_ROOT = Path("mf-edge-out")
QUANTIZED_PRECISIONS = ("int8", "w8")


@dataclass
class Quantized:
    """What the quantize step hands to export: the module to export and the parity references."""

    module: nn.Module
    references: dict[str, nn.Module]
    details: dict | None = None
    rewrites: dict = field(default_factory=dict)


@dataclass
class Conversion:
    """A published conversion: the output folder, its manifest and parity report."""

    output: Path
    manifest: dict
    parity: dict = field(repr=False)

    @property
    def artifact(self) -> Path:
        return self.output / self.manifest["artifact"]


def load_model(name: str, weights: str | Path = "imagenet", image_size: int | None = None, seed: int = 0,
               num_classes: int | None = None) -> nn.Module:
    """Step 1: the float model in eval mode (``weights``: ``imagenet``, ``random`` or a checkpoint path)."""
    from mf_edge.models import create_model

    return create_model(name, weights=weights, image_size=image_size, seed=seed, num_classes=num_classes)


def quantize(model: nn.Module, spec: ExportSpec, target: Target,
             ptq_options: dict | None = None) -> Quantized:
    """Step 2: the deployment rewrites and the target's own (``Target.prepare``), then PTQ for
    ``int8``/``w8`` (``ptq_options`` go to ``quantize_for_export`` with the target's name).

    References for parity: the original float model, plus the PTQ simulation when quantized.
    """
    prepared = prepare_for_target(model, spec, target)
    rewrites = dict(getattr(prepared, "mf_edge_rewrites", {}))
    if spec.precision not in QUANTIZED_PRECISIONS:
        return Quantized(prepared, {"float": model}, rewrites=rewrites)
    try:
        from mf_edge.calibration import quantize_for_export
    except ImportError:
        raise UserError(f"{spec.precision} export needs post-training quantization, which this install "
                        "lacks (mf_edge.calibration.quantize_for_export); use --precision fp32 or "
                        "fp16.") from None
    result = quantize_for_export(prepared, spec, {"target": target.name} | dict(ptq_options or {}))
    return Quantized(result.module, {"float": model, "simulated": result.simulated}, result.details, rewrites)


def export(target: Target, module: nn.Module, spec: ExportSpec, out_dir: Path) -> ExportResult:
    """Step 3: the target writes its artifact into ``out_dir``."""
    return target.export(module, spec, out_dir)


def verify(target: Target, out_dir: Path, spec: ExportSpec, references: dict[str, nn.Module],
           inputs: ParityInputs) -> dict:
    """Step 4: run the artifact in its own runtime and compare with every reference (parity report).

    A runtime this host lacks gives a ``not run`` report with the reason, never a pass. A target
    with a ``fallback_runtime`` (TensorRT: its engine needs a GPU) then has the artifact checked there
    instead (TensorRT: the ONNX it wrote, in onnxruntime), as the report's ``onnx`` entry.
    """
    report = _parity(lambda: target.runtime(out_dir, spec), spec, references, inputs)
    if report["status"] == parity_lib.NOT_RUN and target.has_fallback_runtime:
        report[parity_lib.FALLBACK] = _parity(lambda: target.fallback_runtime(out_dir, spec), spec,
                                              references, inputs)
    return report


def _parity(load_runtime, spec: ExportSpec, references: dict[str, nn.Module], inputs: ParityInputs) -> dict:
    try:
        runtime = load_runtime()
        count = len(inputs.names)
        with step(f"parity: {len(references)} reference(s) on {count} images (PyTorch)"):
            logits = {name: parity_lib.reference_logits(module, inputs.batch)
                      for name, module in references.items()}
        with progress(f"parity: {runtime.name}", count) as advance:  # per image: Core ML takes minutes
            return parity_lib.evaluate(_Advancing(runtime, advance, count), inputs, logits, spec.precision,
                                       spec.batch_size, spec.dynamic_batch)
    except RuntimeUnavailable as exc:
        return parity_lib.not_run(str(exc), spec.precision, inputs)


def class_names(model: nn.Module) -> tuple[str, ...] | None:
    """The names of ``model``'s classes: a training checkpoint's, ImageNet-1k's for 1000, else ``None``."""
    trained = (getattr(model, "mf_edge_weights", None) or {}).get("trained") or {}
    if trained.get("classes"):
        return tuple(trained["classes"])
    return labels_for(model.num_classes)


class _Advancing:
    """``runtime`` that advances a progress bar by the images of each ``run`` (padding not counted)."""

    def __init__(self, runtime, advance, total: int) -> None:
        self._runtime, self._advance, self._left = runtime, advance, total

    def __getattr__(self, name: str):
        return getattr(self._runtime, name)

    def run(self, batch: np.ndarray) -> np.ndarray:
        logits = self._runtime.run(batch)
        done = min(len(batch), self._left)
        self._left -= done
        self._advance(done)
        return logits


def model_facts(model: nn.Module, spec: ExportSpec) -> dict:
    """The manifest's ``model`` entry; for fine-tuned weights ``pretrain`` says so and
    ``fine_tuned`` names the classes (and the checkpoint, epoch and validation top-1)."""
    info = model.mf_edge_info
    facts = {"name": info.name, "arch": info.arch, "family": info.family, "pretrain": info.pretrain,
             "num_classes": spec.num_classes, "image_size": spec.image_size,
             "labels": info.labels if spec.num_classes == info.num_classes else "custom"}
    trained = (getattr(model, "mf_edge_weights", None) or {}).get("trained")
    if trained:
        start = {"imagenet": f"{info.pretrain} weights", "random": "random initialisation"}.get(
            trained.get("started_from"), trained.get("started_from") or "unknown weights")
        facts["pretrain"] = f"fine-tuned from {start}"
        facts["labels"] = "fine-tuned" if trained.get("classes") else "custom"
        facts["fine_tuned"] = {key: trained.get(key) for key in
                               ("classes", "image_size", "qat_target", "path", "epoch", "val_top1")}
    return facts


def publish(staging: Path, model: nn.Module, spec: ExportSpec, target: Target, result: ExportResult,
            report: dict, quantized: Quantized) -> dict:
    """Step 5 (inside the staging folder): labels, ``parity.json`` and ``manifest.json``.

    ``staged_output`` then moves the folder into place atomically.
    """
    labels = class_names(model)
    if labels is not None:
        (staging / LABELS).write_text("\n".join(labels) + "\n")
    write_json(staging / PARITY, report)
    label_set = IMAGENET_1K if labels == labels_for(spec.num_classes) else "fine-tuned"
    manifest = build_manifest(spec, model_facts(model, spec), model.mf_edge_weights, target.name,
                              target.artifact, result.details, report, staging, quantized.details,
                              {"set": label_set, "file": LABELS} if labels is not None else None,
                              quantized.rewrites)
    write_json(staging / MANIFEST, manifest)
    return manifest


def failed_report_path(output: Path) -> Path:
    """Where a conversion that failed parity leaves its report: ``<output>.parity-failed.json`` beside it."""
    return output.with_name(f"{output.name}.parity-failed.json")


def keep_failed_report(output: Path, report: dict) -> Path:
    """Write the report of a failed parity check beside ``output`` (atomically), for the user to read."""
    path = failed_report_path(output)
    remove_stale(path.parent, path.name)
    partial = partial_file(path)
    write_json(partial, report)
    os.replace(partial, path)
    return path


def weights_tag(weights: str | Path | dict) -> str:
    """The weights in a folder name: ``""`` for ImageNet, ``random``, or the checkpoint's file stem.

    ``weights`` is the ``--weights`` value or a model's ``mf_edge_weights`` record.
    """
    if isinstance(weights, dict):
        weights = weights.get("path") if weights.get("source") == "path" else weights.get("source")
    if str(weights) in ("imagenet", "None"):
        return ""
    return "random" if str(weights) == "random" else Path(str(weights)).stem


def default_output(spec: ExportSpec, target: Target, weights: str | Path | dict = "imagenet") -> Path:
    """``./mf-edge-out/<model>-<size>px[-<weights>]-<target>-<what it holds>``.

    The image size and the weights (``weights_tag``) are in the name, so conversions of other sizes
    or weights do not collide; what the folder holds is the precision, or what the target says it
    writes on this host (TensorRT without a GPU: ``onnx-fp32``/``onnx-int8``, no engine).
    """
    held = target.output_label(spec)
    parts = [spec.model, f"{spec.image_size}px", weights_tag(weights), target.name, held]
    return DEFAULT_OUTPUT_ROOT / "-".join(part for part in parts if part)


def convert(
    model: str | nn.Module,
    target: str,
    precision: str | None = None,
    weights: str | Path = "imagenet",
    image_size: int | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    images: str | Path | None = None,
    output: str | Path | None = None,
    force: bool = False,
    seed: int = 0,
    target_options: dict | None = None,
    ptq_options: dict | None = None,
) -> Conversion:
    """Convert ``model`` (a zoo name, or a model from ``create_model``) for ``target`` and verify it.

    Writes ``<output>/{artifact, manifest.json, parity.json}`` atomically (default output:
    ``default_output``, e.g. ``mf-edge-out/convformer_s18-224px-onnx-fp32``). Parity below the
    precision's thresholds raises ``ParityFailure`` and publishes nothing; a runtime absent here
    records ``not run``.
    """
    chosen = get_target(target)
    if isinstance(model, str):
        # check the request and the output folder before loading (maybe downloading) any weights
        info = get_model_info(model)
        size, _ = trained_defaults(info.name, weights, image_size, None, quiet=True)
        requested = make_spec(info, chosen, precision, size, batch_size, dynamic_batch, target_options)
        check_output(Path(output) if output else default_output(requested, chosen, weights), force)
        float_model = load_model(model, weights, image_size=image_size, seed=seed)
    else:
        if not hasattr(model, "mf_edge_info"):
            raise UserError("convert() needs a model made by mf_edge.create_model (it carries the model's "
                            "metadata); pass the model's name instead.")
        float_model = model.eval()
    target_options = _with_class_names(chosen, float_model, target_options)
    spec = make_spec(float_model, chosen, precision, image_size, batch_size, dynamic_batch, target_options)
    destination = check_output(Path(output) if output else default_output(spec, chosen,
                                                                         float_model.mf_edge_weights), force)
    inputs = parity_inputs(spec, images)
    with staged_output(destination, force) as staging:
        quantized = quantize(float_model, spec, chosen, ptq_options)
        result = export(chosen, quantized.module, spec, staging)
        report = verify(chosen, staging, spec, quantized.references, inputs)
        if parity_lib.failed(report):
            kept = keep_failed_report(destination, report)
            parity_lib.raise_on_failure(report, f"{spec.model} ({chosen.name}, {spec.precision})",
                                        f"nothing was published; the full report is in {kept}")
        manifest = publish(staging, float_model, spec, chosen, result, report, quantized)
    failed_report_path(destination).unlink(missing_ok=True)  # an earlier attempt's, now outdated
    note(parity_lib.summary(report))
    note(f"wrote {destination}")
    return Conversion(destination, manifest, report)


def _with_class_names(target: Target, model: nn.Module, options: dict | None) -> dict | None:
    """A classifier artifact (Core ML ``classifier``) gets a fine-tuned model's class names."""
    classes = ((getattr(model, "mf_edge_weights", None) or {}).get("trained") or {}).get("classes")
    options = options or {}
    if not classes or not options.get("classifier") or "labels" in options:
        return options
    return {**options, "labels": list(classes)}


# ---------------------------------------------------------------- entering the path at a published folder


def load_published(output_dir: str | Path) -> tuple[dict, ExportSpec, Target]:
    """An output folder's manifest, the spec it was made with and its target."""
    manifest = read_manifest(output_dir)
    return manifest, spec_from_manifest(manifest), get_target(manifest["target"])


def rebuild_float_model(manifest: dict) -> nn.Module:
    """The float model an output folder was made from: same name, weights (sha256-checked) or seed."""
    weights, spec = manifest["weights"], spec_from_manifest(manifest)
    source = weights.get("source", "random")
    if source == "random":
        choice: str | Path = "random"
    elif weights.get("path") and Path(weights["path"]).is_file():
        choice = Path(weights["path"])
    elif source == "imagenet":
        choice = "imagenet"
    else:
        raise UserError(f"the checkpoint {weights.get('path')} this artifact was made from is gone; "
                        "restore it or convert again.")
    model = load_model(manifest["model"]["name"], choice, image_size=spec.image_size,
                       seed=weights.get("seed") or 0, num_classes=spec.num_classes)
    if weights.get("sha256") and model.mf_edge_weights["sha256"] != weights["sha256"]:
        raise UserError(f"the weights at {model.mf_edge_weights['path']} differ from the ones this artifact "
                        "was made from (sha256 mismatch); convert again with the current weights.")
    return model


def recheck(output_dir: str | Path, images: str | Path | None = None) -> dict:
    """Re-run parity on a published artifact against the rebuilt references (the folder is not changed)."""
    manifest, spec, target = load_published(output_dir)
    model = rebuild_float_model(manifest)
    references: dict[str, nn.Module] = {"float": model}
    if spec.precision in QUANTIZED_PRECISIONS:
        options = (manifest.get("quantization") or {}).get("options")
        references = quantize(model, spec, target, options).references
    return verify(target, Path(output_dir), spec, references, parity_inputs(spec, images))


Prediction = list[tuple[str, float, float]]


def predict(output_dir: str | Path, images: list[str | Path], top: int = 5) -> list[Prediction]:
    """Top-``top`` ``(class name, probability, logit)`` per image, from the artifact in its own runtime."""
    manifest, spec, target = load_published(output_dir)
    runtime = target.runtime(Path(output_dir), spec)
    batch = preprocess([load_image(path) for path in images], spec.preprocessing)
    logits = parity_lib.runtime_logits(runtime, batch, spec.batch_size, spec.dynamic_batch)
    nonfinite = int((~np.isfinite(logits)).sum())
    if nonfinite:  # the folder was changed after parity passed (or the runtime misbehaves here)
        raise ParityFailure(f"the artifact in {output_dir} computed {nonfinite} NaN/inf logits, so it has no "
                            f"probabilities to give; check it with `mf-edge parity {output_dir}`.")
    labels_file = Path(output_dir) / LABELS
    labels = labels_file.read_text().splitlines() if labels_file.is_file() else None
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = shifted / shifted.sum(1, keepdims=True)
    return [[(label_name(int(i), labels), float(p[i]), float(row[i])) for i in np.argsort(-row)[:top]]
            for row, p in zip(logits, probabilities, strict=True)]
