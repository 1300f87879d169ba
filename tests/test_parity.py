"""Parity metrics, thresholds and reports, and the inputs parity runs on (eval transform, images, noise)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mf_edge import create_model
from mf_edge import parity as parity_lib
from mf_edge.data import eval_transform, find_images, load_image, noise_images, parity_inputs, sample_images
from mf_edge.errors import ParityFailure, UserError
from mf_edge.models.zoo import get_model_info
from mf_edge.spec import ExportSpec

SPEC = ExportSpec.for_model(get_model_info("identityformer_s12"), image_size=64)


class TorchRuntime:
    """A runtime that runs a PyTorch model and checks the batch it is given has the artifact's shape."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, batch_size: int | None = None) -> None:
        self.model, self.batch_size, self.calls = model, batch_size, 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.batch_size is not None:
            assert len(batch) == self.batch_size
        self.calls += 1
        with torch.no_grad():
            return self.model(torch.from_numpy(batch)).numpy()


# ---------------------------------------------------------------- compare


def test_compare_identical_logits() -> None:
    logits = np.random.default_rng(0).normal(size=(4, 10))
    metrics = parity_lib.compare(logits, logits.copy())
    assert metrics["max_abs_error"] == 0 and metrics["mean_abs_error"] == 0
    assert metrics["cosine"] == pytest.approx(1.0) and metrics["top1_agreement"] == 1.0
    assert metrics["top5_overlap"] == 1.0 and metrics["samples"] == 4


def test_compare_numbers_by_hand() -> None:
    reference = np.array([[1.0, 2.0, 3.0, 0.0, -1.0, -2.0], [0.0, -1.0, 5.0, 1.0, 2.0, 3.0]])
    candidate = np.array([[1.0, 2.0, 4.0, 0.0, -1.0, -2.0], [0.0, 6.0, 5.0, 1.0, 2.0, 3.0]])
    metrics = parity_lib.compare(reference, candidate)
    assert metrics["max_abs_error"] == 7.0
    assert metrics["mean_abs_error"] == pytest.approx(8 / 12)
    cos0 = 22 / math.sqrt(19 * 26)
    cos1 = 33 / math.sqrt(40 * 75)
    assert metrics["cosine"] == pytest.approx(min(cos0, cos1))
    assert metrics["cosine_mean"] == pytest.approx((cos0 + cos1) / 2)
    assert metrics["top1_agreement"] == 0.5  # sample 1's argmax moves from class 2 to class 1
    assert metrics["top5_overlap"] == pytest.approx(0.9)  # sample 1 shares 4 of its top 5


def test_compare_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        parity_lib.compare(np.zeros((2, 5)), np.zeros((3, 5)))


def test_failures_name_the_missed_thresholds() -> None:
    metrics = {"cosine": 0.99, "top1_agreement": 1.0}
    missed = parity_lib.failures(metrics, {"cosine": 0.9999, "top1_agreement": 1.0})
    assert missed == ["cosine 0.990000 < 0.9999"]
    assert parity_lib.failures(metrics, {}) == []


def test_thresholds_cover_every_precision() -> None:
    from mf_edge.spec import PRECISIONS

    assert set(parity_lib.THRESHOLDS) == set(PRECISIONS)
    assert parity_lib.THRESHOLDS["fp32"]["float"] == {"cosine": 0.9999, "top1_agreement": 1.0}
    assert "simulated" in parity_lib.THRESHOLDS["int8"] and parity_lib.THRESHOLDS["int8"]["float"] == {}


# ---------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return create_model("identityformer_s12", image_size=64)


@pytest.fixture(scope="module")
def other() -> torch.nn.Module:
    """The same architecture with other random weights: computes something else."""
    return create_model("identityformer_s12", image_size=64, seed=1)


@pytest.fixture(scope="module")
def inputs():
    return parity_inputs(SPEC)


def test_evaluate_passes_the_same_model(model, inputs) -> None:
    reference = parity_lib.reference_logits(model, inputs.batch)
    report = parity_lib.evaluate(TorchRuntime(model), inputs, {"float": reference}, "fp32")
    assert report["status"] == parity_lib.PASS and report["reason"] is None
    metrics = report["references"]["float"]["metrics"]
    assert metrics["cosine"] > 0.99999 and metrics["top1_agreement"] == 1.0 and metrics["samples"] == 8
    assert report["inputs"]["count"] == 8 and report["runtime"] == "torch"
    parity_lib.raise_on_failure(report, "artifact")  # no exception


def test_evaluate_fails_another_model_with_numbers(model, other, inputs) -> None:
    reference = parity_lib.reference_logits(model, inputs.batch)
    report = parity_lib.evaluate(TorchRuntime(other), inputs, {"float": reference}, "fp32")
    assert report["status"] == parity_lib.FAIL
    assert "vs float: cosine" in report["reason"]
    assert report["references"]["float"]["metrics"]["cosine"] < 0.9999
    with pytest.raises(ParityFailure, match="does not match its reference.*cosine") as error:
        parity_lib.raise_on_failure(report, "model.onnx")
    assert error.value.exit_code == 4


def test_report_only_references_do_not_decide(model, other, inputs) -> None:
    logits = {"simulated": parity_lib.reference_logits(model, inputs.batch),
              "float": parity_lib.reference_logits(other, inputs.batch)}
    report = parity_lib.evaluate(TorchRuntime(model), inputs, logits, "int8")
    assert report["status"] == parity_lib.PASS
    assert report["references"]["float"]["enforced"] is False
    assert report["references"]["float"]["metrics"]["cosine"] < 0.9999  # reported, not enforced


def test_static_batch_runs_in_padded_chunks(model, inputs) -> None:
    runtime = TorchRuntime(model, batch_size=3)
    logits = parity_lib.runtime_logits(runtime, inputs.batch, batch_size=3, dynamic_batch=False)
    assert runtime.calls == 3 and logits.shape == (8, 1000)  # 3 + 3 + 2 (padded to 3)
    expected = parity_lib.reference_logits(model, inputs.batch)
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_dynamic_batch_runs_in_chunks_of_the_runtimes_max_batch(model, inputs) -> None:
    runtime = TorchRuntime(model)
    runtime.max_batch = 3  # an ExecuTorch memory plan's upper bound
    logits = parity_lib.runtime_logits(runtime, inputs.batch, batch_size=1, dynamic_batch=True)
    assert runtime.calls == 3 and logits.shape == (8, 1000)  # 3 + 3 + 2, no padding
    np.testing.assert_allclose(logits, parity_lib.reference_logits(model, inputs.batch), atol=1e-4)


def test_not_run_is_never_a_pass(inputs) -> None:
    report = parity_lib.not_run("TensorRT needs an NVIDIA GPU", "fp16", inputs)
    assert report["status"] == "not run" and report["references"] == {}
    assert parity_lib.summary(report) == "parity not run: TensorRT needs an NVIDIA GPU"
    parity_lib.raise_on_failure(report, "model.engine")  # not a failure either


# ---------------------------------------------------------------- inputs


def test_eval_transform_is_resize_crop_normalise() -> None:
    prep = SPEC.preprocessing
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    out = eval_transform(prep)(image)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    resized = image.resize((prep.resize_size * 120 // 90, prep.resize_size), Image.BICUBIC)
    left = int(round((resized.width - 64) / 2))
    top = int(round((resized.height - 64) / 2))
    pixels = np.asarray(resized.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 255
    expected = (pixels - np.array(prep.mean)) / np.array(prep.std)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_default_inputs_are_sample_photos_and_seeded_noise(inputs) -> None:
    assert inputs.batch.shape == (8, 3, 64, 64) and inputs.batch.dtype == np.float32
    assert inputs.names[:2] == ["sklearn:china.jpg", "sklearn:flower.jpg"]
    assert all(name.startswith("noise:0:") for name in inputs.names[2:])
    assert inputs.labels is None
    assert parity_inputs(SPEC).sha256 == inputs.sha256  # deterministic
    assert parity_inputs(SPEC, seed=1).sha256 != inputs.sha256
    assert len(sample_images()) == 2
    noise = np.asarray(noise_images(1, 32, seed=3)[0][1])
    assert noise.dtype == np.uint8 and noise.shape == (32, 32, 3)


def _write_images(root: Path, layout: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{i}.png")


def test_image_folder_inputs_carry_labels(tmp_path: Path) -> None:
    _write_images(tmp_path, {"cat": 2, "dog": 1})
    found = parity_inputs(SPEC, tmp_path)
    assert found.batch.shape == (3, 3, 64, 64)
    assert found.labels == ["cat", "cat", "dog"]
    flat = tmp_path / "flat"
    _write_images(flat, {".": 2})
    assert parity_inputs(SPEC, flat).labels is None


def test_bad_image_inputs_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        find_images(tmp_path / "missing")
    with pytest.raises(UserError, match="no images"):
        find_images(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="cannot read image"):
        load_image(broken)
