"""``mf-edge bench``: a complete report from real runtimes, side by side, on a small model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mf_edge.bench.images import balanced, bench_images
from mf_edge.bench.measure import latency_stats, peak_rss_mb, reset_peak_rss, rss_mb
from mf_edge.bench.report import markdown
from mf_edge.bench.runner import BenchConfig, plan, reusable
from mf_edge.cli import main
from mf_edge.converters.onnx.reference import REFERENCE_PRECISION
from mf_edge.errors import UserError

SIZE, IMAGES, BATCH, RUNS = 32, 8, 2, 4
MODEL = "identityformer_d1"  # one block per stage (small_models): the cheapest graph to convert
MEASURED = {("pytorch", "fp32"), ("executorch", "fp32"), ("onnxruntime", "fp32")}
TIMING_FIELDS = ("load_ms", "latency", "throughput_ips", "throughput_batch", "peak_rss_mb",
                 "peak_rss_batch_mb", "rss_before_load_mb", "threads", "fidelity", "accuracy", "size_mb")


def run_bench(tmp: Path, images: Path, targets: str, precisions: str | None,
              size: int = SIZE) -> tuple[dict, Path]:
    """``mf-edge bench`` of a 10-class ``MODEL`` (a saved checkpoint: CIFAR labels give accuracy)."""
    from mf_edge import create_model

    checkpoint = tmp / f"{MODEL}-cifar10-random.pth"
    torch.save(create_model(MODEL, num_classes=10).state_dict(), checkpoint)
    out = tmp / "report.json"
    with pytest.raises(SystemExit) as done:
        main(["bench", MODEL, "--weights", str(checkpoint), "--image-size", str(size),
              "--images", str(images), "--num-images", str(IMAGES), "--runs", str(RUNS), "--warmup", "1",
              "--threads", "1", "--batch", str(BATCH), "--artifacts", str(tmp / "artifacts"),
              "--targets", targets, *(["--precisions", precisions] if precisions else []), "--out", str(out),
              "--quiet"])
    assert done.value.code in (0, None)
    return json.loads(out.read_text()), out


@pytest.fixture(scope="module")
def bench_run(cifar10_small: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """The float formats (quick to convert); int8 and Core ML are in the slow test below."""
    tmp = tmp_path_factory.mktemp("bench")
    report, out = run_bench(tmp, cifar10_small / "val", "executorch,onnx,tensorrt", "fp32")
    return report, out, tmp / "artifacts"


def rows_by_format(report: dict) -> dict[tuple[str, str], dict]:
    return {(row["runtime"], row["precision"]): row for row in report["rows"]}


def test_report_has_every_field_for_every_runtime(bench_run) -> None:
    report, _, _ = bench_run
    rows = rows_by_format(report)
    assert set(rows) == MEASURED | {("tensorrt", "fp32")}
    for key in MEASURED:
        row = rows[key]
        assert row["status"] == "measured", (key, row.get("note"))
        missing = [name for name in TIMING_FIELDS if row.get(name) is None]
        assert not missing, (key, missing)
        latency = row["latency"]
        assert 0 < latency["min_ms"] <= latency["median_ms"] <= latency["p90_ms"] and latency["runs"] == RUNS
        assert row["throughput_batch"] == BATCH and row["throughput_ips"] > 0 and row["load_ms"] > 0
        assert row["peak_rss_batch_mb"] >= row["peak_rss_mb"] > row["rss_before_load_mb"] > 0
        assert row["size_mb"] > 1 and row["fidelity"]["samples"] == IMAGES
        assert 0 <= row["accuracy"] <= 1
    assert report["images"]["count"] == IMAGES and report["images"]["labelled"]
    assert report["host"]["cores"] >= 1 and report["tools"]["executorch"] and report["threads"] == 1


def test_threads_are_set_the_same_everywhere(bench_run) -> None:
    rows = rows_by_format(bench_run[0])
    assert rows[("pytorch", "fp32")]["threads"] == {"torch": 1}
    assert rows[("executorch", "fp32")]["threads"] == {"torch": 1, "executorch_threadpool": 1}
    assert rows[("onnxruntime", "fp32")]["threads"] == {"torch": 1, "onnxruntime": 1}


def test_fidelity_against_the_float_model(bench_run) -> None:
    rows = rows_by_format(bench_run[0])
    reference = rows[("pytorch", "fp32")]
    assert reference["fidelity"]["max_abs_error"] == 0.0
    for key in (("executorch", "fp32"), ("onnxruntime", "fp32")):
        assert rows[key]["fidelity"]["cosine"] > 0.99999 and rows[key]["fidelity"]["top1_agreement"] == 1.0
        assert rows[key]["accuracy"] == reference["accuracy"]
    assert "delegation" in rows[("executorch", "fp32")]["details"]


@pytest.mark.slow
def test_every_default_format(cifar10_small: Path, tmp_path: Path) -> None:
    """The default targets and precisions: int8/w8 through PTQ, Core ML listed by size."""
    report, _ = run_bench(tmp_path, cifar10_small / "val", "executorch,onnx,coreml,tensorrt", None, size=64)
    rows = rows_by_format(report)
    assert rows[("coreml", "fp16")]["status"] == "size only" and rows[("coreml", "fp16")]["size_mb"] > 1
    for key in (("executorch", "int8"), ("executorch", "w8"), ("onnxruntime", "int8")):
        row = rows[key]
        assert row["status"] == "measured", (key, row.get("note"))
        assert 0.9 < row["fidelity"]["cosine"] < 0.999999 and row["fidelity"]["max_abs_error"] > 0
    assert rows[("executorch", "int8")]["size_mb"] < rows[("executorch", "fp32")]["size_mb"] / 3


def test_onnx_int8_has_the_onnxruntime_quantize_static_row(cifar10_small: Path, tmp_path: Path) -> None:
    """Catches the reference row going missing, being built from another model than mf-edge's fp32 ONNX
    (it must exist although only int8 was asked for) or being reported as an mf-edge format."""
    import onnx

    report, out = run_bench(tmp_path, cifar10_small / "val", "onnx:int8", None)
    rows = rows_by_format(report)
    reference = rows[("onnxruntime", REFERENCE_PRECISION)]
    assert reference["status"] == "reference" and reference["target"] == "onnx", reference.get("note")
    assert "not an mf-edge format" in reference["note"]
    assert reference["latency"]["runs"] == RUNS and reference["threads"] == {"torch": 1, "onnxruntime": 1}
    assert 0.9 < reference["fidelity"]["cosine"] < 0.999999 and reference["fidelity"]["samples"] == IMAGES
    fp32_onnx = tmp_path / "artifacts" / f"{MODEL}-{SIZE}-onnx-fp32" / "model.onnx"
    assert fp32_onnx.is_file() and reference["size_mb"] < fp32_onnx.stat().st_size / 1e6 / 2
    ops = {node.op_type for node in onnx.load(reference["artifact"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert rows[("onnxruntime", "int8")]["status"] == "measured"
    assert "| onnxruntime | int8 (onnxruntime quantize_static) |" in markdown(report)


def test_unrunnable_target_is_listed_with_its_reason(bench_run) -> None:
    row = rows_by_format(bench_run[0])[("tensorrt", "fp32")]
    assert row["status"] == "not runnable here" and "TensorRT" in row["note"]
    assert "latency" not in row


def test_csv_png_and_markdown(bench_run) -> None:
    report, out, _ = bench_run
    with out.with_suffix(".csv").open() as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == len(report["rows"]) and {"latency_median_ms", "top1_agreement"} <= set(lines[0])
    assert float(lines[0]["latency_median_ms"]) == pytest.approx(report["rows"][0]["latency"]["median_ms"])
    with Image.open(out.with_suffix(".png")) as chart:
        assert chart.format == "PNG" and chart.width > 300
    table = markdown(report)
    assert table.count("\n| ") == len(report["rows"]) and "not runnable here [1]" in table


def test_published_artifacts_are_reused(bench_run, tmp_path: Path) -> None:
    from mf_edge import create_model

    report, _, artifacts = bench_run
    folder = artifacts / f"{MODEL}-{SIZE}-executorch-fp32"
    model = create_model(MODEL, weights=report["weights"]["path"], image_size=SIZE)
    assert reusable(folder, model, SIZE, "executorch", "fp32", dynamic=True)
    assert not reusable(folder, model, SIZE + 32, "executorch", "fp32", dynamic=True)
    other_weights = create_model(MODEL, image_size=SIZE)
    assert not reusable(folder, other_weights, SIZE, "executorch", "fp32", dynamic=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rewrites"]["split_depthwise"] == 0
    manifest["rewrites"] = {k: v for k, v in manifest["rewrites"].items() if k != "xnnpack_norms"}
    stale = tmp_path / "stale"  # converted by a version without one of today's rewrites
    shutil.copytree(folder, stale)
    (stale / "manifest.json").write_text(json.dumps(manifest))
    assert not reusable(stale, model, SIZE, "executorch", "fp32", dynamic=True)


def test_quantized_artifacts_are_reused_only_with_same_calibration_and_scheme(bench_run, tmp_path) -> None:
    """An int8 folder made from other calibration images, or by an older scheme, is converted again."""
    from mf_edge import create_model
    from mf_edge.calibration.schemes import scheme_for

    report, _, artifacts = bench_run
    model = create_model(MODEL, weights=report["weights"]["path"], image_size=SIZE)
    published = artifacts / f"{MODEL}-{SIZE}-executorch-fp32"
    manifest = json.loads((published / "manifest.json").read_text())
    manifest["spec"]["precision"] = "int8"
    scheme = json.loads(json.dumps(scheme_for("executorch", "int8").describe()))
    manifest["quantization"] = {"scheme": scheme, "options": {"calib_data": str(tmp_path / "calib")}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert reusable(tmp_path, model, SIZE, "executorch", "int8", True, tmp_path / "calib")
    assert not reusable(tmp_path, model, SIZE, "executorch", "int8", True, tmp_path / "other")
    assert not reusable(tmp_path, model, SIZE, "executorch", "int8", True, None)
    manifest["quantization"]["scheme"] = {**scheme, "depthwise_conv": "int8"}  # made before a scheme change
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert not reusable(tmp_path, model, SIZE, "executorch", "int8", True, tmp_path / "calib")


def test_plan_and_config_errors() -> None:
    from mf_edge.converters import get_target

    config = BenchConfig(MODEL, targets=("executorch", "onnx:int8", "tensorrt"),
                         precisions=("w8",))
    expected = [("executorch", "w8"), ("onnx", "int8")]
    if "w8" in get_target("tensorrt").precisions:
        expected.append(("tensorrt", "w8"))
    assert plan(config) == expected
    with pytest.raises(UserError, match="supports"):
        plan(BenchConfig(MODEL, targets=("coreml:int4",)))
    with pytest.raises(UserError, match="unknown target"):
        BenchConfig(MODEL, targets=("tflite",)).check()
    with pytest.raises(UserError, match="--runs"):
        BenchConfig(MODEL, runs=0).check()


def test_balanced_images_and_stats(cifar10_small: Path) -> None:
    found = [(Path(f"{label}/{i}.jpg"), label) for label in "abc" for i in range(3)]
    assert [label for _, label in balanced(found, 5)] == ["a", "b", "c", "a", "b"]
    from mf_edge.models import get_model_info
    from mf_edge.spec import ExportSpec

    spec = ExportSpec.for_model(get_model_info(MODEL), image_size=SIZE)
    images = bench_images(spec, cifar10_small / "val", 20)
    assert images.batch.shape == (20, 3, SIZE, SIZE) and sorted(np.bincount(images.labels)) == [2] * 10
    stats = latency_stats([3.0, 1.0, 2.0, 10.0])
    assert (stats["min_ms"], stats["median_ms"], stats["runs"]) == (1.0, 2.5, 4) and stats["p90_ms"] > 3


def test_peak_memory_follows_an_allocation() -> None:
    reset_peak_rss()
    before = rss_mb()
    block = np.ones(64 * 1024 * 1024, dtype=np.uint8)  # 64 MiB, touched
    assert peak_rss_mb() - before > 50
    del block
