"""Layer sensitivity: switchable quantization equals PTQ's own, the ranking, and ``--max-drop``."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mf_edge.calibration.sensitivity import (
    QuantizedVariants,
    choose_keep_float,
    drop_of,
    logits,
    smallest_prefix,
    sqnr_db,
)
from mf_edge.cli import main
from mf_edge.converters import get_target
from mf_edge.converters.prepare import prepare_for_target

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calibrated(cifar10_small: Path):
    """convformer_d1 (split depthwise convs, permutes, MLP head; one block per stage) prepared for
    ExecuTorch and calibrated."""
    from mf_edge.calibration.data import load_calibration_set
    from mf_edge.calibration.graph import capture
    from mf_edge.calibration.quantize import QuantizeOptions, calibrate_graph
    from mf_edge.calibration.schemes import scheme_for
    from mf_edge.pipeline import load_model, make_spec

    threads = torch.get_num_threads()  # restored after this module: later tests keep their threads
    torch.set_num_threads(1)
    model = load_model("convformer_d1", "random", image_size=SIZE)
    spec = make_spec(model, get_target("executorch"), "int8", SIZE)
    prepared = prepare_for_target(model, spec, get_target("executorch"))
    # depthwise convolutions quantized too (ExecuTorch's scheme keeps them float): the split parts
    # of one 7x7 convolution must then count as one layer
    scheme = dataclasses.replace(scheme_for("executorch", "int8"), depthwise=True)
    graph = capture(prepared, SIZE)
    images = load_calibration_set(cifar10_small / "val", spec.preprocessing, 24, use_cache=False)
    stats = calibrate_graph(graph, [scheme], "minmax", images, QuantizeOptions(target="executorch"))
    variants = QuantizedVariants(graph, scheme, "minmax", stats, SIZE, prepared)
    yield variants, images.images, scheme, stats
    torch.set_num_threads(threads)


def pt2e(calibrated, keep_float: tuple[str, ...]) -> torch.nn.Module:
    """PTQ's own quantization of the same graph and statistics (what ``quantize_for_export`` builds)."""
    from mf_edge.calibration.quantize import convert_quantized, prepare_and_load

    variants, _, scheme, stats = calibrated
    return convert_quantized(prepare_and_load(copy.deepcopy(variants.graph), scheme, "minmax", keep_float,
                                              stats, SIZE))


def test_switches_compute_what_ptq_computes(calibrated) -> None:
    variants, images, _, _ = calibrated
    x = images[:6]
    float_logits = logits(variants.graph, x)
    assert np.array_equal(logits(variants.keeping_float([]), x), logits(pt2e(calibrated, ()), x))
    kept = (variants.layers[0], variants.layers[7], "stages.0.0.token_mixer.dwconv")
    assert "stages.0.0.token_mixer.dwconv" in variants.layers  # the three split parts are one layer
    assert not [name for name in variants.layers if "norm" in name]  # a norm's mean convolutions are no layer
    np.testing.assert_array_equal(logits(variants.keeping_float(kept), x), logits(pt2e(calibrated, kept), x))
    assert np.array_equal(logits(variants.configure([], others=False), x), float_logits)
    only = variants.layers[3]
    others = tuple(name for name in variants.layers if name != only)
    np.testing.assert_array_equal(logits(variants.only(only), x), logits(pt2e(calibrated, others), x))
    assert not np.array_equal(logits(variants.only(only), x), float_logits)


def test_budget_is_met_with_the_fewest_worst_layers(calibrated) -> None:
    from mf_edge.calibration.sensitivity import layer_sensitivity

    variants, images, _, _ = calibrated
    x = images[12:]
    reference = logits(variants.graph, x)
    ranking = [effect.layer for effect in layer_sensitivity(variants, variants.layers, x, reference)]
    full_drop = drop_of(reference, logits(variants.keeping_float([]), x), "cosine")
    budget = full_drop / 4
    choice = choose_keep_float(variants, ranking, x, budget, metric="cosine", reference=reference)
    assert 0 < len(choice.keep_float) < len(ranking) and choice.drop <= budget
    assert choice.keep_float == ranking[:len(choice.keep_float)]
    measured = drop_of(reference, logits(variants.keeping_float(choice.keep_float), x), "cosine")
    assert measured == pytest.approx(choice.drop) and measured <= budget
    one_fewer = drop_of(reference, logits(variants.keeping_float(choice.keep_float[:-1]), x), "cosine")
    assert one_fewer > budget  # fewest: one layer less misses the budget
    assert choose_keep_float(variants, ranking, x, 1.0, metric="cosine", reference=reference).keep_float == []


def test_smallest_prefix_bisects() -> None:
    calls = []

    def meets(k: int) -> bool:
        calls.append(k)
        return k >= 11

    assert smallest_prefix(meets, 40) == 11 and len(set(calls)) <= 10
    assert smallest_prefix(lambda k: True, 5) == 0
    assert smallest_prefix(lambda k: False, 5) is None


def test_sqnr_and_drop() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # noise is 10% of the signal: 20 dB
    assert drop_of(ref, ref[:, ::-1].copy(), "top1") == 1.0
    assert drop_of(ref, ref * 2, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_sensitivity_command_ranks_layers(cifar10_small: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sensitivity.json"
    with pytest.raises(SystemExit) as done:
        main(["sensitivity", "identityformer_d1", "--calib-data", str(cifar10_small / "val"), "--weights",
              "random", "--image-size", str(SIZE), "--calib-size", "12", "--eval-size", "12", "--observer",
              "minmax", "--max-drop", "0.2", "--threads", "1", "--out", str(out), "--quiet"])
    assert done.value.code in (0, None)
    report = json.loads(out.read_text())
    layers = report["layers"]
    names = [effect["layer"] for effect in layers]
    # every conv and linear of identityformer_d1: stem + 3 downsamplings, 2 MLP linears x 4 blocks, head
    assert len(names) == len(set(names)) == 4 + 2 * 4 + 1
    sqnr = [effect["sqnr_db"] for effect in layers]
    assert sqnr == sorted(sqnr) and all(math.isfinite(value) and value > 0 for value in sqnr)
    assert all(0.9 < effect["cosine"] <= 1.0 + 1e-9 for effect in layers)
    assert report["calibration"]["count"] == 12 and report["evaluation_images"] == 12
    assert report["max_drop"]["drop"] <= 0.2 and report["max_drop"]["keep_float"] == names[
        :len(report["max_drop"]["keep_float"])]
    printed = capsys.readouterr().out
    assert names[0] in printed and "--keep-float" in printed


def test_unknown_layer_pattern_is_a_user_error(cifar10_small: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["sensitivity", "identityformer_d1", "--calib-data", str(cifar10_small / "val"), "--weights",
              "random", "--image-size", str(SIZE), "--calib-size", "4", "--eval-size", "2", "--layers",
              "nope.*", "--out", str(tmp_path / "s.json"), "--quiet"])
    assert done.value.code == 2
    assert "matches" in capsys.readouterr().err


def test_budgeted_convert_meets_its_budget(cifar10_small: Path, tmp_path: Path) -> None:
    """``convert --precision int8 --max-drop``: the worst-ranked layers kept float, drop within budget."""
    from mf_edge.calibration.data import load_calibration_set
    from mf_edge.calibration.sensitivity import BUDGET_EVAL_IMAGES
    from mf_edge.pipeline import convert, load_model

    budget, calib_size = 0.05, 24
    model = load_model("identityformer_d1", "random", image_size=SIZE)
    result = convert(model, "onnx", "int8", image_size=SIZE, images=cifar10_small / "val",
                     output=tmp_path / "out",
                     ptq_options={"calib_data": cifar10_small / "train", "calib_size": calib_size,
                                  "observer": "minmax", "max_drop": budget})
    facts = result.manifest["quantization"]
    choice = facts["max_drop"]
    assert choice["drop"] <= budget and choice["max_drop"] == budget and choice["metric"] == "top1"
    assert choice["keep_float"] == choice["ranking"][:len(choice["keep_float"])] == facts["keep_float"]
    assert choice["trials"][0] == {"kept": 0, "drop": choice["trials"][0]["drop"]}
    assert set(facts["kept_float_layers"]) == set(choice["keep_float"])
    # the artifact itself, in onnxruntime, on the held-out images the drop was measured on
    spec = result.manifest["spec"]
    images = load_calibration_set(cifar10_small / "train", model_spec_prep(model, spec["image_size"]),
                                  calib_size + BUDGET_EVAL_IMAGES, use_cache=False).images[calib_size:]
    runtime = get_target("onnx").runtime(result.output, spec_of(result))
    float_top1 = logits(model, images).argmax(1)
    artifact = np.concatenate([runtime.run(images[i:i + 1].numpy()) for i in range(len(images))])
    artifact_top1 = artifact.argmax(1)
    assert 1 - (float_top1 == artifact_top1).mean() <= budget + 2 / len(images)  # runtime rounding: +2 images


def model_spec_prep(model, image_size: int):
    from mf_edge.spec import ExportSpec

    return ExportSpec.for_model(model.mf_edge_info, image_size=image_size).preprocessing


def spec_of(result):
    from mf_edge.manifest import spec_from_manifest

    return spec_from_manifest(result.manifest)
