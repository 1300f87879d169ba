"""Hostile but fair input (issue #12): the parity gate refuses non-finite numbers, no bad input gives a
traceback, and nothing a user owns is lost. Each test goes through the CLI where a user would meet the
case: the exit code, one ``error:`` line, no ``Traceback``, and the files on disk afterwards.
"""

from __future__ import annotations

import json
import math
import re
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


# ------------------------------------------------------------------------------------------- inputs


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (8-bit grey) with almost no pixel data: what a
    decompression bomb looks like to the decoder before it inflates anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def photos(folder: Path, count: int = 2) -> Path:
    """``count`` small noise JPEGs in ``folder``."""
    from mf_edge.data import noise_images

    folder.mkdir(parents=True, exist_ok=True)
    for name, image in noise_images(count, 48):
        image.save(folder / f"{name.replace(':', '-')}.jpg")
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published ONNX folder of ``MODEL`` (random weights, ``SIZE`` px)."""
    out = tmp_path_factory.mktemp("hostile") / "published"
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", MODEL, "--target", "onnx", "--weights", "random", "--image-size", SIZE,
              "--output", str(out), "--quiet"])
    assert exit_info.value.code in (0, None)
    return out


def test_decompression_bomb_is_one_error_line(published: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """Regression: a 20000x20000 PNG in ``predict`` or ``--images`` gave a raw DecompressionBombError
    traceback; now one error line names the file."""
    (tmp_path / "images").mkdir()
    bomb = png_header(tmp_path / "images" / "bomb.png", 20000, 20000)
    code, _, err = run(["predict", str(published), str(bomb)], capsys)
    message = one_error_line(err)
    assert code == 2 and f"image {bomb} is refused as a possible decompression bomb" in message
    code, _, err = run(["convert", MODEL, "--target", "onnx", "--weights", "random", "--image-size", SIZE,
                        "--images", str(bomb.parent), "--output", str(tmp_path / "out")], capsys)
    message = one_error_line(err)
    assert code == 2 and f"image {bomb} is refused as a possible decompression bomb" in message
    assert not (tmp_path / "out").exists()


def test_decompression_bomb_in_calibration_is_skipped_and_counted(tmp_path: Path) -> None:
    """Calibration skips undecodable files and counts them (as the README promises); a bomb is one."""
    from mf_edge.calibration.data import load_calibration_set
    from mf_edge.spec import Preprocessing

    folder = photos(tmp_path / "calib", 3)
    png_header(folder / "bomb.png", 20000, 20000)
    prep = Preprocessing(32, 1.0, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    calib = load_calibration_set(folder, prep, calib_size=8, use_cache=False)
    assert calib.count == 3 and "bomb.png" not in " ".join(calib.files)
    assert any("1 unreadable image(s)" in line for line in calib.notes)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    """Regression: ``convert("RGB")`` clipped 16-bit grey (mode I;16) to white above level 255."""
    from PIL import Image

    from mf_edge.data import load_image

    levels = np.array([[0, 257, 1000], [32896, 65535, 60000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.rint(levels / 257).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize(("size", "message"), [
    ("0", "image size 0 is not a positive multiple of 32"),
    ("-32", "image size -32 is not a positive multiple of 32"),
    ("100000", "image size 100000 (batch 1) needs 111.8 GiB for the input alone, more than this machine's"),
])
def test_image_size_refused_before_any_allocation(size: str, message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """Regression: --image-size 0 meant "the default" (224) and 100000 died allocating 28 GiB with a
    traceback; both are refused before any model is built (the limit is the machine's memory)."""
    from mf_edge import create_model
    from mf_edge.errors import UserError
    from mf_edge.models.factory import physical_memory

    if size == "100000" and (physical_memory() or 0) > 120 * 2**30:
        pytest.skip("this machine could hold a 100000 px input")
    code, _, err = run(["convert", MODEL, "--target", "onnx", "--weights", "random", "--image-size", size,
                        "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and message in one_error_line(err)
    with pytest.raises(UserError, match=message.split(" (")[0]):
        create_model(MODEL, weights="random", image_size=int(size))


@pytest.mark.parametrize("top", ["0", "-2"])
def test_predict_top_below_one_is_refused(top: str, published: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """Regression: ``--top -2`` printed 998 rows and ``--top 0`` an empty table."""
    image = next(photos(tmp_path / "p", 1).iterdir())
    code, out, err = run(["predict", str(published), str(image), "--top", top], capsys)
    assert code == 2 and f"--top must be at least 1, got {top}" in one_error_line(err) and out == ""


def test_ctrl_c_while_the_cli_imports_exits_130(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    """Regression: Ctrl-C inside ``import torch`` at start-up printed a KeyboardInterrupt traceback.
    The command modules (and PyTorch) now import inside ``main``'s Ctrl-C handling."""
    import mf_edge.cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mf_edge.cli, "_register", interrupted)
    code, out, err = run(["models"], capsys)
    assert code == 130 and out == "" and "Traceback" not in err


def test_the_cli_entry_imports_no_torch() -> None:
    """What the console script imports before ``main`` runs must be light: an import of PyTorch there
    is outside any Ctrl-C handling (regression: ``mf_edge/__init__`` imported the models eagerly)."""
    import subprocess
    import sys

    code = "import sys, mf_edge.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_ctrl_c_during_start_up_is_quiet(tmp_path: Path) -> None:
    """SIGINT to a real ``mf-edge`` process while it is still starting (importing PyTorch): exit 130,
    nothing on stderr."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-c", "from mf_edge.cli import main; main()", "models"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    if process.poll() is not None:
        pytest.skip("mf-edge finished starting before the signal")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err


def test_refused_pickle_says_why_and_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Regression: a pickle with a ``__reduce__`` call was reported as "corrupt or truncated"."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, evil)
    code, _, err = run(["convert", MODEL, "--target", "onnx", "--weights", str(evil), "--image-size", SIZE,
                        "--output", str(tmp_path / "out")], capsys)
    message = one_error_line(err)
    assert code == 2 and f"checkpoint {evil} is not a weights-only checkpoint" in message
    assert "refused for safety and never unpickled" in message and "corrupt" not in message
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_engine_build_on_a_folder_says_it_is_a_folder(published: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Regression: ``engine build FOLDER`` said "does not exist" for a folder that exists."""
    code, _, err = run(["engine", "build", str(published)], capsys)
    message = one_error_line(err)
    assert code == 2 and f"{published} is a folder, not a file; pass {published / 'model.onnx'}" in message
    code, _, err = run(["engine", "build", str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path} is a folder, not a file; pass the model.onnx" in one_error_line(err)


def test_calibration_list_entries_say_what_they_are(tmp_path: Path) -> None:
    """Regression: --calib-data list entries that were folders or FIFOs were "does not exist"."""
    import os

    from mf_edge.calibration.data import load_calibration_set
    from mf_edge.errors import UserError
    from mf_edge.spec import Preprocessing

    prep = Preprocessing(32, 1.0, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    (tmp_path / "a_folder").mkdir()
    os.mkfifo(tmp_path / "a_fifo")
    cases = (("a_folder", "is a folder, not a file"), ("a_fifo", "is a FIFO (named pipe), not a file"),
             ("gone.jpg", "does not exist"))
    for entry, kind in cases:
        listing = tmp_path / "list.txt"
        listing.write_text(f"# calibration\n{entry}\n")
        with pytest.raises(UserError, match=rf"list\.txt:2: {entry} {re.escape(kind)}; fix the path"):
            load_calibration_set(listing, prep, use_cache=False)
