"""From training to device in one flow: a training checkpoint carries its image size and class names.

``mf-edge train`` -> ``mf-edge convert --weights best.pt`` -> ``mf-edge predict`` with no repeated flags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mf_edge import create_model
from mf_edge.cli import main
from mf_edge.errors import UserError

MODEL = "poolformerv2_s12"  # the fastest family to train on CPU
SIZE = 32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(argv: list[str]) -> None:
    """Run the CLI in-process; it must succeed."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None), argv


@pytest.fixture(scope="module")
def flow(cifar10_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder where ``train`` (32 px, a few steps) and then ``convert`` ran with their defaults."""
    root = tmp_path_factory.mktemp("flow")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        run(["train", MODEL, "--data", str(cifar10_small), "--weights", "random", "--image-size", str(SIZE),
             "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "16", "--workers", "0",
             "--device", "cpu"])
        run(["convert", MODEL, "--target", "onnx", "--weights", f"mf-edge-out/{MODEL}-train/best.pt",
             "--quiet"])
    return root


def converted(root: Path) -> Path:
    [folder] = [p for p in (root / "mf-edge-out").iterdir() if (p / "manifest.json").is_file()]
    return folder


def test_convert_takes_size_and_class_names_from_the_checkpoint(flow: Path, cifar10_small: Path) -> None:
    """Regression: convert exported at the zoo's 224 px with ImageNet's metadata and no labels.txt."""
    folder = converted(flow)
    manifest = json.loads((folder / "manifest.json").read_text())
    classes = sorted(p.name for p in (cifar10_small / "train").iterdir())
    assert manifest["spec"]["image_size"] == SIZE and manifest["input"]["shape"] == [1, 3, SIZE, SIZE]
    assert (folder / "labels.txt").read_text().splitlines() == classes
    assert manifest["labels"]["set"] == "fine-tuned"
    assert manifest["model"]["pretrain"] == "fine-tuned from random initialisation"
    assert manifest["model"]["fine_tuned"]["classes"] == classes
    assert manifest["weights"]["trained"]["image_size"] == SIZE
    assert manifest["parity"]["status"] == "pass"


def test_predict_prints_class_names(flow: Path, cifar10_small: Path, capsys: pytest.CaptureFixture) -> None:
    """Regression: predict printed ``class 6`` instead of ``frog`` for a fine-tuned model."""
    image = sorted((cifar10_small / "val" / "frog").iterdir())[0]
    capsys.readouterr()
    run(["predict", str(converted(flow)), str(image), "--top", "10"])
    out = capsys.readouterr().out
    classes = [p.name for p in (cifar10_small / "train").iterdir()]
    assert all(name in out for name in classes), out
    assert "class 6" not in out


def test_python_api_and_disagreeing_size(flow: Path, capsys: pytest.CaptureFixture) -> None:
    """``create_model`` defaults to the trained size; an explicit other size is used with a note."""
    best = flow / "mf-edge-out" / f"{MODEL}-train" / "best.pt"
    model = create_model(MODEL, weights=best)
    assert model.mf_edge_image_size == SIZE and model.num_classes == 10
    assert len(model.mf_edge_weights["trained"]["classes"]) == 10
    capsys.readouterr()
    other = create_model(MODEL, weights=best, image_size=64)
    assert other.mf_edge_image_size == 64
    assert "not the 32 px best.pt was trained at" in capsys.readouterr().err
    renamed = create_model(MODEL, weights=best, num_classes=3)
    assert "classes" not in renamed.mf_edge_weights["trained"]  # a new head: the names no longer apply


def test_checkpoint_of_another_model_is_refused(flow: Path) -> None:
    """identityformer_s12 has poolformerv2_s12's parameter names: loading alone would not notice."""
    best = flow / "mf-edge-out" / f"{MODEL}-train" / "best.pt"
    with pytest.raises(UserError, match=f"was trained for {MODEL}, not identityformer_s12"):
        create_model("identityformer_s12", weights=best)


def test_end_line_says_where_parity_ran_and_that_weights_are_random() -> None:
    """Regression: the Core ML quick start ended ``parity pass`` with no word of the reference executor
    or the random weights; TensorRT without a GPU repeated its install hint in the result line."""
    from mf_edge.cli.convert import end_note

    report = {"status": "pass", "reason": None, "runtime": "coreml-reference"}
    text = end_note(report, {"weights": {"source": "random"}}, quiet=False)
    assert "Core ML reference executor" in text and "random weights" in text
    assert "random" not in end_note(report, {"weights": {"source": "imagenet"}}, quiet=False)
    hint = "TensorRT is not installed here: pip install '.[tensorrt]'"
    trt = {"status": "not run", "reason": hint, "runtime": None,
           "onnx": {"status": "pass", "runtime": "onnxruntime"}}
    assert hint not in end_note(trt, {}, quiet=False)  # the notes above said it once
    assert hint in end_note(trt, {}, quiet=True)  # --quiet: the result line is all there is
    assert "its ONNX: pass in onnxruntime" in end_note(trt, {}, quiet=True)


def test_third_party_chatter_is_hidden_unless_verbose() -> None:
    """Regression: the first run printed coremltools' 'Failed to load _MLModelProxy' lines and version
    warnings, and torch's pytree deprecation line, before mf-edge's own first line."""
    import subprocess
    import sys

    base = "import coremltools, torchao"
    quiet = "from mf_edge.console import silence_third_party; silence_third_party(); " + base
    loud = subprocess.run([sys.executable, "-c", base], capture_output=True, text=True, timeout=300).stderr
    hidden = subprocess.run([sys.executable, "-c", quiet], capture_output=True, text=True, timeout=300)
    assert hidden.returncode == 0, hidden.stderr[-2000:]
    noise = ("Failed to load", "has not been tested with coremltools", "Enum subclass")
    if not any(text in loud for text in noise):
        pytest.skip("these library versions print nothing on import here")
    assert not any(text in hidden.stderr for text in noise), hidden.stderr


def test_conversion_progress_bars_of_libraries_are_hidden_unless_verbose() -> None:
    """Regression: coremltools' tqdm bars ('Converting PyTorch Frontend ==> MIL Ops') filled the screen
    of a quiet-by-default conversion; ``silence_third_party`` must turn tqdm off (before it is imported)."""
    import subprocess
    import sys

    bar = "from tqdm import tqdm; list(tqdm(range(3), desc='MIL passes'))"
    quiet = "from mf_edge.console import silence_third_party; silence_third_party(); " + bar
    env = {key: value for key, value in os.environ.items() if key != "TQDM_DISABLE"}
    loud, hidden = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                   env=env) for code in (bar, quiet))
    assert "MIL passes" in loud.stderr
    assert hidden.returncode == 0 and "MIL passes" not in hidden.stderr, hidden.stderr


@pytest.mark.parametrize("argv, silenced", [(["models"], True), (["--verbose", "models"], False),
                                            (["models", "--verbose"], False)])
def test_verbose_works_before_and_after_the_command(argv: list[str], silenced: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: ``--verbose`` was a root option only, so ``mf-edge convert ... --verbose`` was refused
    as an unknown option; it now means the same in either place."""
    import mf_edge.cli.application as application
    from mf_edge.cli import main

    calls = []
    monkeypatch.setattr(application, "silence_third_party", lambda: calls.append(1))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert bool(calls) == silenced


def test_verbose_after_a_double_dash_is_an_argument() -> None:
    from mf_edge.cli.application import verbose_first

    assert verbose_first(["convert", "m", "--verbose", "--", "--verbose"]) == [
        "--verbose", "convert", "m", "--", "--verbose"]
    assert verbose_first(["convert", "m"]) == ["convert", "m"]


NATIVE_LINES = """
import os
from mf_edge.console import native_log_filtered, silence_third_party
if {silenced}:
    silence_third_party()
with native_log_filtered():
    os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\\n")
    os.write(2, b"a native error the user must see\\n")
"""


@pytest.mark.parametrize("silenced", [True, False])
def test_native_cpuinfo_lines_are_dropped_unless_verbose(silenced: bool) -> None:
    """Regression: ExecuTorch's runtime printed 5 ``[cpuinfo_utils.cpp:...]`` lines straight to fd 2 on
    the first XNNPACK load (no log-level setting exists in its Python package). Quiet by default they are
    dropped; any other native line still shows; ``--verbose`` keeps them all."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", NATIVE_LINES.format(silenced=silenced)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "a native error the user must see" in done.stderr
    assert ("cpuinfo_utils" in done.stderr) is not silenced, done.stderr
