"""Core ML reference execution of converted MetaFormers.

Every family converted at fp32, fp16, W8 (weight-only int8) and W8A8 (PT2E int8) runs in the reference
executor and agrees with PyTorch (the float model; for W8A8 the PT2E simulation); planted faults in a
saved package (an altered weight, a wrongly baked input scale or channel order, changed quantization
scales) make the same comparison fail. The default run uses each family with one block per stage
(the same op types, a quarter of the conversion time); ``-m slow`` runs the zoo models themselves.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
import torch
from torch import nn

from mf_edge import create_model
from mf_edge.coreml_reference import load_reference
from mf_edge.models.metaformer import MetaFormer
from mf_edge.models.zoo import get_model_info
from mf_edge.parity import compare
from mf_edge.spec import ExportSpec

FAMILIES = ("identityformer_s12", "randformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18")
PRECISIONS = ("fp32", "fp16", "w8", "w8a8")
SIZE = 64
SAMPLES = 2
# precision: (minimum cosine, maximum |error| / max |reference|) of the reference execution vs PyTorch
TOLERANCES = {"fp32": (0.9999, 1e-4), "fp16": (0.999, 2e-2), "w8": (0.99, 0.1), "w8a8": (0.99, 0.2)}
# ops each precision's package must hold (so a test of "w8" really runs compressed weights)
SIGNATURE_OPS = {"fp32": set(), "fp16": {"cast"}, "w8": {"constexpr_affine_dequantize"},
                 "w8a8": {"quantize", "dequantize"}}


def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give norms, biases, StarReLU and layer scales trained-looking values instead of exact 1s and 0s
    (so the programs hold the ``mul``/``add`` ops a real checkpoint produces)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim <= 1:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def family_model(name: str, full: bool = False, size: int = SIZE) -> nn.Module:
    """``name`` itself (``full``) or its family with one block per stage: same mixers, norms and head."""
    if full:
        return perturb(create_model(name, weights="random", image_size=size))
    torch.manual_seed(0)
    config = dataclasses.replace(get_model_info(name).config, depths=(1, 1, 1, 1))
    return perturb(MetaFormer(config, image_size=size))


def example_batch(size: int = SIZE, count: int = SAMPLES, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pt2e_int8(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """W8A8 by PT2E: XNNPACK's symmetric per-channel quantizer, calibrated on ``calibration``.

    Activation ranges come from min/max observers: XNNPACK's default histogram observers would spend
    most of this test's time searching ranges, which the executor check does not need.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True)
    activations = dataclasses.replace(config.input_activation,
                                      observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    config = dataclasses.replace(config, input_activation=activations, output_activation=activations)
    quantizer = XNNPACKQuantizer().set_global(config)
    prepared = prepare_pt2e(torch.export.export(model, (calibration[:1],)).module(), quantizer)
    with torch.no_grad():
        for image in calibration:
            prepared(image[None])
    return convert_pt2e(prepared)


def exported(module: nn.Module, size: int = SIZE) -> torch.export.ExportedProgram:
    return torch.export.export(module, (torch.zeros(1, 3, size, size),)).run_decompositions({})


def to_coreml(program: torch.export.ExportedProgram, compute: str, size: int = SIZE, target=None):
    """The ML Program of ``program`` at ``compute`` precision (``fp32``/``fp16``), tensor input ``x``."""
    precision = ct.precision.FLOAT32 if compute == "fp32" else ct.precision.FLOAT16
    inputs = [ct.TensorType(name="x", shape=(1, 3, size, size))]
    return ct.convert(program, convert_to="mlprogram", inputs=inputs, compute_precision=precision,
                      minimum_deployment_target=target)


def weight_int8(mlmodel, **options):
    """W8: coremltools' weight-only int8 compression (symmetric, per output channel by default)."""
    op_config = ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", **options)
    config = ct.optimize.coreml.OptimizationConfig(global_config=op_config)
    return ct.optimize.coreml.linear_quantize_weights(mlmodel, config)


@dataclasses.dataclass
class Converted:
    """A saved package and the logits it must reproduce on ``batch``."""

    package: Path
    batch: np.ndarray
    expected: np.ndarray
    precision: str


class Family:
    """One family's model and inputs; its packages at each precision, converted on first use.

    fp32 and fp16 share one ``torch.export``; W8 compresses the fp16 program (Core ML's default
    precision); W8A8 is the PT2E-quantized model converted for iOS17 at fp16.
    """

    def __init__(self, name: str, out_dir: Path, full: bool = False, size: int = SIZE) -> None:
        self.name, self.out_dir, self.size = name, out_dir, size
        self.model = family_model(name, full, size)
        self.batch = example_batch(size)
        self.mlmodels: dict[str, object] = {}
        self.cases: dict[str, Converted] = {}
        self._program: torch.export.ExportedProgram | None = None

    def program(self) -> torch.export.ExportedProgram:
        if self._program is None:
            self._program = exported(self.model, self.size)
        return self._program

    def mlmodel(self, precision: str):
        if precision not in self.mlmodels:
            if precision == "w8":
                self.mlmodels[precision] = weight_int8(self.mlmodel("fp16"))
            else:
                self.mlmodels[precision] = to_coreml(self.program(), precision, self.size)
        return self.mlmodels[precision]

    def case(self, precision: str) -> Converted:
        if precision not in self.cases:
            if precision == "w8a8":
                reference = pt2e_int8(self.model, self.batch)
                mlmodel = to_coreml(exported(reference, self.size), "fp16", self.size, ct.target.iOS17)
            else:
                reference, mlmodel = self.model, self.mlmodel(precision)
            with torch.no_grad():  # one image at a time: the PT2E module is exported for batch 1
                expected = torch.cat([reference(image[None]) for image in self.batch]).numpy()
            package = self.out_dir / f"{self.name}-{precision}.mlpackage"
            mlmodel.save(str(package))
            self.cases[precision] = Converted(package, self.batch.numpy(), expected, precision)
        return self.cases[precision]


def reference_logits(package: Path, batch: np.ndarray) -> np.ndarray:
    reference = load_reference(package)
    (output,) = reference.output_names
    return np.asarray(reference.run({reference.input_names[0]: batch})[output], dtype=np.float32)


def agreement(expected: np.ndarray, got: np.ndarray, precision: str) -> tuple[bool, dict]:
    """Whether ``got`` matches ``expected`` within ``precision``'s tolerances, and the metrics."""
    metrics = compare(expected, got)
    metrics["relative_error"] = metrics["max_abs_error"] / float(np.abs(expected).max())
    cosine, relative = TOLERANCES[precision]
    return metrics["cosine"] >= cosine and metrics["relative_error"] <= relative, metrics


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Converted]:
    """``converted(name, precision)``: the family's package at that precision, converted once per module."""
    families: dict[str, Family] = {}
    root = tmp_path_factory.mktemp("coreml-reference")

    def get(name: str, precision: str) -> Converted:
        if name not in families:
            families[name] = Family(name, root)
        return families[name].case(precision)

    return get


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", FAMILIES)
def test_reference_execution_matches_pytorch(converted: Callable, name: str, precision: str) -> None:
    case = converted(name, precision)
    assert SIGNATURE_OPS[precision] <= set(load_reference(case.package).op_types)
    passed, metrics = agreement(case.expected, reference_logits(case.package, case.batch), precision)
    assert passed, metrics
    if precision == "fp32":  # lower precisions may swap near-tied random logits of 2 samples
        assert metrics["top1_agreement"] == 1.0, metrics


def test_blockwise_w8_for_ios18(tmp_path: Path) -> None:
    """iOS18's ``constexpr_blockwise_shift_scale`` with real blocks (32 input channels per scale)."""
    family = Family("identityformer_s12", tmp_path)
    path = tmp_path / "blockwise.mlpackage"
    mlmodel = to_coreml(family.program(), "fp16", target=ct.target.iOS18)
    weight_int8(mlmodel, granularity="per_block", block_size=32).save(str(path))
    assert "constexpr_blockwise_shift_scale" in load_reference(path).op_types
    with torch.no_grad():
        expected = family.model(family.batch).numpy()
    passed, metrics = agreement(expected, reference_logits(path, family.batch.numpy()), "w8")
    assert passed, metrics


# -- planted faults ---------------------------------------------------------------------------------


def main_ops(spec) -> list:
    main = spec.mlProgram.functions["main"]
    return list(main.block_specializations[main.opset].operations)


def edited_copy(package: Path, out: Path, edit: Callable[[object], None]) -> Path:
    """A copy of ``package`` whose spec went through ``edit`` (weights unchanged)."""
    spec = ct.utils.load_spec(str(package))
    edit(spec)
    ct.utils.save_spec(spec, str(out), weights_dir=str(package / "Data" / "com.apple.CoreML" / "weights"))
    return out


def blob_array(package: Path, value) -> tuple[Path, int, np.dtype, int]:
    """Where a blob-stored value's data lies in ``weight.bin``: file, byte offset, dtype, element count."""
    dtypes = {ct.proto.MIL_pb2.FLOAT32: np.float32, ct.proto.MIL_pb2.FLOAT16: np.float16}
    weights = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    with open(weights, "rb") as blob:
        blob.seek(value.blobFileValue.offset)
        sentinel, _, size, data_offset = struct.unpack("<IIQQ", blob.read(24))
    assert sentinel == 0xDEADBEEF
    dtype = np.dtype(dtypes[value.type.tensorType.dataType])
    return weights, data_offset, dtype, size // dtype.itemsize


def scale_blob_value(package: Path, value, factor: float, count: int | None = None) -> None:
    """Multiply (the first ``count`` elements of) a blob-stored tensor by ``factor``, in place."""
    weights, offset, dtype, size = blob_array(package, value)
    data = bytearray(weights.read_bytes())
    array = np.frombuffer(data, dtype=dtype, count=size, offset=offset).copy()
    array[: count or size] *= factor
    data[offset: offset + array.nbytes] = array.tobytes()
    weights.write_bytes(bytes(data))


def const_value(spec, name: str):
    (op,) = [op for op in main_ops(spec) if op.type == "const" and op.outputs[0].name == name]
    return op.attributes["val"]


def test_altered_weight_fails_parity(converted: Callable, tmp_path: Path) -> None:
    """One MLP weight of the first stage, 10 of its values doubled in weight.bin: fp32 parity fails."""
    case = converted("identityformer_s12", "fp32")
    faulty = Path(shutil.copytree(case.package, tmp_path / "faulty.mlpackage"))
    spec = ct.utils.load_spec(str(faulty))
    scale_blob_value(faulty, const_value(spec, "p_stages_0_0_mlp_fc1_weight"), 2.0, count=10)
    assert agreement(case.expected, reference_logits(case.package, case.batch), "fp32")[0]
    passed, metrics = agreement(case.expected, reference_logits(faulty, case.batch), "fp32")
    assert not passed, metrics


def test_wrong_input_scale_or_channel_order_fails_parity(tmp_path: Path) -> None:
    """The Core ML target's image package: right as converted; a /127.5 instead of /255 pixel scale, or
    BGR instead of RGB, baked into the saved package, fails."""
    from mf_edge.converters import get_target
    from mf_edge.converters.coreml.target import to_pixels

    model = family_model("identityformer_s12")
    spec = ExportSpec.for_model(get_model_info("identityformer_s12"), image_size=SIZE, precision="fp32")
    get_target("coreml").export(model, spec, tmp_path)
    package = tmp_path / "model.mlpackage"
    pixels = np.random.default_rng(0).integers(0, 256, (SAMPLES, SIZE, SIZE, 3), dtype=np.uint8)
    prep = spec.preprocessing
    batch = (pixels / 255.0 - np.array(prep.mean)) / np.array(prep.std)
    batch = batch.transpose(0, 3, 1, 2).astype(np.float32)
    np.testing.assert_array_equal(to_pixels(batch, prep.mean, prep.std), pixels)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()

    def logits(path: Path) -> np.ndarray:
        reference = load_reference(path)
        return np.asarray(reference.run({"image": pixels})["logits"], dtype=np.float32)

    assert agreement(expected, logits(package), "fp32")[0]

    def wrong_scale(model_spec) -> None:
        (scale_op,) = [op for op in main_ops(model_spec)
                       if op.type == "mul" and op.inputs["x"].arguments[0].name == "image"]
        value = const_value(model_spec, scale_op.inputs["y"].arguments[0].name)
        assert np.isclose(value.immediateValue.tensor.floats.values[0], 1 / 255)
        value.immediateValue.tensor.floats.values[0] = 1 / 127.5

    def bgr(model_spec) -> None:
        image = model_spec.description.input[0].type.imageType
        image.colorSpace = image.ColorSpace.Value("BGR")

    for edit in (wrong_scale, bgr):
        faulty = edited_copy(package, tmp_path / f"{edit.__name__}.mlpackage", edit)
        passed, metrics = agreement(expected, logits(faulty), "fp32")
        assert not passed, (edit.__name__, metrics)


def test_changed_weight_quantization_scales_fail_parity(converted: Callable, tmp_path: Path) -> None:
    """W8: every int8 weight scale halved in weight.bin (the unsigned range, 255 steps, used for signed
    int8 weights)."""
    case = converted("identityformer_s12", "w8")
    faulty = Path(shutil.copytree(case.package, tmp_path / "faulty.mlpackage"))
    ops = main_ops(ct.utils.load_spec(str(faulty)))
    dequantizes = [op for op in ops if op.type == "constexpr_affine_dequantize"]
    assert len(dequantizes) >= 8
    for op in dequantizes:
        scale_blob_value(faulty, op.attributes["scale"], 0.5)
    passed, metrics = agreement(case.expected, reference_logits(faulty, case.batch), "w8")
    assert not passed, metrics


def test_changed_activation_quantization_scale_fails_parity(converted: Callable, tmp_path: Path) -> None:
    """W8A8: one activation ``quantize`` scale in the program spec, doubled (its ``dequantize`` kept)."""
    case = converted("identityformer_s12", "w8a8")
    spec = ct.utils.load_spec(str(case.package))
    quantizes = [op for op in main_ops(spec) if op.type == "quantize"]
    target = quantizes[len(quantizes) // 2].inputs["scale"].arguments[0].name

    def double_scale(model_spec) -> None:
        tensor = const_value(model_spec, target).immediateValue.tensor
        if tensor.WhichOneof("value") == "bytes":  # an fp16 program stores its fp16 scalars as raw bytes
            tensor.bytes.values = (np.frombuffer(tensor.bytes.values, np.float16) * 2).tobytes()
        else:
            tensor.floats.values[0] *= 2

    faulty = edited_copy(case.package, tmp_path / "faulty.mlpackage", double_scale)
    passed, metrics = agreement(case.expected, reference_logits(faulty, case.batch), "w8a8")
    assert not passed, metrics


# -- full size ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", FAMILIES)
def test_zoo_models_at_every_precision(tmp_path: Path, name: str, precision: str) -> None:
    case = Family(name, tmp_path, full=True).case(precision)
    passed, metrics = agreement(case.expected, reference_logits(case.package, case.batch), precision)
    assert passed, metrics


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convformer_s18", "caformer_s18"])
def test_full_size_fp32_within_1e4_relative(tmp_path: Path, name: str) -> None:
    case = Family(name, tmp_path, full=True, size=224).case("fp32")
    passed, metrics = agreement(case.expected, reference_logits(case.package, case.batch), "fp32")
    assert passed and metrics["relative_error"] <= 1e-4, metrics
