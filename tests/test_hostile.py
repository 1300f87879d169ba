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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    image = next(photos(tmp_path / "p", 1).iterdir())  # regression: predict printed nan probabilities
    code, out_text, err = run(["predict", str(out), str(image)], capsys)
    assert code == 4 and "NaN/inf logits" in one_error_line(err) and "nan" not in out_text


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
    import mf_edge.cli.application

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mf_edge.cli.application, "register_commands", interrupted)
    code, out, err = run(["models"], capsys)
    assert code == 130 and out == "" and "Traceback" not in err


def test_the_cli_entry_imports_nothing_heavy() -> None:
    """What the console script imports before ``main`` runs is outside any Ctrl-C handling, so it must
    be light: no typer, rich, click or PyTorch (regressions: ``mf_edge/__init__`` imported the models
    eagerly; ``mf_edge/cli/__init__`` imported typer and rich at module level)."""
    import subprocess
    import sys

    code = ("import sys, mf_edge.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'typer', 'rich', 'click', 'torch'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# Blocks the first import of MODULE (printing a marker first), so a signal lands inside that import.
SLOW_IMPORT = """
import builtins, sys, time
real_import = builtins.__import__
def slow_import(name, *args, **kwargs):
    if name.split(".")[0] == {module!r} and {module!r} not in sys.modules:
        print("importing", {module!r}, file=sys.stderr, flush=True)
        time.sleep(120)
    return real_import(name, *args, **kwargs)
builtins.__import__ = slow_import
from mf_edge.cli import main
main()
"""


@pytest.mark.parametrize("module", ["typer", "rich", "torch"])
def test_ctrl_c_during_start_up_is_quiet(module: str, tmp_path: Path) -> None:
    """SIGINT to a real ``mf-edge convert`` while it imports typer, rich or PyTorch: exit 130, no
    traceback. The import is held open until the signal lands, so the test never races start-up (a
    module-level ``import typer`` in ``mf_edge/cli/__init__.py`` fails it with a traceback)."""
    import signal
    import subprocess
    import sys

    command = ["convert", "identityformer_s12", "--target", "onnx", "--weights", "random",
               "--image-size", "32", "-o", str(tmp_path / "out")]
    # SIGINT as in a terminal: a job started in the background by a shell without job control (some
    # CI launchers) inherits SIGINT ignored, and Python then never sees the signal
    process = subprocess.Popen([sys.executable, "-c", SLOW_IMPORT.format(module=module), *command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = process.stderr.readline()
    assert first.strip() == f"importing {module}", first + process.stderr.read()
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


# ------------------------------------------------------------------------- nothing a user owns is lost


def dead_pid() -> int:
    """The id of a process that has ended."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_force_replaces_only_what_mf_edge_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """Regression: ``convert -o . --force`` deleted the user's files. ``--force`` now replaces only an
    mf-edge output folder (its manifest.json) or an empty one, never the working folder or a parent."""
    from mf_edge.errors import UserError
    from mf_edge.publish import check_output

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    argv = ["convert", MODEL, "--target", "onnx", "--weights", "random", "--image-size", SIZE, "--force"]
    code, _, err = run([*argv, "--output", str(mine)], capsys)
    message = one_error_line(err)
    assert code == 2 and "--force only replaces an mf-edge output folder" in message
    assert "thesis.tex" in message
    assert (mine / "thesis.tex").read_text() == "years of work"

    monkeypatch.chdir(mine)
    for folder in (".", "..", str(tmp_path)):
        code, _, err = run([*argv, "--output", folder], capsys)
        assert code == 2 and "it is the working folder or one of its parents" in one_error_line(err)
    assert (mine / "thesis.tex").exists()

    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", force=True) == tmp_path / "empty"
    made = tmp_path / "made"
    made.mkdir()
    (made / "manifest.json").write_text(json.dumps({"format": "mf-edge-manifest/1"}))
    assert check_output(made, force=True) == made
    (made / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="holds other files"):
        check_output(made, force=True)


def test_stale_staging_of_a_killed_run_is_removed(tmp_path: Path) -> None:
    """Regression: SIGKILL left ``.NAME.*.partial`` staging folders (up to 103 MB) that no later run
    removed. A later run of the same output removes those whose process is gone, and only those."""
    from mf_edge.publish import staged_output, temporary_prefix

    dead = tmp_path / f".out.pid{dead_pid()}-abc.partial"
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"\0" * 1000)
    dead_file = tmp_path / f".out.pid{dead_pid()}-.old"
    dead_file.write_bytes(b"x")
    live = tmp_path / f"{temporary_prefix('out')}xyz.partial"  # this very process: still running
    live.mkdir()
    other = tmp_path / f".other.pid{dead_pid()}-abc.partial"  # another output's: not this run's business
    other.mkdir()
    with staged_output(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "out"])


def test_failed_report_replaces_a_stale_partial(tmp_path: Path) -> None:
    """``<output>.parity-failed.json`` is written through a PID-named temporary file; a killed
    writer's temporary file is removed by the next one."""
    from mf_edge.pipeline import keep_failed_report

    stale = tmp_path / f".out.parity-failed.json.pid{dead_pid()}-.partial"
    stale.write_text("{")
    kept = keep_failed_report(tmp_path / "out", {"status": "fail", "value": float("nan")})
    assert kept == tmp_path / "out.parity-failed.json" and strict_load(kept)["value"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parity-failed.json"]


@pytest.fixture(scope="module")
def earlier_run(cifar10_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch poolformerv2_s12 run stopped after its first epoch (one step): last.pt and best.pt."""
    from mf_edge.train import TrainConfig, train

    output = tmp_path_factory.mktemp("runs") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(model="poolformerv2_s12", data=cifar10_small, output=output, image_size=32,
                          batch_size=8, epochs=3, stop_after_epochs=1, max_steps_per_epoch=1, workers=0,
                          device="cpu"))
    finally:
        torch.set_num_threads(threads)
    return output


def train_argv(data: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "poolformerv2_s12", "--data", str(data), "--image-size", "32", "--batch-size", "8",
            "--max-steps-per-epoch", "1", "--workers", "0", "--device", "cpu", "--weights", "random",
            "--output", str(output),
            *extra]


def test_train_refuses_a_folder_holding_an_earlier_run(earlier_run: Path, cifar10_small: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """Regression: ``mf-edge train`` into an earlier run's folder without --resume silently replaced its
    best.pt (a 26.7% model overwritten by a 20% one)."""
    from mf_edge.weights import sha256_file

    before = sha256_file(earlier_run / "best.pt")
    code, _, err = run(train_argv(cifar10_small, earlier_run, "--epochs", "3"), capsys)
    message = one_error_line(err)
    assert code == 2 and f"output folder {earlier_run} already holds files" in message
    assert f"--resume {earlier_run / 'last.pt'}" in message and "--force" in message
    assert sha256_file(earlier_run / "best.pt") == before


def test_resume_mistakes_are_one_line(earlier_run: Path, cifar10_small: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    """Regressions: ``--resume best.pt`` gave ``KeyError: 'train'``; resuming a finished run exited 0 and
    named a folder it never made; ``--epochs`` below the checkpoint's was taken silently."""
    new = tmp_path / "new"
    cases = (
        ("best.pt", "3", f"{earlier_run / 'best.pt'} holds no training state (best.pt keeps only the weights "
                         f"to deploy); resume from {earlier_run / 'last.pt'}"),
        ("last.pt", "1", f"--resume {earlier_run / 'last.pt'} has already trained 1 epoch(s) and --epochs is "
                         "1: nothing is left to train"),
        ("last.pt", "2", f"--resume {earlier_run / 'last.pt'} continues a 3-epoch schedule; --epochs 2 would "
                         "cut it short; pass --epochs 3"),
    )
    for name, epochs, expected in cases:
        code, out, err = run(train_argv(cifar10_small, new, "--epochs", epochs, "--resume",
                                        str(earlier_run / name)), capsys)
        assert code == 2 and expected in one_error_line(err) and "checkpoints in" not in out
        assert not new.exists()


def test_train_force_and_stale_partials(earlier_run: Path, cifar10_small: Path, tmp_path: Path) -> None:
    """``--force`` replaces an earlier run's folder but refuses one holding other files; temporary
    checkpoint files of killed runs (``last.pt.partial`` before PIDs, ``.last.pt.pidPID-.partial`` now)
    are removed when a run starts in that folder, a live process's are kept."""
    import shutil

    from mf_edge.errors import UserError
    from mf_edge.publish import partial_file
    from mf_edge.train import TrainConfig
    from mf_edge.train.trainer import prepare_output

    def config(output: Path, **extra) -> TrainConfig:
        return TrainConfig(model="poolformerv2_s12", data=cifar10_small, output=output, **extra)

    run_copy = tmp_path / "run"
    shutil.copytree(earlier_run, run_copy)
    legacy, stale = run_copy / "last.pt.partial", run_copy / f".last.pt.pid{dead_pid()}-.partial"
    live = partial_file(run_copy / "best.pt")
    for path in (legacy, stale, live):
        path.write_bytes(b"half a checkpoint")
    prepare_output(config(run_copy, resume=run_copy / "last.pt"), is_main=True)
    assert not legacy.exists() and not stale.exists() and live.exists() and (run_copy / "best.pt").exists()

    prepare_output(config(run_copy, force=True), is_main=True)
    assert not run_copy.exists()

    killed = tmp_path / "killed"  # a run killed before its first checkpoint: only a temporary file
    killed.mkdir()
    (killed / "last.pt.partial").write_bytes(b"half")
    prepare_output(config(killed), is_main=True)  # a new run may start there, no --force needed
    assert list(killed.iterdir()) == []

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--force only replaces a folder of an earlier run .*\(notes\.txt\)"):
        prepare_output(config(mine, force=True), is_main=True)
    assert (mine / "notes.txt").exists()


# ------------------------------------------------------------------------------- properties (hypothesis)

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F")


def encoded_image(mode: str, width: int, height: int, seed: int) -> tuple[bytes, str]:
    """A ``mode`` image of random pixels, encoded as PNG (TIFF for modes PNG cannot hold)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode in ("I", "F"):
        image = base.convert("L").convert(mode)
    else:
        image = base.convert(mode)
    suffix = "tiff" if mode in ("CMYK", "I", "F") else "png"
    buffer = io.BytesIO()
    image.save(buffer, format=suffix.upper())
    return buffer.getvalue(), suffix


def check_loads_or_refuses(data: bytes, suffix: str, size: tuple[int, int] | None = None) -> None:
    """``load_image`` on ``data`` gives an 8-bit RGB image (of ``size`` when given) or one ``UserError``
    line naming the file; never another exception."""
    import tempfile

    from mf_edge.data import load_image
    from mf_edge.errors import UserError

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input.{suffix}"
        path.write_bytes(data)
        try:
            image = load_image(path)
        except UserError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            return
        assert image.mode == "RGB" and np.asarray(image).dtype == np.uint8
        if size is not None:
            assert image.size == size


@PROPERTY
@given(mode=st.sampled_from(MODES), width=st.integers(1, 40), height=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_image_loader_gives_rgb_for_every_mode(mode: str, width: int, height: int, seed: int) -> None:
    """Any mode Pillow decodes becomes an 8-bit RGB image of the same size."""
    data, suffix = encoded_image(mode, width, height, seed)
    check_loads_or_refuses(data, suffix, (width, height))


@PROPERTY
@given(mode=st.sampled_from(MODES), cut=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_image_loader_on_truncated_files(mode: str, cut: float, seed: int) -> None:
    """A truncated file is an error line (or, where the decoder tolerates it, an RGB image)."""
    data, suffix = encoded_image(mode, 24, 24, seed)
    check_loads_or_refuses(data[: int(len(data) * cut)], suffix)


@PROPERTY
@given(data=st.binary(max_size=512), suffix=st.sampled_from(["png", "jpg", "gif", "bmp", "webp", "tiff"]))
def test_image_loader_on_random_bytes(data: bytes, suffix: str) -> None:
    check_loads_or_refuses(data, suffix)


@PROPERTY
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
def test_image_loader_on_huge_headers(width: int, height: int) -> None:
    """A header claiming any size, with almost no data: a bomb error or a truncated-file error."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        if width * height > 50_000_000:  # keep the decoder's allocation small where no bomb check stops it
            check_loads_or_refuses(png_header(Path(folder) / "h.png", width, height).read_bytes(), "png")


def valid_manifest() -> dict:
    """A manifest as ``mf-edge convert`` writes it (the fields ``read_manifest`` checks)."""
    from mf_edge.models import get_model_info
    from mf_edge.spec import ExportSpec

    spec = ExportSpec.for_model(get_model_info(MODEL), image_size=64)
    return {"format": "mf-edge-manifest/1", "target": "onnx", "artifact": "model.onnx",
            "model": {"name": MODEL}, "weights": {"source": "random", "seed": 0}, "spec": spec.to_dict()}


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def check_manifest(raw: bytes) -> None:
    """``read_manifest`` then ``spec_from_manifest`` on ``raw``: a spec or one ``UserError`` line."""
    import tempfile

    from mf_edge.errors import UserError
    from mf_edge.manifest import read_manifest, spec_from_manifest

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "manifest.json").write_bytes(raw)
        try:
            spec = spec_from_manifest(read_manifest(folder))
        except UserError as exc:
            assert "\n" not in str(exc) and "manifest.json" in str(exc)
            return
        assert spec.image_size % 32 == 0 and len(spec.preprocessing.mean) == 3


@PROPERTY
@given(path=st.sampled_from([("target",), ("artifact",), ("model",), ("model", "name"), ("spec",),
                             ("spec", "image_size"), ("spec", "batch_size"), ("spec", "precision"),
                             ("spec", "preprocessing"), ("spec", "preprocessing", "crop_pct"),
                             ("spec", "preprocessing", "mean"), ("spec", "preprocessing", "interpolation"),
                             ("spec", "options"), ("weights",)]),
       value=JSON_VALUES)
def test_manifest_reader_on_wrong_json_types(path: tuple[str, ...], value) -> None:
    """Any field replaced by any JSON value: the spec, or one error line (never KeyError/TypeError)."""
    manifest = valid_manifest()
    holder = manifest
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    check_manifest(json.dumps(manifest).encode())


@PROPERTY
@given(cut=st.integers(0, 2000), junk=st.binary(max_size=64))
def test_manifest_reader_on_truncated_and_non_utf8_files(cut: int, junk: bytes) -> None:
    text = json.dumps(valid_manifest()).encode()
    check_manifest(text[:cut])
    check_manifest(b"\xff\xfe" + junk)
    check_manifest(b"[" * 100_000)  # deep nesting: RecursionError in the JSON parser
