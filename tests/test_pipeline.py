"""The conversion pipeline: spec and precision resolution, the quantize step's plumbing, parity that
cannot run, refusals before any work, and Ctrl-C or a wrong artifact leaving nothing published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mf_edge import create_model, pipeline
from mf_edge.converters import get_target
from mf_edge.data import parity_inputs
from mf_edge.errors import ParityFailure, UserError
from mf_edge.manifest import read_manifest, spec_from_manifest

SIZE = 64


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return create_model("identityformer_s12", image_size=SIZE)


@pytest.mark.parametrize(("target", "default"),
                         [("coreml", "fp16"), ("executorch", "fp32"), ("onnx", "fp32"), ("tensorrt", "fp16")])
def test_default_precision_per_target(model, target: str, default: str) -> None:
    spec = pipeline.make_spec(model, get_target(target), image_size=SIZE)
    assert spec.precision == default and spec.input_shape == (1, 3, SIZE, SIZE)
    held = default if target != "tensorrt" or get_target(target).artifact.endswith("engine") else "onnx-fp32"
    expected = Path(f"mf-edge-out/identityformer_s12-{SIZE}px-{target}-{held}")
    assert pipeline.default_output(spec, get_target(target)) == expected


def test_default_output_names_size_and_weights(model) -> None:
    """Regression: a 64 px random conversion's folder blocked converting a trained checkpoint."""
    spec = pipeline.make_spec(model, get_target("onnx"), image_size=SIZE)
    assert pipeline.default_output(spec, get_target("onnx"), "random").name == \
        f"identityformer_s12-{SIZE}px-random-onnx-fp32"
    assert pipeline.default_output(spec, get_target("onnx"), {"source": "path", "path": "/r/best.pt"}).name \
        == f"identityformer_s12-{SIZE}px-best-onnx-fp32"
    assert pipeline.default_output(spec, get_target("onnx"), model.mf_edge_weights).name == \
        f"identityformer_s12-{SIZE}px-random-onnx-fp32"


def test_unsupported_precision_is_a_user_error(model) -> None:
    from mf_edge.converters import TARGET_MODULES
    from mf_edge.spec import PRECISIONS

    target, precision = next((get_target(name), p) for name in TARGET_MODULES for p in PRECISIONS
                             if p not in get_target(name).precisions)  # e.g. TensorRT w8
    with pytest.raises(UserError, match=f"the {target.name} target supports .*, not '{precision}'"):
        pipeline.make_spec(model, target, precision=precision)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target": "tflite"}, "unknown target 'tflite'"),
    ({"image_size": 100}, "not a positive multiple of 32"),
    ({"batch_size": 0}, "batch size must be at least 1"),
    ({"precision": "fp8"}, "supports fp32, fp16, int8, w8, not 'fp8'"),
])
def test_bad_requests_fail_before_any_work(model, tmp_path: Path, kwargs: dict, message: str) -> None:
    request = {"target": "onnx", "output": tmp_path / "out"} | kwargs
    with pytest.raises(UserError, match=message):
        pipeline.convert(model, **request)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_force(model, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists; pass --force"):
        pipeline.convert(model, "onnx", output=tmp_path / "out")


def test_quantize_hands_options_to_ptq_and_keeps_both_references(model, monkeypatch) -> None:
    from mf_edge import calibration

    seen = {}

    class Result:
        def __init__(self, module: torch.nn.Module) -> None:
            self.module, self.simulated, self.details = module, module, {"scheme": "test"}

    def quantize_for_export(module, spec, options):
        seen.update(module=module, spec=spec, options=options)
        return Result(module)

    # raising=True (the default): a renamed quantize_for_export fails here instead of passing
    monkeypatch.setattr(calibration, "quantize_for_export", quantize_for_export)
    target = get_target("executorch")
    spec = pipeline.make_spec(model, target, precision="int8", image_size=SIZE)
    options = {"calib_size": 32, "keep_float": ["head*"], "observer": "minmax"}
    result = pipeline.quantize(model, spec, target, options)
    assert seen["options"] == {"target": "executorch"} | options and seen["spec"] is spec
    assert type(seen["module"]).__name__ == "GlobalPoolMetaFormer"  # the target's rewrite comes first
    assert result.references["float"] is model and result.references["simulated"] is seen["module"]
    assert result.details == {"scheme": "test"}


def test_float_precisions_skip_ptq(model) -> None:
    target = get_target("onnx")
    result = pipeline.quantize(model, pipeline.make_spec(model, target, image_size=SIZE), target)
    assert result.references == {"float": model} and result.details is None
    assert result.module is not model and isinstance(result.rewrites, dict)  # rewritten copy
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-4, rtol=1e-4)


def test_absent_runtime_gives_not_run_never_pass(model, tmp_path: Path) -> None:
    target = get_target("tensorrt")
    try:
        from mf_edge.converters.tensorrt.target import tensorrt_unavailable_reason
    except ImportError:
        pytest.skip("the TensorRT target does not expose tensorrt_unavailable_reason")
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present: the runtime is not absent here")
    spec = pipeline.make_spec(model, target, image_size=SIZE)
    onnx_spec = pipeline.make_spec(model, get_target("onnx"), image_size=SIZE)
    get_target("onnx").export(model, onnx_spec, tmp_path)  # what the TensorRT target ships without a GPU
    report = pipeline.verify(target, tmp_path, spec, {"float": model}, parity_inputs(spec))
    assert report["status"] == "not run" and report["reason"] == tensorrt_unavailable_reason()
    assert report["references"] == {} and report["inputs"]["count"] == 8
    assert report["onnx"]["status"] == "pass"  # its ONNX, checked in onnxruntime instead


def test_ctrl_c_during_export_leaves_nothing(model, tmp_path: Path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        (args[3] / "model.onnx").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(model, "onnx", image_size=SIZE, output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_artifact_of_another_model_fails_parity_and_publishes_nothing(model, tmp_path: Path,
                                                                       monkeypatch) -> None:
    other = create_model("identityformer_s12", image_size=SIZE, seed=1)
    real_export = pipeline.export
    monkeypatch.setattr(pipeline, "export",
                        lambda target, module, spec, out: real_export(target, other, spec, out))
    numbers = r"does not match its reference: vs float: cosine -?0\.\d+ < 0\.9999"
    with pytest.raises(ParityFailure, match=numbers):
        pipeline.convert(model, "onnx", image_size=SIZE, output=tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out.parity-failed.json"]  # the report; nothing published


def test_convert_publishes_manifest_and_parity(model, tmp_path: Path) -> None:
    result = pipeline.convert(model, "onnx", image_size=SIZE, output=tmp_path / "out")
    files = sorted(p.name for p in result.output.iterdir())
    assert files == ["labels.txt", "manifest.json", "model.onnx", "parity.json"]
    manifest = read_manifest(result.output)
    assert manifest == json.loads(json.dumps(result.manifest, default=str))
    assert manifest["model"]["name"] == "identityformer_s12" and manifest["model"]["labels"] == "imagenet-1k"
    weights = {key: manifest["weights"][key] for key in ("source", "path", "sha256", "seed")}
    assert weights == {"source": "random", "path": None, "sha256": None, "seed": 0}
    assert manifest["input"]["shape"] == [1, 3, SIZE, SIZE]
    assert manifest["preprocessing"]["resize_shorter_side"] == SIZE  # crop_pct 1.0
    assert manifest["preprocessing"]["interpolation"] == "bicubic"
    assert manifest["tools"]["torch"] and manifest["tools"]["onnxruntime"]
    assert set(manifest["files"]) == {"labels.txt", "model.onnx", "parity.json"}
    assert manifest["parity"]["status"] == "pass" and manifest["parity"]["references"]["float"]["passed"]
    assert isinstance(manifest["rewrites"], dict) and manifest["quantization"] is None
    assert spec_from_manifest(manifest) == pipeline.make_spec(model, get_target("onnx"), image_size=SIZE)
    parity = json.loads((result.output / "parity.json").read_text())
    assert parity["references"]["float"]["thresholds"] == {"cosine": 0.9999, "top1_agreement": 1.0}
    assert (result.output / "labels.txt").read_text().splitlines()[:2] == ["tench", "goldfish"]

    again = pipeline.recheck(result.output)
    assert again["status"] == "pass"
    assert again["references"]["float"]["metrics"] == parity["references"]["float"]["metrics"]

    (top,) = pipeline.predict(result.output, [_sample_photo(tmp_path)], top=5)
    assert len(top) == 5 and not any(name.startswith("class ") for name, _, _ in top)
    assert [p for _, p, _ in top] == sorted((p for _, p, _ in top), reverse=True)


def _sample_photo(folder: Path) -> Path:
    from mf_edge.data import sample_images

    path = folder / "china.jpg"
    sample_images()[0][1].save(path)
    return path


def test_python_api_is_exported_lazily() -> None:
    import mf_edge

    assert mf_edge.convert is pipeline.convert
    with pytest.raises(AttributeError):
        mf_edge.not_there  # noqa: B018
