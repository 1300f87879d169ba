"""Post-training quantization end to end: real models, CIFAR-10 calibration, real runtimes.

ConvFormer and CAFormer int8 run on weights trained on 1,000 CIFAR-10 images at 32 px (a session fixture,
``trained_weights``): in the default run their one-block-per-stage variants (``small_models``, six
epochs, about 21 s each), under ``-m slow`` the S18 models (four epochs, about 35 s each). An int8
artifact's worst-image cosine to its PyTorch simulation must be >= 0.999. Not bit-exact: a runtime's
float rounding differs from PyTorch's and flips an occasional int8 rounding. On random-init weights those
flips re-draw part of the quantization noise (worst cosine 0.9989-0.9991 at 32-64 px; README,
Quantization). Training gives the logits a signal that dwarfs it: worst 0.9996 or more here (after two
epochs CAFormer's worst image was still 0.9966).
ONNX int8 also requantizes every layer's output inside onnxruntime's fused kernels; its scheme puts
the biases on the int32 grid those kernels round them to and keeps attention scores float
(calibration/schemes.py), which took the trained models from 0.99961 (ConvFormer; 0.99894 in an
earlier run) and 0.99939 (CAFormer) to 0.99978 and 0.99991.
Weight-only ``w8`` keeps random weights.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mf_edge.cli.calibrate  # noqa: F401  (registers the command on the app)
from mf_edge.calibration import quantize as quantize_module
from mf_edge.calibration import quantize_for_export
from mf_edge.cli import app, main
from mf_edge.converters import get_target
from mf_edge.errors import UserError
from mf_edge.models import get_model_info
from mf_edge.pipeline import Conversion, convert, load_model, make_spec, prepare_for_target

from ptq_checks import (
    CALIB,
    SIZE,
    TRAINED_SIZE,
    check_manifest,
    check_quantized_parity,
    fp32_bytes,
    int8_weight_bytes,
)

QUANTIZE = torch.ops.quantized_decomposed.quantize_per_tensor.default
SLOW = pytest.mark.slow


pytestmark = pytest.mark.usefixtures("quiet_with_own_cache")


# CAFormer first: test_ptq_executorch starts with ConvFormer, so the two workers train one model each
# at the start (trained_weights) instead of one waiting for the other's
@pytest.mark.parametrize("name", ["caformer_d1", "convformer_d1", pytest.param("convformer_s18", marks=SLOW),
                                  pytest.param("caformer_s18", marks=SLOW)])
def test_onnx_int8_qdq(name, trained_weights, calib_dir, parity_dir, tmp_path):
    import onnx
    from onnx import numpy_helper

    weights = trained_weights(name)
    result = convert(name, "onnx", "int8", weights=weights, image_size=TRAINED_SIZE, images=parity_dir,
                     output=tmp_path / "out", ptq_options={"calib_data": calib_dir, "calib_size": CALIB})
    check_quantized_parity(result)
    quantization = check_manifest(result, "qdq-w8a8", 1.05 * int8_weight_bytes(name, weights, TRAINED_SIZE))
    assert quantization["observer"] == "mse" and quantization["calibration"]["classes"] == 10
    model = onnx.load(str(result.artifact))
    ops = collections.Counter(node.op_type for node in model.graph.node)
    blocks = sum(get_model_info(name).config.depths)  # each has at least 4 quantized GEMM inputs
    assert ops["QuantizeLinear"] >= 4 * blocks and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    constants = {node.output[0]: numpy_helper.to_array(node.attribute[0].t)
                 for node in model.graph.node if node.op_type == "Constant" and node.attribute[0].type == 4}
    values = {**initializers, **constants}
    zero_points = [values[node.input[2]] for node in model.graph.node
                   if node.op_type == "QuantizeLinear" and node.input[2] in values]
    assert zero_points and all(zp.dtype == np.int8 and not zp.any() for zp in zero_points)  # symmetric
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            feeding = [producers[name].op_type if name in producers else "input" for name in node.input[:2]]
            assert "DequantizeLinear" in feeding or "Transpose" in feeding, (node.name, feeding)
    check_onnxruntime_fuses_every_gemm(result.artifact, tmp_path, blocks)
    assert biases_off_the_accumulator_grid(model) < 0.01


def check_onnxruntime_fuses_every_gemm(artifact: Path, tmp_path: Path, blocks: int) -> None:
    """After onnxruntime's optimizer every quantized GEMM is an int8 kernel (QLinearConv/QLinearMatMul/QGemm).

    Catches a placement onnxruntime cannot fuse: a GEMM without its output Q (DQ -> Conv stays a float
    Conv on dequantized weights; DQ -> MatMul often does too), as the scheme was before ``outputs``.
    """
    from mf_edge.converters.onnx.target import float_gemms_on_int8_weights, optimized_graph

    graph = optimized_graph(artifact, tmp_path / "optimized.onnx").graph
    ops = collections.Counter(node.op_type for node in graph.node)
    assert ops["QLinearConv"] >= 4 and ops["QLinearMatMul"] >= 2 * blocks, dict(ops)  # stem, downs; MLPs
    # attention scores keep a float output: no QLinearSoftmax, whose table exponent rounds away from
    # the simulation (planted: quantizing the scores' output makes 9 on CAFormer, worst cosine 0.99939)
    assert not ops["QLinearSoftmax"], dict(ops)
    # the classifier's GEMM makes the float logits (never quantized), so it may stay float: one [1, C] GEMM
    assert set(float_gemms_on_int8_weights(graph)) <= logits_gemms(graph), dict(ops)


def biases_off_the_accumulator_grid(model) -> float:
    """The largest distance, in accumulator steps ``s_x * s_w``, of a quantized conv/linear's float
    bias from the int32 grid onnxruntime rounds it to (0 when the scheme's ``bias_grid`` did it first).

    Planted: without ``bias_grid`` biases sit up to 0.5 steps off and the trained ConvFormer's worst
    cosine to the simulation drops from 0.99978 to 0.99961 (0.99894 in an earlier run)."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {name: node for node in model.graph.node for name in node.output}

    def scale(name: str):
        node = producers.get(name)
        return values.get(node.input[1]) if node is not None and node.op_type == "DequantizeLinear" else None

    worst, checked = 0.0, 0
    for node in model.graph.node:
        if node.op_type == "Add":  # MatMul -> Add(bias): a linear's bias
            gemm = next((producers.get(i) for i in node.input if i in producers), None)
            bias = next((values[i] for i in node.input if i in values), None)
            if gemm is None or gemm.op_type != "MatMul" or bias is None:
                continue
            weight = producers.get(gemm.input[1])
            weight_scale = scale(weight.input[0]) if weight is not None and weight.op_type == "Transpose" \
                else scale(gemm.input[1])
            inputs = (gemm.input[0], weight_scale, bias)
        elif node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in values:
            inputs = (node.input[0], scale(node.input[1]), values[node.input[2]])
        else:
            continue
        source_scale = scale(inputs[0])
        if source_scale is None or inputs[1] is None:
            continue
        steps = inputs[2].astype(np.float64) / (np.float32(source_scale) * inputs[1].astype(np.float32))
        worst, checked = max(worst, float(np.abs(steps - np.round(steps)).max())), checked + 1
    assert checked >= 4, "no quantized conv/linear bias found"
    return worst


def logits_gemms(graph) -> set[str]:
    """The GEMM nodes whose output reaches a graph output through no other GEMM (the classifier's)."""
    from mf_edge.converters.onnx.target import FLOAT_GEMMS

    producers = {name: node for node in graph.node for name in node.output}
    found, stack, seen = set(), [output.name for output in graph.output], set()
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in FLOAT_GEMMS:
            found.add(node.name)
        elif not node.op_type.startswith("QLinear") and node.op_type != "QGemm":
            stack.extend(node.input)
    return found


def test_tensorrt_int8_is_a_qdq_onnx_checked_in_onnxruntime(trained_weights, calib_dir, parity_dir, tmp_path):
    """Without TensorRT, the Q/DQ ONNX an engine is built from is the artifact; parity runs in onnxruntime."""
    import onnx

    from mf_edge.converters.tensorrt.target import tensorrt_unavailable_reason

    weights = trained_weights("convformer_d1")
    result = convert("convformer_d1", "tensorrt", "int8", weights=weights, image_size=TRAINED_SIZE,
                     images=parity_dir, output=tmp_path / "out",
                     ptq_options={"calib_data": calib_dir, "calib_size": CALIB})
    bound = 1.05 * int8_weight_bytes("convformer_d1", weights, TRAINED_SIZE)
    check_manifest(result, "tensorrt-qdq-w8a8", bound)
    plan = result.manifest["details"]["engine_plan"]
    assert plan["precision"] == "int8" and plan["builder_flags"] == ["INT8", "FP16"]
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT is here: the engine's own parity is tested in test_tensorrt.py")
    assert result.parity["status"] == "not run"
    onnx_parity = result.parity["onnx"]
    assert onnx_parity["runtime"] == "onnxruntime"
    check_quantized_parity(Conversion(result.output, result.manifest, onnx_parity))
    graph = onnx.load(str(result.output / "model.onnx")).graph
    blocks = sum(get_model_info("convformer_d1").config.depths)
    assert collections.Counter(node.op_type for node in graph.node)["QuantizeLinear"] >= 4 * blocks


def _coreml_ops(package: Path) -> collections.Counter:
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    return collections.Counter(op.type for function in spec.mlProgram.functions.values()
                               for block in function.block_specializations.values()
                               for op in block.operations)


def _export(name: str, target: str, precision: str, out: Path, **ptq):
    """quantize + export through the pipeline's own steps (no parity run)."""
    from mf_edge.pipeline import export, quantize

    model = load_model(name, "random", image_size=SIZE)
    chosen = get_target(target)
    spec = make_spec(model, chosen, precision, SIZE)
    quantized = quantize(model, spec, chosen, ptq)
    out.mkdir()
    return quantized, export(chosen, quantized.module, spec, out)


@pytest.mark.parametrize("precision", ["w8", "int8"])
def test_coreml_quantized_packages_hold_quantized_ops(precision, calib_dir, tmp_path):
    ptq = {"calib_data": calib_dir, "calib_size": CALIB} if precision == "int8" else {}
    quantized, result = _export("identityformer_s12", "coreml", precision, tmp_path / "out", **ptq)
    package = result.files[0]
    ops = _coreml_ops(package)
    gemms = ops["linear"] + ops["conv"]
    compressed = ops["constexpr_affine_dequantize"] + ops["constexpr_blockwise_shift_scale"]
    assert gemms >= 25 and compressed >= gemms - 1  # every conv/linear weight is int8 (maybe not the stem)
    size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    assert size <= 0.30 * fp32_bytes("identityformer_s12")
    if precision == "int8":
        assert ops["quantize"] >= gemms - 1 and ops["dequantize"] >= ops["quantize"]
        assert quantized.details["scheme"]["name"] == "coreml-w8a8"
    else:
        assert not ops["quantize"]
        assert result.details["weight_compression"]["dtype"] == "int8"
        assert quantized.details["scheme"]["applied_by"] == "coremltools"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["w8", "int8"])
def test_coreml_quantized_parity_in_the_reference_executor(precision, trained_weights, calib_dir, parity_dir,
                                                           tmp_path):
    ptq = {"calib_data": calib_dir, "calib_size": CALIB} if precision == "int8" else {}
    result = convert("convformer_s18", "coreml", precision, weights=trained_weights("convformer_s18"),
                     image_size=TRAINED_SIZE, images=parity_dir, output=tmp_path / "out", ptq_options=ptq)
    check_quantized_parity(result, precision)


# ---------------------------------------------------------------- calibrate once, export several times

MODEL = "identityformer_s12"


@pytest.fixture(scope="module")
def calibration_file(calib_dir, tmp_path_factory) -> Path:
    """``mf-edge calibrate`` for ONNX and Core ML (one shared graph), minmax observer."""
    out = tmp_path_factory.mktemp("calibration") / "calibration.safetensors"
    result = CliRunner().invoke(app, ["calibrate", MODEL, "--weights", "random", "--image-size", str(SIZE),
                                      "--calib-data", str(calib_dir), "--calib-size", str(CALIB),
                                      "--observer", "minmax", "--target", "onnx", "--target", "coreml",
                                      "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    return out


def _scales(module) -> list[tuple[float, int]]:
    return [(float(n.args[1]), int(n.args[2])) for n in module.graph.nodes if n.target == QUANTIZE]


def _prepared(target: str, seed: int = 0):
    model = load_model(MODEL, "random", image_size=SIZE, seed=seed)
    chosen = get_target(target)
    spec = make_spec(model, chosen, "int8", SIZE)
    return prepare_for_target(model, spec, chosen), spec


def test_calibrate_once_export_twice_reuses_the_file(calibration_file, calib_dir, monkeypatch):
    from mf_edge.calibration.store import load_record

    record = load_record(calibration_file)
    assert record.targets == ["onnx", "coreml"] and len(record.graphs) == 1
    assert record.calibration_set["count"] == CALIB and record.observer == "minmax"
    prepared, spec = _prepared("onnx")
    direct = quantize_for_export(prepared, spec, {"target": "onnx", "calib_data": calib_dir,
                                                  "calib_size": CALIB, "observer": "minmax"})

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran although a calibration file was given")

    monkeypatch.setattr(quantize_module, "collect_statistics", no_calibration)
    monkeypatch.setattr(quantize_module, "load_calibration_set", no_calibration)
    for target in ("onnx", "coreml"):
        prepared, spec = _prepared(target)
        reused = quantize_for_export(prepared, spec, {"target": target, "calibration": calibration_file})
        assert reused.details["calibration"]["sha256"] == direct.details["calibration"]["sha256"]
        assert reused.details["calibration"]["file"]["sha256"] == record.sha256
        if target == "onnx":  # the same scheme: exactly the qparams of calibrating directly
            assert _scales(reused.simulated) == _scales(direct.simulated) and _scales(direct.simulated)
        else:  # Core ML quantizes GEMM inputs only, ONNX their outputs too: a subset of the ranges
            assert 0 < len(_scales(reused.simulated)) <= len(_scales(direct.simulated))


def test_calibration_file_of_another_model_size_target_or_weights_is_refused(calibration_file):
    options = {"target": "onnx", "calibration": calibration_file}
    other = load_model("poolformerv2_s12", "random", image_size=SIZE)
    spec = make_spec(other, get_target("onnx"), "int8", SIZE)
    with pytest.raises(UserError, match=f"was made for {MODEL} at 64px, 1000 classes, not poolformerv2_s12"):
        quantize_for_export(other, spec, options)
    prepared, spec = _prepared("onnx", seed=1)
    with pytest.raises(UserError, match="covers onnx, coreml, not executorch"):
        quantize_for_export(prepared, spec, {"target": "executorch", "calibration": calibration_file})
    with pytest.raises(UserError, match="used the minmax observer, not mse"):
        quantize_for_export(prepared, spec, {**options, "observer": "mse"})
    with pytest.raises(UserError, match="other weights"):
        quantize_for_export(prepared, spec, options)


# ---------------------------------------------------------------- command-line errors


def _main_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err
    return err


def test_cli_calibrate_bad_inputs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["calibrate", "identityformer_s12", "--weights", "random", "--image-size", "64", "--quiet"]
    assert "no images" in _main_error(base + ["--calib-data", str(empty)], capsys)
    assert "does not exist" in _main_error(base + ["--calib-data", str(tmp_path / "nope")], capsys)
    assert "unknown observer 'p99'" in _main_error(base + ["--calib-data", str(empty), "--observer", "p99"],
                                                   capsys)
    assert "no quantization scheme for tflite int8" in _main_error(
        base + ["--calib-data", str(empty), "--target", "tflite"], capsys)


def test_int8_without_calibration_images_says_how_to_give_them(parity_dir, tmp_path):
    with pytest.raises(UserError, match="needs calibration images: pass --calib-data DIR"):
        convert("identityformer_s12", "onnx", "int8", weights="random", image_size=SIZE, images=parity_dir,
                output=tmp_path / "out")
