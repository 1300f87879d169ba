"""Calibration data, observers, schemes, statistics and calibration files (small graphs, generated images)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from mf_edge.calibration import data as calib_data
from mf_edge.calibration.data import load_calibration_set
from mf_edge.calibration.graph import capture, graph_sha256, params_sha256
from mf_edge.calibration.observers import (
    EntropyObserver,
    PercentileObserver,
    kl_threshold_bin,
    observer_class,
)
from mf_edge.calibration.quantize import (
    QuantizeOptions,
    calibrate_graph,
    convert_quantized,
    prepare_and_load,
)
from mf_edge.calibration.schemes import all_schemes, build_quantizer, check_keep_float, scheme_for
from mf_edge.calibration.statistics import collect_statistics, merge_states
from mf_edge.calibration.store import CalibrationRecord, GraphCalibration, load_record
from mf_edge.errors import UserError
from mf_edge.spec import Preprocessing

PREP = Preprocessing(32, 1.0, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
QUANTIZE = torch.ops.quantized_decomposed.quantize_per_tensor.default
DEQUANTIZE_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default


def write_images(folder: Path, count: int, seed: int = 0, size: int = 40) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """An ImageFolder: classes a (6 images), b (3), c (5)."""
    root = tmp_path / "folder"
    for seed, (name, count) in enumerate((("a", 6), ("b", 3), ("c", 5))):
        write_images(root / name, count, seed)
    return root


# ---------------------------------------------------------------- calibration data


def test_image_folder_sample_is_class_balanced_deterministic_and_cached(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calib = load_calibration_set(image_folder, PREP, calib_size=9, cache_dir=cache)
    assert calib.images.shape == (9, 3, 32, 32) and calib.images.dtype == torch.float32
    assert calib.classes == ["a", "b", "c"]
    assert torch.bincount(calib.labels).tolist() == [3, 3, 3]
    assert [f.split("/")[0] for f in calib.files[:3]] == ["a", "b", "c"]
    again = load_calibration_set(image_folder, PREP, calib_size=9, use_cache=False)
    assert again.files == calib.files and again.sha256 == calib.sha256
    assert torch.equal(again.images, calib.images)
    # the second load comes from the cache: decoding images again would fail here
    monkeypatch.setattr(calib_data, "_load_sample", lambda *a, **k: pytest.fail("decoded the images again"))
    cached = load_calibration_set(image_folder, PREP, calib_size=9, cache_dir=cache)
    assert cached.sha256 == calib.sha256 and torch.equal(cached.images, calib.images)
    assert torch.equal(cached.labels, calib.labels)
    monkeypatch.undo()
    other_seed = load_calibration_set(image_folder, PREP, calib_size=9, seed=1, use_cache=False)
    assert other_seed.sha256 != calib.sha256


def test_flat_folder_skips_non_images_and_unreadable_with_a_note(tmp_path, capsys):
    root = tmp_path / "flat"
    write_images(root, 4)
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    calib = load_calibration_set(root, PREP, calib_size=10, use_cache=False)
    assert calib.count == 4 and calib.labels is None and calib.classes is None
    joined = " ".join(calib.notes)
    assert "skipped 1 non-image file(s) and 1 unreadable image(s)" in joined
    assert "4 usable images, fewer than --calib-size 10" in joined


def test_text_file_of_paths(tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    listing = tmp_path / "list.txt"
    listing.write_text("# calibration\n" + "\n".join(f"imgs/{p.name}" for p in paths) + "\n\n")
    calib = load_calibration_set(listing, PREP, calib_size=2, use_cache=False)
    assert calib.count == 2 and all(f.startswith("imgs/") for f in calib.files)
    listing.write_text("imgs/img000.png\nimgs/missing.png\n")
    with pytest.raises(UserError, match=r"list.txt:2: imgs/missing.png does not exist"):
        load_calibration_set(listing, PREP, use_cache=False)


@pytest.mark.parametrize("case", ["missing", "empty", "only_text", "all_unreadable"])
def test_bad_calibration_sources_are_one_line_user_errors(tmp_path, case):
    root = tmp_path / "src"
    if case != "missing":
        root.mkdir()
    if case == "only_text":
        (root / "a.txt").write_text("x")
    if case == "all_unreadable":
        (root / "a.jpg").write_bytes(b"nope")
        (root / "b.png").write_bytes(b"nope")
    expected = {"missing": "does not exist", "empty": "no images", "only_text": "no images",
                "all_unreadable": "none of the 2 image files"}[case]
    with pytest.raises(UserError, match=expected) as info:
        load_calibration_set(root, PREP, calib_size=4, use_cache=False)
    assert "\n" not in str(info.value)


def test_zero_calib_size_is_refused(image_folder):
    with pytest.raises(UserError, match="--calib-size must be at least 1"):
        load_calibration_set(image_folder, PREP, calib_size=0, use_cache=False)


# ---------------------------------------------------------------- observers


def _filled(cls, values: torch.Tensor, **kwargs):
    observer = cls(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric,
                   **kwargs)
    observer(values)
    return observer


def test_percentile_and_entropy_clip_outliers_minmax_does_not():
    noise = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    values = torch.cat([noise, torch.tensor([40.0])])
    minmax_scale = float(_filled(MinMaxObserver, values).calculate_qparams()[0])
    assert minmax_scale == pytest.approx(40.0 / 127.5, rel=1e-6)
    percentile = float(_filled(PercentileObserver, values).calculate_qparams()[0])
    entropy = float(_filled(EntropyObserver, values).calculate_qparams()[0])
    gaussian_9999 = 3.89  # the 99.99% quantile of |N(0, 1)| is about 3.9
    assert 3.0 / 127.5 < percentile < 6.0 / 127.5
    assert 2.0 / 127.5 < entropy < 10.0 / 127.5
    assert percentile * 127.5 == pytest.approx(gaussian_9999, rel=0.2)


def test_kl_threshold_prefers_the_bulk_over_a_far_outlier():
    histogram = np.zeros(2048)
    histogram[:400] = np.exp(-np.arange(400) / 60.0) * 1e5
    histogram[2000] = 1
    chosen = kl_threshold_bin(histogram, 128, 1)
    assert 128 <= chosen < 1000


def test_unknown_observer_is_a_user_error():
    with pytest.raises(UserError, match="unknown observer 'median'; choose one of minmax, ema, percentile"):
        observer_class("median")


def test_merge_states_takes_the_union_range_and_keeps_histogram_mass():
    a = {"min_val": torch.tensor(-1.0), "max_val": torch.tensor(1.0), "histogram": torch.ones(2048)}
    b = {"min_val": torch.tensor(-4.0), "max_val": torch.tensor(0.5), "histogram": torch.full((2048,), 2.0)}
    merged = merge_states([a, b])
    assert float(merged["min_val"]) == -4.0 and float(merged["max_val"]) == 1.0
    assert float(merged["histogram"].sum()) == pytest.approx(2048 * 3)


# ---------------------------------------------------------------- schemes on a small graph


class Tiny(nn.Module):
    """conv -> permute -> (x - mean) -> MLP with a residual add -> attention-like matmuls -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).permute(0, 2, 3, 1)
        x = x - x.mean(-1, keepdim=True)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        tokens = x.flatten(1, 2)
        mixed = (tokens @ tokens.transpose(1, 2)).softmax(-1) @ tokens
        return self.head(mixed.mean(1))


@pytest.fixture(scope="module")
def tiny_graph():
    torch.manual_seed(0)
    model = Tiny().eval()
    images = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, capture(model, 8), images


def _quantized(graph, images, target, precision="int8", observer="minmax", keep_float=()):
    scheme = scheme_for(target, precision)
    stats = {}
    if scheme.calibrated:
        from mf_edge.calibration.data import CalibrationSet

        calib = CalibrationSet(images, [f"{i}" for i in range(len(images))], "x", "test")
        options = QuantizeOptions(target=target, batch_size=8)
        stats = calibrate_graph(graph, [scheme], observer, calib, options)
    prepared = prepare_and_load(copy.deepcopy(graph), scheme, observer, keep_float, stats, 8)
    return convert_quantized(prepared, scheme)


def _nodes(module, target):
    return [n for n in module.graph.nodes if n.op == "call_function" and n.target == target]


def test_every_scheme_builds_a_quantizer():
    for (target, precision), scheme in all_schemes().items():
        assert scheme is scheme_for(target, precision)
        assert build_quantizer(scheme, "mse") is not None
    with pytest.raises(UserError, match="no quantization scheme for onnx fp16"):
        scheme_for("onnx", "fp16")


def test_qdq_scheme_symmetric_activations_per_channel_weights_and_matmul_inputs(tiny_graph):
    model, graph, images = tiny_graph
    converted = _quantized(graph, images, "onnx")
    quantize = _nodes(converted, QUANTIZE)
    assert quantize and all(n.args[2] == 0 for n in quantize)  # zero point 0: symmetric
    assert len(_nodes(converted, DEQUANTIZE_CHANNEL)) == 4  # conv, fc1, fc2, head weights
    matmuls = _nodes(converted, torch.ops.aten.matmul.default)
    assert all(str(arg.target).startswith("quantized_decomposed.dequantize")
               for m in matmuls for arg in m.args)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(converted(images), model(images)).min()
    assert cosine > 0.99


def test_onnx_quantizes_gemm_outputs_tensorrt_the_skip_input_of_the_residual_add(tiny_graph):
    """``x + fc2(...)``: onnxruntime needs fc2's output quantized (DQ -> MatMul -> Q becomes
    QLinearMatMul), TensorRT the skip ``x`` (the add fuses into fc2's epilogue). Neither quantizes the
    logits (the graph's output)."""
    _, graph, images = tiny_graph

    def residual_add_operands(converted) -> tuple[bool, ...]:
        add = next(n for n in _nodes(converted, torch.ops.aten.add.Tensor)
                   if all(hasattr(arg, "target") for arg in n.args[:2]))
        return tuple("dequantize" in str(arg.target) for arg in add.args[:2])

    def logits_dequantized(converted) -> bool:
        output = next(n for n in converted.graph.nodes if n.op == "output")
        return "dequantize" in str(output.args[0][0].target)

    onnx, tensorrt = _quantized(graph, images, "onnx"), _quantized(graph, images, "tensorrt")
    assert residual_add_operands(onnx) == (False, True)  # (skip x, fc2 output)
    assert residual_add_operands(tensorrt) == (True, False)
    assert not logits_dequantized(onnx) and not logits_dequantized(tensorrt)


def biases_off_grid(converted) -> float:
    """The largest distance of a quantized conv/linear bias from the int32 grid ``s_x * s_w``, in steps."""
    import operator

    worst = 0.0
    aten = torch.ops.aten
    gemms = _nodes(converted, aten.conv2d.default) + _nodes(converted, aten.linear.default)
    for node in gemms:
        source, weight, bias = (*node.args[:3], None)[:3]
        if source.target != torch.ops.quantized_decomposed.dequantize_per_tensor.default or bias is None:
            continue
        step = float(source.args[1]) * operator.attrgetter(weight.args[1].target)(converted)
        steps = operator.attrgetter(bias.target)(converted) / step
        worst = max(worst, float((steps - steps.round()).abs().max().detach()))
    return worst


def test_onnx_keeps_attention_scores_float_and_biases_on_the_accumulator_grid(tiny_graph):
    """onnxruntime fuses DQ -> Softmax -> Q into ``QLinearSoftmax`` and stores a fused GEMM's float bias
    as int32 at ``s_x * s_w``; the ONNX scheme keeps the scores' output float and rounds the biases onto
    that grid, so its simulation computes what the runtime does (docs/int8-placement.md). Core ML's
    scheme does neither. Planted: with ``bias_grid=False`` the ONNX biases sit 0.48 steps off; without
    the softmax rule the scores' matmul output is quantized; both asserts failed."""
    _, graph, images = tiny_graph
    onnx, coreml = _quantized(graph, images, "onnx"), _quantized(graph, images, "coreml")
    scores, mixed = _nodes(onnx, torch.ops.aten.matmul.default)
    assert [u.target for u in scores.users] == [torch.ops.aten.softmax.int]  # float scores
    assert [u.target for u in mixed.users] == [QUANTIZE]  # the other matmul's output is quantized
    assert biases_off_grid(onnx) < 1e-3 < 0.1 < biases_off_grid(coreml)


def test_keep_float_leaves_the_matching_layers_in_float(tiny_graph):
    model, graph, images = tiny_graph
    converted = _quantized(graph, images, "onnx", keep_float=("head",))
    assert len(_nodes(converted, DEQUANTIZE_CHANNEL)) == 3
    check_keep_float(("head", "fc*"), model)
    with pytest.raises(UserError, match="--keep-float 'hed.*' matches no layer"):
        check_keep_float(("hed.*",), model)


def test_weight_only_scheme_has_no_activation_quantization(tiny_graph):
    _, graph, images = tiny_graph
    converted = _quantized(graph, images, "onnx", "w8")
    assert not _nodes(converted, QUANTIZE) and len(_nodes(converted, DEQUANTIZE_CHANNEL)) == 4


def test_xnnpack_scheme_does_not_share_qparams_through_a_mean(tiny_graph):
    _, graph, images = tiny_graph
    scheme = scheme_for("executorch", "int8")
    annotated = build_quantizer(scheme, "minmax").annotate(copy.deepcopy(graph))
    by_name = {n.name: n for n in annotated.graph.nodes}
    assert "quantization_annotation" in by_name["permute"].meta
    assert "quantization_annotation" not in by_name["mean"].meta


@pytest.mark.parametrize("observer", ["minmax", "ema"])
def test_loaded_statistics_give_the_same_qparams_as_torchao_calibration(tiny_graph, observer):
    """Statistics collected by the interpreter and loaded into observers == observers run by PT2E."""
    _, graph, images = tiny_graph
    ours = _quantized(graph, images, "coreml", observer=observer)
    scheme = scheme_for("coreml", "int8")
    reference = prepare_pt2e(copy.deepcopy(graph), build_quantizer(scheme, observer))
    with torch.no_grad():
        for start in range(0, len(images), 8):
            reference(images[start:start + 8])
    reference = convert_pt2e(reference)
    qparams = [[(float(n.args[1]), int(n.args[2])) for n in _nodes(m, QUANTIZE)] for m in (ours, reference)]
    assert qparams[0] == qparams[1] and qparams[0]


def test_histogram_statistics_hold_every_value(tiny_graph):
    _, graph, images = tiny_graph
    stats = collect_statistics(graph, ["conv2d", "linear"], images, "mse", batch_size=8)
    assert float(stats["conv2d"]["histogram"].sum()) == 24 * 8 * 8 * 8
    observer = HistogramObserver(dtype=torch.int8, quant_min=-128, quant_max=127)
    observer.load_state_dict(stats["conv2d"], strict=False)
    scale, _ = observer.calculate_qparams()
    assert 0 < float(scale) <= float(stats["conv2d"]["max_val"] - stats["conv2d"]["min_val"]) / 255 + 1e-6


# ---------------------------------------------------------------- calibration files


def test_calibration_file_round_trip_and_refusals(tiny_graph, tmp_path):
    _, graph, _ = tiny_graph
    stats = {"conv2d": {"min_val": torch.tensor(-1.0), "max_val": torch.tensor(2.0)}}
    graphs = [GraphCalibration(["onnx", "coreml"], graph_sha256(graph), params_sha256(graph), stats)]
    record = CalibrationRecord("tiny", 8, 4, {"source": "random", "seed": 0}, "minmax",
                               {"count": 24, "sha256": "abc"}, graphs)
    path = record.save(tmp_path / "calib.safetensors")
    loaded = load_record(path)
    assert loaded.targets == ["onnx", "coreml"] and loaded.observer == "minmax" and loaded.sha256
    got = loaded.stats_for("onnx", graph_sha256(graph), params_sha256(graph))
    assert float(got["conv2d"]["max_val"]) == 2.0
    loaded.check_matches("tiny", 8, 4)
    with pytest.raises(UserError, match=r"made for tiny at 8px, 4 classes, not tiny at 16px"):
        loaded.check_matches("tiny", 16, 4)
    with pytest.raises(UserError, match="other weights"):
        loaded.stats_for("onnx", graph_sha256(graph), "0" * 64)
    with pytest.raises(UserError, match="covers onnx, coreml, not executorch"):
        loaded.stats_for("executorch", "1" * 64, "0" * 64)
    with pytest.raises(UserError, match="does not match the onnx graph"):
        loaded.stats_for("onnx", "1" * 64, "0" * 64)


def test_bad_calibration_files_are_user_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="does not exist"):
        load_record(tmp_path / "none.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="is corrupt"):
        load_record(corrupt)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(UserError, match="is not an mf-edge calibration file"):
        load_record(foreign)


class Depthwise(torch.nn.Module):
    """A depthwise convolution between two pointwise ones (ConvFormer's SepConv, NCHW)."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1, self.pw2 = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 4, 1)
        self.dw = torch.nn.Conv2d(8, 8, 5, padding=2, groups=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(torch.relu(self.dw(self.pw1(x))))


@pytest.mark.parametrize(("target", "depthwise_int8"), [("executorch", False), ("onnx", True)])
def test_executorch_int8_keeps_depthwise_convolutions_float(target, depthwise_int8):
    torch.manual_seed(0)
    model = Depthwise().eval()
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    converted = _quantized(capture(model, 8), images, target)
    weights = [n for n in _nodes(converted, DEQUANTIZE_CHANNEL)]
    assert len(weights) == (3 if depthwise_int8 else 2)  # pw1, pw2 (and dw)
    depthwise = [n for n in _nodes(converted, torch.ops.aten.conv2d.default) if n.args[6:] == (8,)]
    assert len(depthwise) == 1
    assert (depthwise[0].args[1].target == DEQUANTIZE_CHANNEL) == depthwise_int8
    assert scheme_for(target, "int8").describe()["depthwise_conv"] == ("int8" if depthwise_int8 else "float")
