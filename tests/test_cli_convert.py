"""The ``convert``, ``parity`` and ``predict`` commands: results, one-line errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mf_edge.cli import main

SIZE = "64"


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the CLI in-process: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mf_edge.data import sample_images

    path = tmp_path_factory.mktemp("photos") / "flower.jpg"
    sample_images()[1][1].save(path)
    return path


@pytest.fixture(scope="module")
def onnx_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "identityformer-onnx"
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "identityformer_s12", "--target", "onnx", "--weights", "random",
              "--image-size", SIZE, "--output", str(out), "--quiet"])
    assert exit_info.value.code in (0, None)
    return out


def test_convert_writes_the_output_folder(onnx_output: Path) -> None:
    assert sorted(p.name for p in onnx_output.iterdir()) == ["labels.txt", "manifest.json", "model.onnx",
                                                              "parity.json"]
    manifest = json.loads((onnx_output / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["parity"]["status"] == "pass"
    assert manifest["weights"]["source"] == "random"


def test_parity_command_reruns_the_check(onnx_output: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(["parity", str(onnx_output), "--json", "--quiet"], capsys)
    report = json.loads(out)
    assert code == 0 and report["status"] == "pass"
    assert report["references"]["float"]["metrics"]["cosine"] >= 0.9999
    code, out, _ = run(["parity", str(onnx_output), "--quiet"], capsys)
    assert code == 0 and "parity: pass" in out and "float" in out


def test_predict_prints_top5_imagenet_classes(onnx_output: Path, photo: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    from mf_edge.pipeline import predict

    code, out, _ = run(["predict", str(onnx_output), str(photo)], capsys)
    assert code == 0
    expected = predict(onnx_output, [photo])[0]
    assert len(expected) == 5
    for name, probability, _ in expected:
        assert name in out and f"{probability:.3f}" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "tflite"], "unknown target 'tflite'; choose one of coreml, executorch, onnx, tensorrt"),
    (["--target", "onnx", "--image-size", "100"], "image size 100 is not a positive multiple of 32"),
    (["--target", "onnx", "--batch-size", "0"], "batch size must be at least 1"),
    (["--target", "onnx", "--precision", "fp8"], "supports fp32, fp16, int8, w8, not 'fp8'"),
    (["--target", "onnx", "--calibration", "calib.json"], "PTQ options (--calibration) only apply"),
    (["--target", "onnx", "--precision", "int8", "--calib-size", "0"], "--calib-size must be at least 1"),
    (["--target", "onnx", "--weights", "/nonexistent/ckpt.pth"], "does not exist"),
])
def test_bad_input_is_one_line_error(args: list[str], message: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["convert", "identityformer_s12", *args, "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "Traceback" not in err
    # exactly one line (a multi-line message used to pass once its lines were joined for the match)
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_existing_output_without_force(onnx_output: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["convert", "identityformer_s12", "--target", "onnx", "--weights", "random",
                        "--output", str(onnx_output)], capsys)
    assert code == 2 and "already exists; pass --force" in " ".join(err.split())


def test_unwritable_output_folder(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["convert", "identityformer_s12", "--target", "onnx", "--weights", "random",
                        "--image-size", SIZE, "--output", "/proc/mf-edge-out"], capsys)
    assert code == 2 and "writable" in err and "Traceback" not in err


def test_parity_and_predict_on_a_folder_without_manifest(tmp_path: Path, photo: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["parity", str(tmp_path)], capsys)
    assert code == 2 and "has no manifest.json" in err
    code, _, err = run(["predict", str(tmp_path), str(photo)], capsys)
    assert code == 2 and "has no manifest.json" in err


def test_predict_missing_image(onnx_output: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["predict", str(onnx_output), str(tmp_path / "missing.jpg")], capsys)
    assert code == 2 and "does not exist" in err
