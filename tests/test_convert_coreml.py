"""Core ML target: every family converts, and the saved package says what it should (input, output,
metadata, deployment target, compute precision); the baked-in normalisation is the eval transform's."""

from __future__ import annotations

import json
import platform
import sys
from collections import Counter
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.proto import MIL_pb2
from torchvision.transforms import v2

from mf_edge import create_model
from mf_edge.cli import main
from mf_edge.converters import get_target
from mf_edge.converters.coreml.target import (
    ImageNormalisation,
    class_labels,
    deployment_target,
    model_metadata,
    package_labels,
    program_operations,
    to_pixels,
)
from mf_edge.errors import RuntimeUnavailable, UserError
from mf_edge.models.zoo import WEIGHTS_LICENSE, get_model_info
from mf_edge.spec import ExportSpec

from small_models import ONE_BLOCK

SIZE = 64
FAMILIES = tuple(ONE_BLOCK)  # identityformer_d1 ... caformer_d1 (tests/small_models.py)


def convert(name: str, out_dir: Path, precision: str = "fp16", size: int = SIZE, **options
            ) -> tuple[Path, ExportSpec]:
    model = create_model(name, image_size=size)
    spec = ExportSpec.for_model(model.mf_edge_info, image_size=size, precision=precision, **options)
    result = get_target("coreml").export(model, spec, out_dir)
    assert result.files == [out_dir / "model.mlpackage"]
    return out_dir / "model.mlpackage", spec


@pytest.fixture(scope="module")
def fp16_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One fp16 package per family, converted at 64 px with random weights (a few seconds each)."""
    return {name: convert(name, tmp_path_factory.mktemp(name))[0] for name in FAMILIES}


@pytest.fixture(scope="module")
def fp32_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mf-edge convert ... --classifier --deployment-target iOS16`` (fp32, 64 px, random weights)."""
    out = tmp_path_factory.mktemp("classifier") / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "identityformer_s12", "--target", "coreml", "--weights", "random", "--image-size",
              str(SIZE), "--precision", "fp32", "--classifier", "--deployment-target", "iOS16",
              "-o", str(out), "--quiet"])
    assert exit_info.value.code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["options"] == {"classifier": True, "minimum_deployment_target": "iOS16"}
    assert manifest["details"]["minimum_deployment_target"] == "iOS16" and manifest["details"]["classifier"]
    return out / "model.mlpackage"


def tensor_dtypes(spec) -> Counter:
    """How many op outputs of each MIL dtype the program's main function has."""
    counts: Counter = Counter()
    for op in program_operations(spec):
        for output in op.outputs:
            if output.type.WhichOneof("type") == "tensorType":
                counts[MIL_pb2.DataType.Name(output.type.tensorType.dataType)] += 1
    return counts


@pytest.mark.parametrize("name", FAMILIES)
def test_fp16_package_has_image_input_logits_and_metadata(fp16_packages: dict[str, Path], name: str) -> None:
    spec = ct.utils.load_spec(str(fp16_packages[name]))
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion == 8  # iOS17 / macOS14, the default deployment target

    (image,) = spec.description.input
    assert image.name == "image"
    assert image.type.WhichOneof("Type") == "imageType"
    assert image.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert (image.type.imageType.width, image.type.imageType.height) == (SIZE, SIZE)
    assert "centre-crop 64x64" in image.shortDescription and "[0.229, 0.224, 0.225]" in image.shortDescription

    (logits,) = spec.description.output
    assert logits.name == "logits"
    assert list(logits.type.multiArrayType.shape) == [1, 1000]
    assert logits.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32

    meta = spec.description.metadata
    assert name in meta.shortDescription and "fp16" in meta.shortDescription
    assert "sail-sg/metaformer" in meta.author
    assert meta.license == "weights: random initialisation (seed 0), no license attached"
    assert meta.versionString == "0.1.0"
    assert meta.userDefined["mf_edge.model"] == name
    assert meta.userDefined["mf_edge.precision"] == "fp16"
    assert '"mean": [0.485, 0.456, 0.406]' in meta.userDefined["mf_edge.preprocessing"]

    dtypes = tensor_dtypes(spec)
    assert dtypes["FLOAT16"] > 100, dtypes  # the network computes in fp16 ...
    assert dtypes["FLOAT32"] <= 3, dtypes  # ... after the image scaling, until the float32 logits


def test_fp32_classifier_with_ios16_target(fp32_classifier: Path) -> None:
    spec = ct.utils.load_spec(str(fp32_classifier))
    assert spec.specificationVersion == 7  # iOS16
    assert [o.name for o in spec.description.output] == ["classLabel", "classLabel_probs"]
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.output[1].type.WhichOneof("Type") == "dictionaryType"
    labels = package_labels(fp32_classifier)
    assert len(labels) == 1000 and labels[:2] == ["tench", "goldfish"]
    dtypes = tensor_dtypes(spec)
    assert dtypes["FLOAT16"] == 0 and dtypes["FLOAT32"] > 100, dtypes


def test_deployment_target_names() -> None:
    assert deployment_target(None).name == "iOS17"
    assert deployment_target("ios16").value == 7
    assert deployment_target("macOS14").value == 8
    for bad in ("iOS14", "android13"):
        with pytest.raises(UserError, match="deployment target"):
            deployment_target(bad)


def test_batched_or_dynamic_spec_is_refused(tmp_path: Path) -> None:
    model = create_model("identityformer_s12", image_size=SIZE)
    for kwargs in ({"batch_size": 2}, {"dynamic_batch": True}):
        spec = ExportSpec.for_model(model.mf_edge_info, image_size=SIZE, precision="fp16", **kwargs)
        with pytest.raises(UserError, match="one image per prediction"):
            get_target("coreml").export(model, spec, tmp_path)
    assert not any(tmp_path.iterdir())


def test_metadata_names_the_weights_license() -> None:
    info = get_model_info("caformer_s18")
    spec = ExportSpec.for_model(info, precision="fp16")
    meta = model_metadata(info, {"source": "imagenet", "sha256": "ab" * 32}, spec)
    assert meta["license"] == f"weights: {WEIGHTS_LICENSE}"
    assert meta["user_defined_metadata"]["mf_edge.weights_sha256"] == "ab" * 32
    assert "resize the shorter side to 224" in meta["input_description"]
    assert "user-supplied" in model_metadata(info, {"source": "path"}, spec)["license"]
    assert "manifest.json" in model_metadata(info, {"source": "unknown"}, spec)["license"]


def test_options_of_another_target_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "identityformer_s12", "--target", "onnx", "--classifier", "--deployment-target",
              "iOS16"])
    assert exit_info.value.code == UserError.exit_code
    assert "--classifier, --deployment-target do not apply to --target onnx" in capsys.readouterr().err


def test_class_labels() -> None:
    assert class_labels(3, ["a", "b", "c"]) == ["a", "b", "c"]
    assert class_labels(4) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="one label per class"):
        class_labels(3, ["a"])


def eval_transform(spec: ExportSpec) -> v2.Compose:
    prep = spec.preprocessing
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(prep.mean, prep.std)])


def test_pixels_round_trip_exactly_and_normalisation_matches_eval_transform() -> None:
    spec = ExportSpec.for_model(get_model_info("poolformerv2_s12"), image_size=SIZE)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, SIZE, SIZE, 3), dtype=np.uint8)
    transform = eval_transform(spec)
    batch = torch.stack([transform(image) for image in pixels])
    np.testing.assert_array_equal(to_pixels(batch.numpy(), spec.preprocessing.mean, spec.preprocessing.std),
                                  pixels)

    model = create_model("poolformerv2_s12", image_size=SIZE)
    wrapped = ImageNormalisation(model, spec.preprocessing.mean, spec.preprocessing.std).eval()
    scaled = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # Core ML's ImageType scale
    with torch.no_grad():
        torch.testing.assert_close(wrapped(scaled), model(batch), rtol=0, atol=1e-5)


def test_non_pixel_batch_is_refused() -> None:
    spec = ExportSpec.for_model(get_model_info("poolformerv2_s12"), image_size=SIZE)
    with pytest.raises(UserError, match="8-bit"):
        to_pixels(spec.example_input().numpy(), spec.preprocessing.mean, spec.preprocessing.std)


def pixel_batch(spec: ExportSpec, count: int = 2, seed: int = 0) -> torch.Tensor:
    """Normalised batch made from random 8-bit RGB pixels, as parity inputs are."""
    shape = (count, spec.image_size, spec.image_size, 3)
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    transform = eval_transform(spec)
    return torch.stack([transform(image) for image in pixels])


@pytest.mark.skipif(platform.system() == "Darwin", reason="on macOS the runtime is Core ML itself")
def test_runtime_without_reference_executor_says_why(fp16_packages: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mf_edge.coreml_reference", None)  # an install without the executor
    spec = ExportSpec.for_model(get_model_info("identityformer_d1"), image_size=SIZE, precision="fp16")
    with pytest.raises(RuntimeUnavailable, match="needs macOS"):
        get_target("coreml").runtime(fp16_packages["identityformer_d1"].parent, spec)


def check_reference_parity(package: Path, spec: ExportSpec) -> None:
    """The reference executor's logits on pixel-made inputs match the float PyTorch model's."""
    runtime = get_target("coreml").runtime(package.parent, spec)
    batch = pixel_batch(spec)
    with torch.no_grad():
        expected = create_model(spec.model, image_size=spec.image_size)(batch).numpy()
    got = runtime.run(batch.numpy())
    assert got.shape == expected.shape == (2, 1000) and got.dtype == np.float32
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 0.02 * scale, (np.abs(got - expected).max(), scale)
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.999, cosine
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("name", ["identityformer_d1", "caformer_d1"])
def test_reference_parity(fp16_packages: dict[str, Path], name: str) -> None:
    check_reference_parity(fp16_packages[name], ExportSpec.for_model(get_model_info(name), image_size=SIZE,
                                                                     precision="fp16"))


def test_classifier_reference_parity(fp32_classifier: Path) -> None:
    spec = ExportSpec.for_model(get_model_info("identityformer_s12"), image_size=SIZE, precision="fp32",
                                classifier=True)
    runtime = get_target("coreml").runtime(fp32_classifier.parent, spec)
    batch = pixel_batch(spec, count=2)
    with torch.no_grad():
        expected = create_model("identityformer_s12", image_size=SIZE)(batch).numpy()
    got = runtime.run(batch.numpy())  # the per-label scores, back in class order
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    outputs = runtime.predict(to_pixels(batch[:1].numpy(), spec.preprocessing.mean, spec.preprocessing.std))
    assert str(np.asarray(outputs["classLabel"]).reshape(-1)[0]) == runtime.labels[int(expected[0].argmax())]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convformer_s18", "caformer_s18"])
def test_full_size_fp16_conversion(tmp_path: Path, name: str) -> None:
    package, spec = convert(name, tmp_path, size=224)
    desc = ct.utils.load_spec(str(package)).description
    assert (desc.input[0].type.imageType.width, desc.input[0].type.imageType.height) == (224, 224)
    assert list(desc.output[0].type.multiArrayType.shape) == [1, 1000]
    check_reference_parity(package, spec)  # the executor is part of mf-edge: never skipped


@pytest.mark.slow
@pytest.mark.parametrize("name", tuple(ONE_BLOCK.values()))
def test_zoo_size_of_each_family_converts(name: str, tmp_path: Path) -> None:
    """The zoo sizes the default run's one-block variants stand for (S12, S18) at 64 px."""
    package, spec = convert(name, tmp_path)
    assert tensor_dtypes(ct.utils.load_spec(str(package)))["FLOAT16"] > 100
    check_reference_parity(package, spec)


def test_missing_package_is_a_user_error(tmp_path: Path) -> None:
    spec = ExportSpec.for_model(get_model_info("identityformer_s12"), image_size=SIZE)
    with pytest.raises(UserError, match="does not exist"):
        get_target("coreml").runtime(tmp_path, spec)
