"""Hostile but fair input (issue #12): the parity gate refuses non-finite numbers, no bad input gives a
traceback, and nothing a user owns is lost. Each test goes through the CLI where a user would meet the
case: the exit code, one ``error:`` line, no ``Traceback``, and the files on disk afterwards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mf_edge import parity as parity_lib
from mf_edge.cli import main
from mf_edge.errors import ParityFailure
from mf_edge.manifest import strict_json

MODEL, SIZE = "identityformer_s12", "64"


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the CLI in-process: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def one_error_line(err: str) -> str:
    """The single ``error:`` line of ``err`` (rich may wrap it), asserting there is no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return " ".join(err[err.index("error:"):].split())


def strict_load(path: Path) -> dict:
    """Parse ``path`` as strict JSON: a bare NaN/Infinity token fails."""
    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def checkpoint(tmp_path: Path, name: str, edit) -> Path:
    """A random-weight checkpoint of ``MODEL`` at ``SIZE`` px, with ``edit(state_dict)`` applied."""
    from mf_edge import create_model
    from mf_edge.weights import save_state_dict

    model = create_model(MODEL, weights="random", image_size=int(SIZE))
    with torch.no_grad():
        edit(model.state_dict())
    return save_state_dict(model, tmp_path / f"{name}.safetensors")


# ------------------------------------------------------------------------------------ the parity gate


def test_compare_counts_nonfinite_values_and_leaves_no_metric_a_number() -> None:
    """Regression: NaN norms made cosine 1.0 and ``NaN < threshold`` is never true, so NaN logits passed."""
    reference = np.arange(20, dtype=np.float32).reshape(2, 10)
    candidate = reference.copy()
    candidate[0, :3] = np.nan
    candidate[1, 0] = np.inf
    metrics = parity_lib.compare(reference, candidate)
    assert metrics["nonfinite"] == {"reference": 0, "candidate": 4, "values": 20}
    assert all(metrics[name] is None for name in parity_lib.METRICS)
    assert parity_lib.failures(metrics, {}, "float") == ["4 of 20 artifact logits are NaN/inf"]
    assert parity_lib.failures(parity_lib.compare(candidate, reference), {}, "simulated") == [
        "4 of 20 simulated reference logits are NaN/inf"]


def test_compare_cosine_survives_huge_and_zero_logits() -> None:
    """Regression: the product of two norms overflowed to inf for finite logits near 1e300 (cosine
    nan or 0), and an all-zero artifact output against non-zero logits read cosine 1.0."""
    huge = np.array([[1e300, -1e300, 5e299]])
    assert parity_lib.compare(huge, huge)["cosine"] == pytest.approx(1.0)
    zero, ones = np.zeros((1, 4)), np.ones((1, 4))
    assert parity_lib.compare(ones, zero)["cosine"] == 0.0
    assert parity_lib.compare(zero, zero)["cosine"] == 1.0


def test_nonfinite_fails_an_unenforced_reference_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 vs the float model is reported only; NaN there must still fail the whole report."""
    from mf_edge.data import ParityInputs

    batch = np.zeros((2, 3, 4, 4), dtype=np.float32)
    inputs = ParityInputs(batch, ["a", "b"], None, "test")
    good = np.eye(2, 5, dtype=np.float32)
    bad = good.copy()
    bad[1, 1] = np.nan

    class Fixed:
        name = "fixed"

        def run(self, array: np.ndarray) -> np.ndarray:
            return good[: len(array)]

    report = parity_lib.evaluate(Fixed(), inputs, {"simulated": good, "float": bad}, "int8", batch_size=2)
    assert report["status"] == parity_lib.FAIL
    assert report["reason"] == "vs float: 1 of 10 float reference logits are NaN/inf"
    with pytest.raises(ParityFailure, match="float reference logits are NaN/inf"):
        parity_lib.raise_on_failure(report, "model.pte")


def test_strict_json_writes_null_and_says_why() -> None:
    """Regression: parity.json and manifest.json held bare NaN tokens (not JSON)."""
    text = strict_json({"metrics": {"cosine": float("nan"), "err": np.float32("inf"), "ok": 1.5},
                        "rows": [float("-inf")]})
    data = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
    assert data["metrics"] == {"cosine": None, "err": None, "ok": 1.5} and data["rows"] == [None]
    assert data["non_finite"]["fields"] == ["metrics.cosine (nan)", "metrics.err (inf)", "rows[0] (-inf)"]
    assert "NaN or infinite" in data["non_finite"]["reason"]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_weights_fail_convert_and_publish_nothing(value: float, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """Regression: NaN in head.weight converted with "parity pass ... max abs err nan" and exit 0."""
    def poison(state: dict) -> None:
        state["head.weight"][3, :5] = value

    weights = checkpoint(tmp_path, "poisoned", poison)
    out = tmp_path / "out"
    code, _, err = run(["convert", MODEL, "--target", "onnx", "--weights", str(weights), "--image-size", SIZE,
                        "--output", str(out), "--quiet"], capsys)
    message = one_error_line(err)
    assert code == 4
    assert "float reference logits are NaN/inf" in message and "artifact logits are NaN/inf" in message
    kept = tmp_path / "out.parity-failed.json"
    assert f"nothing was published; the full report is in {kept}" in message
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # no output, no staging folder
    report = strict_load(kept)
    metrics = report["references"]["float"]["metrics"]
    assert report["status"] == "fail" and metrics["cosine"] is None
    assert metrics["nonfinite"]["reference"] > 0 and metrics["nonfinite"]["candidate"] > 0


def test_fp16_overflow_fails_parity(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Regression: fp16 overflow (a logit beyond 65504 becomes inf) was caught only by top-1 while
    cosine read 1.000000; now the artifact's inf logits fail parity by themselves."""
    def overflow(state: dict) -> None:
        state["head.bias"][7] = 1e5  # finite in float32, inf in float16

    weights = checkpoint(tmp_path, "overflow", overflow)
    out = tmp_path / "fp16"
    code, _, err = run(["convert", MODEL, "--target", "onnx", "--precision", "fp16", "--weights",
                        str(weights), "--image-size", SIZE, "--output", str(out), "--quiet"], capsys)
    message = one_error_line(err)
    assert code == 4 and "artifact logits are NaN/inf" in message and "reference logits" not in message
    assert not out.exists()
    report = strict_load(tmp_path / "fp16.parity-failed.json")
    nonfinite = report["references"]["float"]["metrics"]["nonfinite"]
    assert nonfinite["reference"] == 0 and nonfinite["candidate"] >= 8  # class 7 of each of the 8+ images


def test_parity_command_fails_an_artifact_gone_nonfinite(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """``mf-edge parity`` on a published folder whose artifact now computes NaN: exit 4, the table
    (n/a for each metric), one error line; ``--json`` prints strict JSON."""
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "published"
    code, _, err = run(["convert", MODEL, "--target", "onnx", "--weights", "random", "--image-size", SIZE,
                        "--output", str(out), "--quiet"], capsys)
    assert code == 0, err
    strict_load(out / "parity.json")
    strict_load(out / "manifest.json")
    graph = onnx.load(str(out / "model.onnx"))
    head_shapes = ((1000, 512), (512, 1000))
    tensor = next(t for t in graph.graph.initializer if numpy_helper.to_array(t).shape in head_shapes)
    array = numpy_helper.to_array(tensor).copy()
    array[0, 0] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    onnx.save(graph, str(out / "model.onnx"))

    code, out_text, err = run(["parity", str(out), "--quiet"], capsys)
    message = one_error_line(err)
    assert code == 4 and "artifact logits are NaN/inf" in message and "metrics are printed above" in message
    assert "n/a" in out_text and "FAIL" in out_text
    code, out_text, err = run(["parity", str(out), "--quiet", "--json"], capsys)
    assert code == 4
    report = json.loads(out_text, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
    assert report["references"]["float"]["metrics"]["cosine"] is None
