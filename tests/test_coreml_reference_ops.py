"""Core ML reference executor, op by op: kernels against PyTorch and the MIL spec's own examples; tiny
saved programs for inputs (image, dynamic batch), classifiers, the fp16 report, unknown ops, bad packages."""

from __future__ import annotations

from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mf_edge.coreml_reference import UnsupportedOpError, load_reference, supported_ops
from mf_edge.coreml_reference.registry import get_kernel
from mf_edge.errors import RuntimeUnavailable, UserError


def run_kernel(op_type: str, **params):
    return get_kernel(op_type, params)(**params)


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- kernels against PyTorch -----------------------------------------------------------------------


@pytest.mark.parametrize(("groups", "stride", "dilation", "pad_type", "kernel"), [
    (1, 1, 1, "valid", 3),
    (1, 4, 1, "custom", 7),
    (2, 2, 1, "custom", 3),
    (8, 1, 1, "same", 7),      # depthwise
    (1, 2, 2, "same", 3),
    (1, 2, 1, "same_lower", 4),
])
def test_conv_matches_torch(groups: int, stride: int, dilation: int, pad_type: str, kernel: int) -> None:
    x, w, b = rand(2, 8, 13, 11), rand(8, 8 // groups, kernel, kernel, seed=1), rand(8, seed=2)
    pad = [2, 1, 3, 0]
    got = run_kernel("conv", x=x, weight=w, bias=b, strides=np.array([stride, stride]), pad_type=pad_type,
                     pad=np.array(pad), dilations=np.array([dilation, dilation]), groups=np.array(groups))
    if pad_type == "custom":
        padded = np.pad(x, [(0, 0), (0, 0), (pad[0], pad[1]), (pad[2], pad[3])])
    elif pad_type == "valid":
        padded = x
    else:  # TF-style "same": total so that out = ceil(in / stride); the odd pixel after ("same") or before
        pads = []
        for size in x.shape[2:]:
            total = max(0, (-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if pad_type == "same" else (large, small))
        padded = np.pad(x, [(0, 0), (0, 0), *pads])
        assert all(-(-s // stride) == o for s, o in zip(x.shape[2:], got.shape[2:], strict=True))
    want = F.conv2d(torch.from_numpy(padded), torch.from_numpy(w), torch.from_numpy(b), stride=stride,
                    dilation=dilation, groups=groups).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("exclude", "ceil_mode", "stride"), [(True, False, 1), (False, False, 2),
                                                              (False, True, 2), (True, True, 2)])
def test_avg_pool_matches_torch(exclude: bool, ceil_mode: bool, stride: int) -> None:
    x = rand(1, 3, 9, 10)
    got = run_kernel("avg_pool", x=x, kernel_sizes=np.array([3, 3]), strides=np.array([stride, stride]),
                     pad_type="custom", pad=np.array([1, 1, 1, 1]),
                     exclude_padding_from_average=np.array(exclude), ceil_mode=np.array(ceil_mode))
    want = F.avg_pool2d(torch.from_numpy(x), 3, stride, 1, ceil_mode=ceil_mode, count_include_pad=not exclude)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


def test_max_pool_matches_torch() -> None:
    x = rand(1, 2, 8, 7)
    got = run_kernel("max_pool", x=x, kernel_sizes=np.array([3, 3]), strides=np.array([2, 2]),
                     pad_type="custom", pad=np.array([1, 1, 1, 1]), ceil_mode=np.array(True))
    np.testing.assert_array_equal(got, F.max_pool2d(torch.from_numpy(x), 3, 2, 1, ceil_mode=True).numpy())


def test_norms_softmax_and_matmuls_match_torch() -> None:
    x = rand(2, 5, 6, 7)
    gamma, beta = rand(5, 6, seed=1), rand(5, 6, seed=2)
    got = run_kernel("layer_norm", x=x, axes=np.array([1, 2]), gamma=gamma, beta=beta,
                     epsilon=np.float32(1e-5))
    moved = torch.from_numpy(x).permute(0, 3, 1, 2)
    want = F.layer_norm(moved, (5, 6), torch.from_numpy(gamma), torch.from_numpy(beta)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run_kernel("softmax", x=x, axis=np.array(1)),
                               torch.softmax(torch.from_numpy(x), 1).numpy(), rtol=1e-5, atol=1e-7)
    a, b = rand(3, 4, 5), rand(3, 6, 5, seed=1)
    np.testing.assert_allclose(run_kernel("matmul", x=a, y=b, transpose_y=np.array(True)),
                               (torch.from_numpy(a) @ torch.from_numpy(b).transpose(1, 2)).numpy(), rtol=1e-5)
    w, bias = rand(9, 5, seed=2), rand(9, seed=3)
    want = F.linear(torch.from_numpy(a), torch.from_numpy(w), torch.from_numpy(bias)).numpy()
    np.testing.assert_allclose(run_kernel("linear", x=a, weight=w, bias=bias), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run_kernel("rsqrt", x=np.float32([4.0]), epsilon=np.float32(0)), [0.5])


def test_tensor_ops_follow_the_spec_examples() -> None:
    in1, in2 = np.array([[1, 2], [3, 4], [5, 6]]), np.array([[7, 8], [9, 10], [11, 12]])
    # concat docstring example (iOS15 tensor_operation.py)
    assert run_kernel("concat", values=[in1, in2], axis=np.array(0), interleave=np.array(True)).tolist() == \
        [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]]
    assert run_kernel("concat", values=[in1, in2], axis=np.array(-1)).shape == (3, 4)
    x = rand(2, 3, 4)
    # squeeze ignores listed axes that are not size 1 (PyTorch behaviour, per the spec)
    assert run_kernel("squeeze", x=x[:, :1], axes=np.array([0, 1])).shape == (2, 4)
    assert run_kernel("reshape", x=x, shape=np.array([0, -1, 2])).shape == (2, 6, 2)
    got = run_kernel("slice_by_index", x=x, begin=np.array([1, 0, 3]), end=np.array([2, 2, 0]),
                     stride=np.array([1, 2, -1]), begin_mask=np.array([False, True, False]),
                     end_mask=np.array([False, False, True]), squeeze_mask=np.array([True, False, False]))
    np.testing.assert_array_equal(got, x[1, 0:2:2, 3::-1])
    parts = run_kernel("split", x=x, axis=np.array(2), split_sizes=np.array([1, 3]))
    assert [p.shape for p in parts] == [(2, 3, 1), (2, 3, 3)]
    np.testing.assert_array_equal(run_kernel("gather", x=x, indices=np.array([2, -1]), axis=np.array(1)),
                                  x[:, [2, 2]])
    assert run_kernel("cast", x=np.float32([-1.7, 2.9]), dtype="int32").tolist() == [-1, 2]


def test_quantization_ops_match_torch() -> None:
    x = rand(4, 3, 5)
    scale = np.float32([0.02, 0.05, 0.01])
    zero = np.int8([0, 3, -2])
    q = run_kernel("quantize", input=x, scale=scale, zero_point=zero, axis=np.array(1), output_dtype="int8")
    want = torch.quantize_per_channel(torch.from_numpy(x), torch.from_numpy(scale.astype(np.float64)),
                                      torch.from_numpy(zero.astype(np.int64)), 1, torch.qint8)
    np.testing.assert_array_equal(q, want.int_repr().numpy())
    got = run_kernel("dequantize", input=q, scale=scale, zero_point=zero, axis=np.array(1))
    np.testing.assert_allclose(got, want.dequantize().numpy(), rtol=1e-6)
    data = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    block_scale = np.float32([[1.0, 2.0], [3.0, 4.0]])  # 2x2 blocks
    got = run_kernel("constexpr_blockwise_shift_scale", data=data, scale=block_scale,
                     offset=np.int8([[0, 1], [0, 1]]))
    def blocks(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, 2, 0), 2, 1)

    want = (data - blocks(np.array([[0, 1], [0, 1]]))) * blocks(block_scale)
    np.testing.assert_array_equal(got, want)


def test_registry_names_unknown_ops_and_parameters() -> None:
    assert {"conv", "linear", "layer_norm", "quantize", "constexpr_affine_dequantize"} <= set(supported_ops())
    with pytest.raises(UnsupportedOpError, match="unsupported op band_part") as info:
        get_kernel("band_part")
    assert info.value.op_type == "band_part" and isinstance(info.value, RuntimeUnavailable)
    with pytest.raises(UnsupportedOpError, match="parameter frobnicate"):
        get_kernel("relu", ["x", "frobnicate"])


@pytest.mark.parametrize(("data_type", "nbits", "dtype"), [
    ("INT4", 4, np.int8), ("UINT4", 4, np.uint8), ("UINT1", 1, np.uint8), ("UINT2", 2, np.uint8),
    ("UINT3", 3, np.uint8), ("UINT6", 6, np.uint8),
])
def test_packed_sub_byte_immediates_unpack_as_coremltools_packs(data_type: str, nbits: int, dtype) -> None:
    """Sub-byte immediates (4-bit ``constexpr_blockwise_shift_scale`` data) decode to the values
    coremltools packed, sign included (a lost int4 sign or a wrong bit order fails)."""
    from coremltools.optimize._utils import pack_elements_into_bits

    from mf_edge.coreml_reference.values import DataType, unpack_bits

    low, high = (-(1 << (nbits - 1)), 1 << (nbits - 1)) if dtype == np.int8 else (0, 1 << nbits)
    values = np.random.default_rng(nbits).integers(low, high, 37).astype(dtype)
    packed = pack_elements_into_bits(values, nbits).tobytes()
    np.testing.assert_array_equal(unpack_bits(packed, getattr(DataType, data_type), values.size), values)


def test_every_claimed_op_takes_every_parameter_of_its_spec() -> None:
    """Each claimed op's kernel accepts every parameter of every opset version coremltools defines for it
    (iOS15-18), so no claimed op refuses a valid program's parameter (as iOS17 ``reduce_argmax``'s
    ``output_dtype`` once was); every claimed op is a real MIL op."""
    from coremltools.converters.mil.mil import Builder  # noqa: F401  (importing registers the ops)
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    refused = {}
    for op_type in supported_ops():
        assert op_type in SSAOpRegistry.core_ops, f"{op_type} is no MIL op"
        for opset, op_class in SSAOpRegistry.core_ops[op_type].items():
            params = set(op_class.input_spec.input_types)
            try:
                get_kernel(op_type, params)
            except UnsupportedOpError as exc:
                refused[f"{op_type} ({opset})"] = exc.detail
    assert not refused


# -- small saved programs ---------------------------------------------------------------------------


def save(mlmodel, path: Path) -> Path:
    mlmodel.save(str(path))
    return path


def convert_module(module: nn.Module, example: torch.Tensor, path: Path, inputs, precision: str = "fp32",
                   **kwargs) -> Path:
    exported = torch.export.export(module.eval(), (example,), **kwargs.pop("export", {}))
    compute = ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32
    mlmodel = ct.convert(exported.run_decompositions({}), convert_to="mlprogram", inputs=inputs,
                         compute_precision=compute, **kwargs)
    return save(mlmodel, path)


TENSOR_INPUT = [ct.TensorType(name="x", shape=(1, 3, 8, 8))]


class Tiny(nn.Module):
    """Conv -> global mean -> linear, enough to see channels, scale and batch."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x * self.scale)).mean((2, 3)))


def test_unknown_op_in_a_saved_program_raises(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def program(x):
        return mb.band_part(x=mb.relu(x=x), lower=0, upper=0)

    path = save(ct.convert(program, convert_to="mlprogram"), tmp_path / "band_part.mlpackage")
    with pytest.raises(UnsupportedOpError, match="band_part") as info:
        load_reference(path)
    assert info.value.op_type == "band_part"


def test_image_input_channel_order_and_shapes(tmp_path: Path) -> None:
    example = torch.rand(1, 3, 8, 8)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    model = Tiny()
    with torch.no_grad():
        want = model(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).numpy()
    for layout in ("RGB", "BGR"):
        # a BGR model is fed RGB here; the executor reorders, so the BGR package gets swapped channels
        image = ct.ImageType(name="image", shape=example.shape, scale=1 / 255,
                             color_layout=getattr(ct.colorlayout, layout))
        reference = load_reference(convert_module(model, example, tmp_path / f"{layout}.mlpackage", [image]))
        got = reference.run({"image": pixels})[reference.output_names[0]]
        if layout == "RGB":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            single = reference.run({"image": pixels[1]})[reference.output_names[0]]
            np.testing.assert_allclose(single, want[1:], rtol=1e-5, atol=1e-6)
        else:
            with torch.no_grad():
                swapped = model(torch.from_numpy(pixels[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255)
            np.testing.assert_allclose(got, swapped.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="uint8"):
        reference.run({"image": pixels.astype(np.float32)})
    with pytest.raises(UserError, match="8x8"):
        reference.run({"image": pixels[:, :4]})
    with pytest.raises(UserError, match="missing"):
        reference.run({"pixels": pixels})


def test_dynamic_batch_runs_whole_batch(tmp_path: Path) -> None:
    example = torch.randn(2, 3, 8, 8)
    batch = torch.export.Dim("batch", min=2, max=8)
    path = convert_module(Tiny(), example, tmp_path / "dyn.mlpackage",
                          [ct.TensorType(name="x", shape=ct.Shape((ct.RangeDim(1, 8), 3, 8, 8)))],
                          export={"dynamic_shapes": {"x": {0: batch}}})
    reference = load_reference(path)
    assert reference.program.inputs[0].shape[0] is None
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        want = Tiny()(x).numpy()
    got = reference.run({"x": x.numpy()})[reference.output_names[0]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_classifier_outputs_label_and_scores(tmp_path: Path) -> None:
    example = torch.randn(1, 3, 8, 8)
    labels = ["cat", "dog", "eel", "fox", "gnu"]
    path = convert_module(Tiny(), example, tmp_path / "cls.mlpackage", TENSOR_INPUT,
                          classifier_config=ct.ClassifierConfig(labels))
    reference = load_reference(path)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        want = Tiny()(x).numpy()
    outputs = reference.run({"x": x.numpy()})
    assert set(outputs) == {"classLabel", "classLabel_probs"}
    np.testing.assert_allclose(outputs["classLabel_probs"], want, rtol=1e-5, atol=1e-6)
    assert list(outputs["classLabel"]) == [labels[i] for i in want.argmax(1)]


def test_fp16_report_finds_overflow_and_underflow(tmp_path: Path) -> None:
    example = torch.randn(1, 3, 8, 8)
    inputs = [ct.TensorType(name="x", shape=example.shape)]
    loud = load_reference(convert_module(Tiny(3e4), example, tmp_path / "loud.mlpackage", inputs, "fp16"))
    loud.run({"x": example.numpy()})
    overflow = [f for f in loud.report if f.kind == "overflow"]
    # x * 3e4 leaves fp16's range at the scaling mul; the inf it makes then spreads without new findings
    assert [(f.op_type, f.kind) for f in loud.report] == [("mul", "overflow")], str(loud.report)
    assert overflow[0].peak > 65504 and 0 < overflow[0].count < overflow[0].total
    assert "overflow fp16 to inf" in str(overflow[0])
    loud_fp32 = load_reference(convert_module(Tiny(3e4), example, tmp_path / "loud32.mlpackage", inputs))
    loud_fp32.run({"x": example.numpy()})
    assert len(loud_fp32.report) == 0

    quiet = load_reference(convert_module(Tiny(1e-6), example, tmp_path / "quiet.mlpackage", inputs, "fp16"))
    quiet.run({"x": example.numpy()})
    under = [f for f in quiet.report if f.kind == "underflow"]
    assert under and under[0].count >= 0.5 * under[0].total, str(quiet.report)
    report, first = quiet.report, under[0].to_dict()
    quiet.run({"x": example.numpy()})  # findings accumulate over runs in the same report object
    again = [f for f in quiet.report if f.kind == "underflow"][0]
    assert quiet.report is report and (again.count, again.total) == (2 * first["count"], 2 * first["total"])
    report.clear()
    assert len(quiet.report) == 0

    fine = load_reference(convert_module(Tiny(), example, tmp_path / "fine.mlpackage", inputs, "fp16"))
    fine.run({"x": example.numpy()})
    assert len(fine.report) == 0, str(fine.report)


def test_missing_or_corrupt_package_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_reference(tmp_path / "absent.mlpackage")
    example = torch.randn(1, 3, 8, 8)
    path = convert_module(Tiny(), example, tmp_path / "tiny.mlpackage", TENSOR_INPUT)
    weights = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt"):
        load_reference(path)
