"""TensorRT target: engine plans from build options, the one-line errors where TensorRT or CUDA is
missing, the TensorRT-ready ONNX (checked and run in onnxruntime), and, on an NVIDIA host with
TensorRT, a real engine build and run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from mf_edge import create_model
from mf_edge.cli import main
from mf_edge.converters import get_target
from mf_edge.converters.tensorrt.target import (
    ENGINE_FILE,
    ONNX_FILE,
    OnnxInput,
    build_engine,
    plan_engine,
    read_onnx_input,
    tensorrt_unavailable_reason,
)
from mf_edge.data import parity_inputs
from mf_edge.errors import RuntimeUnavailable, UserError
from mf_edge.parity import compare, reference_logits
from mf_edge.pipeline import Conversion
from mf_edge.spec import ExportSpec

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
MISSING = "tensorrt not installed" if not HAS_TENSORRT else "no CUDA device"
needs_engine_host = pytest.mark.skipif(not (HAS_TENSORRT and HAS_CUDA), reason=MISSING)
lacks_engine_host = pytest.mark.skipif(HAS_TENSORRT and HAS_CUDA,
                                       reason="TensorRT and CUDA are here: the real build runs instead")


def write_pool_onnx(path: Path, batch: int | str = 1, size: int = 32, qdq: bool = False) -> Path:
    """A tiny image classifier graph (global average pool + flatten), optionally with a Q/DQ pair."""
    nodes, pooled_input = [], "image"
    initializers = []
    if qdq:
        initializers = [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05]),
                        helper.make_tensor("zero", TensorProto.INT8, [], [0])]
        nodes += [helper.make_node("QuantizeLinear", ["image", "scale", "zero"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"])]
        pooled_input = "dq"
    nodes += [helper.make_node("GlobalAveragePool", [pooled_input], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["logits"])]
    graph = helper.make_graph(
        nodes, "pool",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_static_fp16_plan(tmp_path: Path) -> None:
    onnx_path = write_pool_onnx(tmp_path / "model.onnx")
    plan = plan_engine(onnx_path, "fp16", workspace_mib=512, timing_cache=tmp_path / "cache.bin")
    assert plan.builder_flags == ("FP16",)
    assert plan.static_shape == (1, 3, 32, 32) and plan.profile is None
    assert plan.workspace_bytes == 512 * 2**20
    assert plan.describe() == {
        "onnx": "model.onnx", "input": "image", "precision": "fp16", "builder_flags": ["FP16"],
        "workspace_mib": 512, "timing_cache": str(tmp_path / "cache.bin"), "input_shape": [1, 3, 32, 32],
        "profile": None,
    }


def test_fp32_plan_leaves_workspace_and_cache_to_tensorrt(tmp_path: Path) -> None:
    plan = plan_engine(write_pool_onnx(tmp_path / "model.onnx", batch=4), "fp32")
    assert plan.builder_flags == () and plan.workspace_bytes is None and plan.timing_cache is None
    assert plan.static_shape == (4, 3, 32, 32)


def test_dynamic_batch_gets_an_optimisation_profile(tmp_path: Path) -> None:
    onnx_path = write_pool_onnx(tmp_path / "model.onnx", batch="batch", size=64)
    assert read_onnx_input(onnx_path).dynamic_batch
    assert plan_engine(onnx_path).profile == ((1, 3, 64, 64), (1, 3, 64, 64), (8, 3, 64, 64))
    plan = plan_engine(onnx_path, max_batch=16, opt_batch=4)
    assert plan.static_shape is None
    assert plan.describe()["profile"] == {"min": [1, 3, 64, 64], "opt": [4, 3, 64, 64],
                                          "max": [16, 3, 64, 64]}


def test_int8_plan_needs_qdq_nodes(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no Q/DQ nodes"):
        plan_engine(write_pool_onnx(tmp_path / "float.onnx"), "int8")
    plan = plan_engine(write_pool_onnx(tmp_path / "qdq.onnx", qdq=True), "int8")
    assert plan.builder_flags == ("INT8", "FP16")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"precision": "int4"}, "unknown engine precision"),
    ({"workspace_mib": 0}, "positive number of MiB"),
    ({"max_batch": 4}, "fixed batch of 1"),
])
def test_bad_build_options_are_user_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        plan_engine(write_pool_onnx(tmp_path / "model.onnx"), **kwargs)


def test_bad_onnx_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        plan_engine(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    with pytest.raises(UserError, match="not a readable ONNX model"):
        plan_engine(corrupt)
    with pytest.raises(UserError, match="is a folder"):
        plan_engine(write_pool_onnx(tmp_path / "model.onnx"), timing_cache=tmp_path)


@lacks_engine_host
def test_build_without_tensorrt_or_cuda_says_why(tmp_path: Path) -> None:
    plan = plan_engine(write_pool_onnx(tmp_path / "model.onnx"))
    expected = "TensorRT is not installed" if not HAS_TENSORRT else "NVIDIA GPU"
    assert expected in (tensorrt_unavailable_reason() or "")
    with pytest.raises(RuntimeUnavailable, match=expected):
        build_engine(plan, tmp_path / ENGINE_FILE)
    assert not (tmp_path / ENGINE_FILE).exists()


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out + captured.err


@lacks_engine_host
def test_engine_commands_without_tensorrt_fail_in_one_line(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    onnx_path = write_pool_onnx(tmp_path / "model.onnx")
    code, output = run_cli(["engine", "build", str(onnx_path), "--workspace", "256"], capsys)
    assert code == RuntimeUnavailable.exit_code
    assert output.strip().startswith("error: ") and len(output.strip().splitlines()) == 1, output
    assert "pip install '.[tensorrt]'" in output and "Traceback" not in output

    fake_engine = tmp_path / ENGINE_FILE
    fake_engine.write_bytes(b"not an engine")
    code, output = run_cli(["engine", "run", str(fake_engine), "--random"], capsys)
    assert code == RuntimeUnavailable.exit_code and "TensorRT" in output
    assert len(output.strip().splitlines()) == 1, output


def test_engine_command_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, output = run_cli(["engine", "build", str(tmp_path / "missing.onnx")], capsys)
    assert code == UserError.exit_code and "does not exist" in output
    onnx_path = write_pool_onnx(tmp_path / "m.onnx")
    code, output = run_cli(["engine", "build", str(onnx_path), "--precision", "int3"], capsys)
    assert code == UserError.exit_code and "unknown engine precision" in output
    engine = tmp_path / ENGINE_FILE
    engine.write_bytes(b"x")
    code, output = run_cli(["engine", "run", str(engine)], capsys)
    assert code == UserError.exit_code and "--random" in output
    code, output = run_cli(["engine", "run", str(tmp_path / "none.engine"), "--random"], capsys)
    assert code == UserError.exit_code and "does not exist" in output
    code, output = run_cli(["engine", "run", str(engine), str(tmp_path / "cat.jpg")], capsys)
    assert code == UserError.exit_code and "cat.jpg does not exist" in output
    code, output = run_cli(["engine", "run", str(engine), "--random", "--model", "caformer_s19"], capsys)
    assert code == UserError.exit_code and "unknown model 'caformer_s19'" in output


@needs_engine_host
def test_real_engine_build_and_run(tmp_path: Path) -> None:
    from mf_edge.converters.tensorrt.target import TensorRTRuntime

    onnx_path = write_pool_onnx(tmp_path / "model.onnx", batch="batch")
    cache = tmp_path / "timing.cache"
    facts = build_engine(plan_engine(onnx_path, "fp32", workspace_mib=256, timing_cache=cache, max_batch=4),
                         tmp_path / ENGINE_FILE)
    assert facts["size_bytes"] > 0 and cache.stat().st_size > 0
    runtime = TensorRTRuntime(tmp_path / ENGINE_FILE)
    batch = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(runtime.run(batch), batch.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Conversion:
    """``mf-edge convert caformer_s18 --target tensorrt --workspace 256`` at 64 px, random weights."""
    out = tmp_path_factory.mktemp("trt") / "caformer_s18-tensorrt-fp16"
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "caformer_s18", "--target", "tensorrt", "--weights", "random", "--image-size", "64",
              "--workspace", "256", "-o", str(out), "--quiet"])
    assert exit_info.value.code == 0
    return Conversion(out, json.loads((out / "manifest.json").read_text()),
                      json.loads((out / "parity.json").read_text()))


def test_convert_writes_a_static_tensorrt_onnx(converted: Conversion) -> None:
    onnx_path = converted.output / ONNX_FILE
    onnx.checker.check_model(str(onnx_path), full_check=True)
    assert read_onnx_input(onnx_path) == OnnxInput("image", (1, 3, 64, 64), quantized=False)
    details = converted.manifest["details"]
    assert details["engine_plan"] == {
        "onnx": "model.onnx", "input": "image", "precision": "fp16", "builder_flags": ["FP16"],
        "workspace_mib": 256, "timing_cache": None, "input_shape": [1, 3, 64, 64], "profile": None,
    }
    assert converted.manifest["precision"] == "fp16" and converted.manifest["spec"]["options"] == {
        "workspace_mib": 256}
    if HAS_TENSORRT and HAS_CUDA:
        assert (converted.output / ENGINE_FILE).is_file() and converted.parity["runtime"] == "tensorrt"
        assert converted.manifest["artifact"] == ENGINE_FILE
    else:
        assert converted.manifest["artifact"] == ONNX_FILE  # no engine here: the ONNX is the artifact
        assert details["engine"] == {"built": False, "reason": tensorrt_unavailable_reason()}
        assert not (converted.output / ENGINE_FILE).exists()
        assert converted.parity["status"] == "not run"
        assert converted.parity["reason"] == tensorrt_unavailable_reason()
        onnx_parity = converted.parity["onnx"]  # the ONNX itself, checked in onnxruntime instead
        assert onnx_parity["status"] == "pass" and onnx_parity["runtime"] == "onnxruntime"
        assert onnx_parity["references"]["float"]["metrics"]["cosine"] > 0.99999
        assert converted.manifest["parity"]["onnx"]["status"] == "pass"


def test_tensorrt_onnx_matches_pytorch_in_onnxruntime(converted: Conversion) -> None:
    spec = ExportSpec.for_model(create_model("caformer_s18", image_size=64).mf_edge_info, image_size=64,
                                precision="fp16")
    inputs = parity_inputs(spec)
    expected = reference_logits(create_model("caformer_s18", image_size=64), inputs.batch)
    runtime = get_target("tensorrt").fallback_runtime(converted.output, spec)
    got = np.concatenate([runtime.run(image[None]) for image in inputs.batch])
    metrics = compare(expected, got)
    assert metrics["cosine"] > 0.99999 and metrics["top1_agreement"] == 1.0, metrics
    assert metrics["max_abs_error"] < 1e-3 * np.abs(expected).max(), metrics


def test_dynamic_batch_export_gets_a_profile(tmp_path: Path) -> None:
    model = create_model("identityformer_s12", image_size=64)
    spec = ExportSpec.for_model(model.mf_edge_info, image_size=64, dynamic_batch=True, precision="fp16",
                                max_batch=4)
    result = get_target("tensorrt").export(model, spec, tmp_path)
    assert result.details["engine_plan"]["profile"] == {"min": [1, 3, 64, 64], "opt": [1, 3, 64, 64],
                                                        "max": [4, 3, 64, 64]}
    batch = spec.example_input(seed=1).expand(3, -1, -1, -1).contiguous().numpy()
    got = get_target("tensorrt").fallback_runtime(tmp_path, spec).run(batch)
    assert compare(reference_logits(model, batch), got)["cosine"] > 0.99999


def test_max_batch_without_dynamic_batch_is_refused_before_export(tmp_path: Path) -> None:
    model = create_model("identityformer_s12", image_size=64)
    spec = ExportSpec.for_model(model.mf_edge_info, image_size=64, precision="fp16", max_batch=4)
    with pytest.raises(UserError, match="add --dynamic-batch"):
        get_target("tensorrt").export(model, spec, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convformer_s18", "caformer_s18"])
def test_full_size_tensorrt_onnx(tmp_path: Path, name: str) -> None:
    model = create_model(name)
    spec = ExportSpec.for_model(model.mf_edge_info, precision="fp16")
    get_target("tensorrt").export(model, spec, tmp_path)
    assert read_onnx_input(tmp_path / ONNX_FILE).shape == (1, 3, 224, 224)
    inputs = parity_inputs(spec, noise=2)
    got = np.concatenate([get_target("tensorrt").fallback_runtime(tmp_path, spec).run(image[None])
                          for image in inputs.batch])
    assert compare(reference_logits(model, inputs.batch), got)["cosine"] > 0.9999
