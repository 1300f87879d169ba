"""``bench`` defaults a user can read: whole runtime names, files that follow the umask, int8 that runs
without calibration images, a chart whose agreement axis ends at 100 %."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from mf_edge.bench import report
from mf_edge.bench.runner import BenchConfig, with_calibration_images
from mf_edge.publish import staged_output

REPORT = {"model": "convformer_s18", "image_size": 224, "threads": 2, "runs": 50, "rounds": 1, "batch": 8,
          "host": {"cpu": "a CPU with a rather long marketing name, 16 cores"},
          "rows": [{"runtime": "pytorch", "target": None, "precision": "fp32", "status": "measured",
                    "latency": {"median_ms": 10.0, "p90_ms": 11.0, "min_ms": 9.0}},
                   {"runtime": "executorch", "target": "executorch", "precision": "int8",
                    "status": "measured", "latency": {"median_ms": 5.0, "p90_ms": 6.0, "min_ms": 4.0},
                    "fidelity": {"cosine": 0.999, "top1_agreement": 0.96}},
                   {"runtime": "onnxruntime", "target": "onnx", "precision": "fp32", "status": "measured",
                    "latency": {"median_ms": 7.0, "p90_ms": 8.0, "min_ms": 6.5},
                    "fidelity": {"cosine": 1.0, "top1_agreement": 1.0}}]}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_runtime_names_are_never_cut() -> None:
    """Regression: at 120 columns the table printed 'execut...' for executorch."""
    table, _ = report.table(REPORT)
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    assert "executorch" in text and "onnxruntime" in text and "execut…" not in text



def test_reference_row_keeps_the_numbers_whole_at_160_columns() -> None:
    """Regression: the reference row's precision "int8 (onnxruntime quantize_static)" widened its column
    until the numbers were cut ("107…") at 160 columns; on the terminal it shows "int8" and its status
    note says what it is (CSV and Markdown keep the full label)."""
    reference = {"runtime": "onnxruntime", "target": "onnx",
                 "precision": "int8 (onnxruntime quantize_static)",
                 "status": "reference", "note": "reference, not an mf-edge format", "size_mb": 107.1,
                 "load_ms": 105.0, "latency": {"median_ms": 17.0, "p90_ms": 17.8, "min_ms": 15.1},
                 "throughput_ips": 64.5, "peak_rss_mb": 600.0, "rss_before_load_mb": 489.0,
                 "fidelity": {"cosine": 0.99100, "top1_agreement": 0.9375}}
    full = {**REPORT, "rows": [*REPORT["rows"], reference]}
    table, notes = report.table(full)
    console = Console(width=160, record=True)
    console.print(table)
    text = console.export_text()
    assert "…" not in text and "0.99100" in text and notes == ["reference, not an mf-edge format"]
    assert "| onnxruntime | int8 (onnxruntime quantize_static) |" in report.markdown(full)

def test_published_folder_and_reports_follow_the_umask(tmp_path: Path, umask_022) -> None:
    """Regression: output folders were 0700 and report files 0600 under umask 022."""
    with staged_output(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    report.write_json(REPORT, tmp_path / "bench.json")
    assert stat.S_IMODE((tmp_path / "bench.json").stat().st_mode) == 0o644


def test_chart_agreement_axis_ends_at_100(tmp_path: Path, monkeypatch) -> None:
    """Regression: the y axis ran to 104 % and point labels overlapped (now a legend)."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report.write_chart(REPORT, tmp_path / "bench.png")
    [ax] = figures[0].axes
    assert ax.get_ylim()[1] == 100.0 and ax.get_ylim()[0] < 96.0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["executorch int8", "onnxruntime fp32"]
    assert not ax.texts  # no annotations beside the points


def test_int8_without_calibration_images_uses_the_parity_images(tmp_path: Path) -> None:
    """Regression: int8 rows 'failed' by default when neither --calib-data nor --images was given."""
    config = BenchConfig(model="identityformer_s12", artifacts=tmp_path)
    spec = SimpleNamespace(image_size=32)
    assert with_calibration_images(config, [("onnx", "fp32")], spec) is config
    chosen = with_calibration_images(config, [("executorch", "int8")], spec)
    assert chosen.calib_data == tmp_path / "parity-images-32px"
    assert len(list(chosen.calib_data.glob("*.png"))) >= 8
    given = BenchConfig(model="identityformer_s12", artifacts=tmp_path, calib_data=tmp_path / "mine")
    assert with_calibration_images(given, [("executorch", "int8")], spec) is given
