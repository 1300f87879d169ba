"""Checks and constants shared by the PTQ test modules (``test_ptq.py``, ``test_ptq_executorch.py``).

The fixtures they share (``trained_weights``, ``calib_dir``, ``parity_dir``) are in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mf_edge.pipeline import load_model

SIZE = 64
TRAINED_SIZE = 32
CALIB = 32


def link_images(source: Path, out: Path, images: slice, classes: int | None = None) -> Path:
    """An ImageFolder at ``out`` of the sorted ``images`` slice of ``source``'s first ``classes`` classes."""
    for class_dir in sorted(source.iterdir())[:classes]:
        (out / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[images]:
            (out / class_dir.name / image.name).symlink_to(image.resolve())
    return out


def fp32_bytes(name: str, weights: str | Path = "random", image_size: int = SIZE) -> int:
    """The parameter bytes of the fp32 model: the floor of any fp32 artifact's size."""
    return sum(4 * p.numel() for p in load_model(name, weights, image_size=image_size).parameters())


def int8_weight_bytes(name: str, weights: str | Path = "random", image_size: int = SIZE,
                      convolutions: bool = True) -> int:
    """The parameter bytes with every linear weight (and dense convolution's, if ``convolutions``) at one
    byte and the rest fp32: what a program that quantizes those weights must come close to."""
    model = load_model(name, weights, image_size=image_size)
    kinds = (nn.Linear, nn.Conv2d) if convolutions else (nn.Linear,)
    int8 = sum(m.weight.numel() for m in model.modules()
               if isinstance(m, kinds) and getattr(m, "groups", 1) == 1)
    return sum(4 * p.numel() for p in model.parameters()) - 3 * int8


def check_quantized_parity(conversion, precision: str = "int8", min_cosine: float = 0.999) -> None:
    """The pipeline's thresholds passed, and every image's cosine to the simulation is >= ``min_cosine``."""
    references = conversion.parity["references"]
    assert conversion.parity["status"] == "pass"
    simulated, float_ = references["simulated"]["metrics"], references["float"]["metrics"]
    assert simulated["cosine"] >= min_cosine, simulated
    assert simulated["top1_agreement"] >= 0.75
    if precision == "int8":  # the gap to float is quantization (w8's is below float noise)
        assert simulated["cosine_mean"] > float_["cosine_mean"]


def check_manifest(conversion, scheme: str, artifact_bytes_limit: float | None) -> dict:
    quantization = conversion.manifest["quantization"]
    assert quantization["scheme"]["name"] == scheme
    if quantization["calibration"] is not None:
        assert quantization["calibration"]["count"] == CALIB
        assert len(quantization["calibration"]["sha256"]) == 64
    if artifact_bytes_limit is not None:
        size = conversion.manifest["files"][conversion.manifest["artifact"]]["bytes"]
        assert size <= artifact_bytes_limit, f"{size} > {artifact_bytes_limit}"
    return quantization
