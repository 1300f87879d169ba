"""Core ML target: an ML Program ``model.mlpackage`` that takes an RGB image and returns logits.

The input is a Core ML image (``ct.ImageType``, RGB, batch 1, ``image_size`` square). Core ML scales
the 8-bit pixels by 1/255; the graph then subtracts the per-channel mean and divides by the
per-channel std (``ImageNormalisation``), so a caller feeds the centre-cropped image and nothing
else. The output ``logits`` is a float32 ``[1, num_classes]`` array; with ``classifier=True`` the
model is a Core ML classifier instead: ``classLabel`` (the top label) and ``classLabel_probs`` (the
logit of every label; Core ML's name, but the values are logits, not probabilities).

Here (Linux) the package is checked by the Core ML reference executor of ``mf_edge.coreml_reference``;
on macOS ``runtime`` runs Core ML itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import platform
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mf_edge.calibration.schemes import GEMM_OPS, Scheme
from mf_edge.console import is_quiet, step
from mf_edge.converters.base import BenchFacts, ExportResult, Runtime, Target
from mf_edge.converters.program import export_program
from mf_edge.errors import RuntimeUnavailable, UserError
from mf_edge.labels import labels_for
from mf_edge.models.zoo import WEIGHTS_LICENSE, ModelInfo, get_model_info
from mf_edge.spec import ExportSpec

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
LABEL_NAME = "classLabel"
SCORES_NAME = "classLabel_probs"  # coremltools names the classifier's per-label output <label name>_probs
DEFAULT_DEPLOYMENT_TARGET = "iOS17"
MIN_MLPROGRAM_SPEC_VERSION = 6  # iOS15 / macOS12: the first ML Program release


class ImageNormalisation(nn.Module):
    """``model((x - mean) / std)`` for ``x`` in [0, 1]: torchvision's ``Normalize`` baked into the graph."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def deployment_target(name: str | None) -> Any:
    """The ``ct.target`` called ``name`` (``iOS17``, ``macOS14``, case-insensitive); iOS15 at least."""
    import coremltools as ct

    name = name or DEFAULT_DEPLOYMENT_TARGET
    members = {key.lower(): value for key, value in ct.target.__members__.items()
               if value.value >= MIN_MLPROGRAM_SPEC_VERSION}
    try:
        return members[str(name).lower()]
    except KeyError:
        choices = ", ".join(key for key, value in ct.target.__members__.items()
                            if value.value >= MIN_MLPROGRAM_SPEC_VERSION and key.startswith(("iOS", "macOS")))
        raise UserError(f"unknown or too old Core ML deployment target {name!r} (ML Programs need iOS15 / "
                        f"macOS12 or newer); choose one of {choices}.") from None


def class_labels(num_classes: int, labels: list[str] | None = None) -> list[str] | list[int]:
    """Names for the classifier: ``labels`` if given, ImageNet-1k names for 1000 classes, else indices."""
    if labels is not None:
        if len(labels) != num_classes:
            raise UserError(f"{len(labels)} labels given for a {num_classes}-class model; pass one label "
                            "per class.")
        return [str(label) for label in labels]
    names = labels_for(num_classes)
    return list(names) if names is not None else list(range(num_classes))


def preprocessing_note(spec: ExportSpec) -> str:
    """One sentence telling an app developer what to feed the image input."""
    prep = spec.preprocessing
    return (f"RGB image {spec.image_size}x{spec.image_size}: resize the shorter side to {prep.resize_size} "
            f"({prep.interpolation}) and centre-crop {spec.image_size}x{spec.image_size} (Vision: "
            f".centerCrop). The model divides the 8-bit pixels by 255 and normalises with mean "
            f"{list(prep.mean)} and std {list(prep.std)} itself.")


def model_metadata(info: ModelInfo, weights: dict, spec: ExportSpec) -> dict[str, Any]:
    """Core ML metadata fields: description, author, license, version, input/output notes, user metadata."""
    from mf_edge import __version__

    source = weights.get("source", "random")
    if source == "imagenet":
        license_text = f"weights: {WEIGHTS_LICENSE}"
    elif source == "random":
        license_text = f"weights: random initialisation (seed {weights.get('seed')}), no license attached"
    elif source == "path":
        license_text = "weights: user-supplied checkpoint; see its own license"
    else:
        license_text = "weights: not recorded on the exported module; see the output folder's manifest.json"
    prep = spec.preprocessing
    user = {
        "mf_edge.model": info.name,
        "mf_edge.family": info.family,
        "mf_edge.version": __version__,
        "mf_edge.precision": spec.precision,
        "mf_edge.weights": source,
        "mf_edge.weights_sha256": weights.get("sha256") or "",
        "mf_edge.num_classes": str(spec.num_classes),
        "mf_edge.preprocessing": json.dumps({
            "image_size": spec.image_size, "resize_size": prep.resize_size, "crop_pct": prep.crop_pct,
            "interpolation": prep.interpolation, "mean": list(prep.mean), "std": list(prep.std),
            "input": "RGB uint8 pixels; /255, -mean, /std inside the model",
        }),
    }
    return {
        "short_description": (f"{info.name} ({info.family} MetaFormer, Yu et al. 2022) image classifier, "
                              f"{spec.num_classes} classes, {spec.precision}; converted by mf-edge."),
        "author": "MetaFormer: Yu et al., sail-sg/metaformer; converted with mf-edge",
        "license": license_text,
        "version": __version__,
        "input_description": preprocessing_note(spec),
        "output_description": (f"float32 [1, {spec.num_classes}] logits (unnormalised scores; apply softmax "
                               "for probabilities)"),
        "user_defined_metadata": user,
    }


def _apply_metadata(mlmodel: Any, metadata: dict[str, Any], classifier: bool) -> None:
    mlmodel.short_description = metadata["short_description"]
    mlmodel.author = metadata["author"]
    mlmodel.license = metadata["license"]
    mlmodel.version = metadata["version"]
    mlmodel.input_description[INPUT_NAME] = metadata["input_description"]
    if classifier:
        mlmodel.output_description[LABEL_NAME] = "the label with the highest logit"
        mlmodel.output_description[SCORES_NAME] = "logit per label (unnormalised scores, not probabilities)"
    else:
        mlmodel.output_description[OUTPUT_NAME] = metadata["output_description"]
    mlmodel.user_defined_metadata.update(metadata["user_defined_metadata"])


@contextlib.contextmanager
def _converter_output() -> Iterator[None]:
    """Silence coremltools' deprecation warnings, and its progress bars too in quiet mode."""
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore", DeprecationWarning)
        if is_quiet():
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        yield


def _check_batch(spec: ExportSpec) -> None:
    if spec.batch_size != 1 or spec.dynamic_batch:
        raise UserError("a Core ML image input takes one image per prediction; drop --batch-size/"
                        "--dynamic-batch for the coreml target (batch on device: MLModel.predict on a list).")


def to_pixels(batch: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Undo ``(pixel / 255 - mean) / std``: ``[B, 3, H, W]`` float -> ``[B, H, W, 3]`` uint8 RGB.

    Exact for batches made from 8-bit pixels; anything else raises ``UserError``, since a Core ML
    image input cannot carry it.
    """
    mean_a = np.asarray(mean, dtype=np.float64).reshape(1, -1, 1, 1)
    std_a = np.asarray(std, dtype=np.float64).reshape(1, -1, 1, 1)
    pixels = (np.asarray(batch, dtype=np.float64) * std_a + mean_a) * 255.0
    rounded = np.clip(np.rint(pixels), 0, 255)
    worst = float(np.abs(pixels - rounded).max()) if pixels.size else 0.0
    if worst > 0.01:
        raise UserError(f"the Core ML model takes 8-bit RGB images, but this batch is not made of 8-bit "
                        f"pixels (off by {worst:.3g} levels); feed normalised images "
                        "(mf_edge.data.parity_inputs).")
    return rounded.astype(np.uint8).transpose(0, 2, 3, 1)


def scores_from_outputs(outputs: dict[str, Any], labels: list) -> np.ndarray:
    """``[1, num_classes]`` float32 logits from one prediction (``logits`` or a classifier's label scores)."""
    scores = outputs[OUTPUT_NAME] if OUTPUT_NAME in outputs else outputs[SCORES_NAME]
    if isinstance(scores, dict):
        scores = [scores[label] for label in labels]
    return np.asarray(scores, dtype=np.float32).reshape(1, -1)


def program_operations(spec: Any) -> list:
    """The operations of an ML Program's ``main`` function (in its own opset's block)."""
    main = spec.mlProgram.functions["main"]
    return list(main.block_specializations[main.opset].operations)


def package_labels(path: Path) -> list:
    """The class labels of a classifier package (its ``classify`` op); empty for a plain one."""
    import coremltools as ct

    for op in program_operations(ct.utils.load_spec(str(path))):
        if op.type == "classify":
            values = op.inputs["classes"].arguments[0].value.immediateValue.list.values
            tensors = [value.immediateValue.tensor for value in values]
            return [t.strings.values[0] if t.HasField("strings") else int(t.longInts.values[0])
                    for t in tensors]
    return []


class ImageRuntime:
    """Normalised ``[B, 3, H, W]`` batch -> 8-bit pixels -> one Core ML prediction per image -> logits.

    ``predict`` takes one ``[1, H, W, 3]`` uint8 image and returns the model's outputs by name;
    ``source`` is the loaded model, whose ``report`` (if any) this runtime passes on.
    """

    def __init__(self, name: str, predict: Callable[[np.ndarray], dict], path: Path, spec: ExportSpec,
                 source: Any = None) -> None:
        self.name = name
        self.predict = predict
        self.labels = package_labels(path)
        self.mean, self.std = spec.preprocessing.mean, spec.preprocessing.std
        self.source = source

    @property
    def report(self) -> Any:
        """The reference executor's fp16 overflow findings (``None`` for Core ML itself)."""
        return getattr(self.source, "report", None)

    def run(self, batch: np.ndarray) -> np.ndarray:
        images = to_pixels(batch, self.mean, self.std)
        return np.concatenate([scores_from_outputs(self.predict(image[None]), self.labels)
                               for image in images])


def coreml_runtime(path: Path, spec: ExportSpec, compute_units: str = "ALL") -> ImageRuntime:
    """Core ML itself (macOS only): ``MLModel.predict`` on a PIL image."""
    import coremltools as ct
    from PIL import Image

    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[compute_units.upper()])

    def predict(pixels: np.ndarray) -> dict:
        return model.predict({INPUT_NAME: Image.fromarray(pixels[0], mode="RGB")})

    return ImageRuntime("coreml", predict, path, spec, source=model)


def reference_runtime(path: Path, spec: ExportSpec) -> ImageRuntime:
    """The Linux Core ML reference executor (``mf_edge.coreml_reference``) on the saved package.

    An op it does not implement raises its ``UnsupportedOpError`` (a ``RuntimeUnavailable``: parity
    says "not run: unsupported op X").
    """
    from mf_edge.coreml_reference import load_reference

    reference = load_reference(path)

    def predict(pixels: np.ndarray) -> dict:
        return reference.run({INPUT_NAME: pixels})

    return ImageRuntime("coreml-reference", predict, path, spec, source=reference)


def compress_weights(mlmodel) -> tuple[Any, dict]:
    """``w8``: the model with int8 per-channel symmetric weights (``linear_quantize_weights``), and how."""
    from coremltools.optimize.coreml import (
        OpLinearQuantizerConfig,
        OptimizationConfig,
        linear_quantize_weights,
    )

    config = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    with step("int8 weight compression (linear_quantize_weights)"), _converter_output():
        compressed = linear_quantize_weights(mlmodel, OptimizationConfig(global_config=config))
    return compressed, {"method": "coremltools.optimize.coreml.linear_quantize_weights",
                        "mode": "linear_symmetric", "dtype": "int8", "granularity": "per_channel",
                        "weight_threshold": config.weight_threshold}


class CoreMLTarget(Target):
    """``coreml``: ML Program ``.mlpackage``, fp16 compute by default, image input with normalisation."""

    name = "coreml"
    precisions: tuple[str, ...] = ("fp16", "fp32", "int8", "w8")
    default_precision = "fp16"
    artifact = "model.mlpackage"
    next_step = ("next: on a Mac or iPhone, add {output}/model.mlpackage to an Xcode project: "
                 "docs/deploy/ios.md")
    options = ("classifier", "minimum_deployment_target", "labels")
    option_flags = {"minimum_deployment_target": "--deployment-target"}
    # int8: affine Q/DQ on GEMM inputs (quantize/dequantize ops, constexpr int8 weights); w8: weights only,
    # compressed by coremltools after conversion
    schemes = {"int8": Scheme("coreml-w8a8", "qdq", GEMM_OPS, "affine"),
               "w8": Scheme("coreml-weight-only-w8", "qdq", ("conv2d", "linear"), None,
                            applied_by="coremltools")}
    runtime_words = {"coreml-reference": "mf-edge's Core ML reference executor (Core ML itself needs macOS)"}
    bench = BenchFacts(precisions=("fp16",), runtime_name="coreml", runtime_module="coremltools",
                       size_only="not runnable here (size only): Core ML runs on Apple devices; the Linux "
                                 "reference executor checks parity, it is not a speed measurement")

    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> ExportResult:
        import coremltools as ct

        self.check_precision(spec.precision)
        _check_batch(spec)
        info = getattr(model, "mf_edge_info", None) or get_model_info(spec.model)
        weights = getattr(model, "mf_edge_weights", None) or {"source": "unknown"}
        target = deployment_target(spec.options.get("minimum_deployment_target"))
        classifier = bool(spec.options.get("classifier", False))
        wrapped = ImageNormalisation(model, spec.preprocessing.mean, spec.preprocessing.std).eval()
        size = spec.image_size
        with step(f"exporting {spec.model} for Core ML"):
            program = export_program(wrapped, spec).run_decompositions({})
        config = None
        if classifier:
            config = ct.ClassifierConfig(class_labels(spec.num_classes, spec.options.get("labels")),
                                         predicted_feature_name=LABEL_NAME,
                                         predicted_probabilities_output=OUTPUT_NAME)
        # int8 (W8A8 quantize/dequantize from PT2E) and w8 (int8 weights) compute in fp16 like the default
        precision = ct.precision.FLOAT32 if spec.precision == "fp32" else ct.precision.FLOAT16
        with step(f"converting to Core ML ({spec.precision}, {target.name})"), _converter_output():
            mlmodel = ct.convert(
                program,
                inputs=[ct.ImageType(name=INPUT_NAME, shape=(1, 3, size, size), scale=1 / 255.0,
                                     bias=[0.0, 0.0, 0.0], color_layout=ct.colorlayout.RGB)],
                outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
                classifier_config=config,
                convert_to="mlprogram",
                compute_precision=precision,
                minimum_deployment_target=target,
            )
        compression = None
        if spec.precision == "w8":
            mlmodel, compression = compress_weights(mlmodel)
        metadata = model_metadata(info, weights, spec)
        _apply_metadata(mlmodel, metadata, classifier)
        path = Path(out_dir) / self.artifact
        mlmodel.save(str(path))
        details = {
            "format": "mlprogram",
            "minimum_deployment_target": target.name,
            "specification_version": int(mlmodel.get_spec().specificationVersion),
            "compute_precision": "fp32" if spec.precision == "fp32" else "fp16",
            "weight_compression": compression,
            "classifier": classifier,
            "input": {"name": INPUT_NAME, "type": "image", "color_layout": "RGB",
                      "shape": [1, 3, size, size], "scale": "1/255", "normalisation": "in graph"},
            "output": ({"names": [LABEL_NAME, SCORES_NAME], "scores": "logit per label"} if classifier else
                       {"name": OUTPUT_NAME, "dtype": "float32", "shape": [1, spec.num_classes]}),
            "preprocessing": preprocessing_note(spec),
        }
        return ExportResult(files=[path], details=details)

    def runtime(self, out_dir: Path, spec: ExportSpec) -> Runtime:
        path = Path(out_dir) / self.artifact
        if not path.exists():
            raise UserError(f"{path} does not exist; run `mf-edge convert {spec.model} --target coreml` "
                            "first.")
        if platform.system() == "Darwin":
            return coreml_runtime(path, spec)
        try:
            from mf_edge.coreml_reference import load_reference  # noqa: F401
        except ImportError:
            raise RuntimeUnavailable("Core ML runtime needs macOS and the Linux reference executor "
                                     "(mf_edge.coreml_reference) is missing; verify on a Mac.") from None
        return reference_runtime(path, spec)


TARGET = CoreMLTarget()
