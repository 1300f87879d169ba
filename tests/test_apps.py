"""``apps/classify``: the standalone demo prepares images exactly as the eval transform and gives
``mf-edge predict``'s answer with only the runtime installed (the ONNX path never imports torch).
Its ExecuTorch path is checked in ``test_convert_executorch.py`` on an artifact converted there."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mf_edge import convert
from mf_edge.data import load_image, preprocess
from mf_edge.manifest import preprocessing_dict
from mf_edge.models.zoo import IMAGENET_MEAN, IMAGENET_STD
from mf_edge.pipeline import predict
from mf_edge.spec import Preprocessing

DEMO = Path(__file__).resolve().parents[1] / "apps" / "classify" / "classify.py"
SIZE = 64
# Runs the demo as a program, then reports whether torch got imported along the way.
HARNESS = """
import json, runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from PIL import Image

    from mf_edge.data import sample_images

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, image in sample_images():
        path = folder / name.removeprefix("sklearn:")
        image.save(path)
        paths.append(path)
    wide = folder / "wide.png"  # wider than tall, not square: exercises the resize and crop arithmetic
    Image.open(paths[0]).crop((0, 0, 300, 120)).save(wide)
    return [*paths, wide]


def load_demo():
    spec = importlib.util.spec_from_file_location("classify_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("crop_pct", "interpolation"),
                         [(1.0, "bicubic"), (0.875, "bilinear"), (0.95, "bicubic")])
def test_demo_preprocessing_is_the_eval_transform(photos: list[Path], crop_pct: float,
                                                  interpolation: str) -> None:
    prep = Preprocessing(96, crop_pct, interpolation, IMAGENET_MEAN, IMAGENET_STD)
    demo = load_demo()
    expected = preprocess([load_image(path) for path in photos], prep)
    got = np.stack([demo.preprocess(path, preprocessing_dict(prep)) for path in photos])
    assert got.shape == expected.shape == (len(photos), 3, 96, 96)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def run_demo(folder: Path, images: list[Path]) -> tuple[list[dict], list[str]]:
    completed = subprocess.run(
        [sys.executable, "-c", HARNESS, str(DEMO), str(folder), *map(str, images), "--json", "--top", "5"],
        capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    torch_modules = json.loads(completed.stderr.strip().splitlines()[-1])
    return json.loads(completed.stdout), torch_modules


def assert_same_answer(demo: list[dict], expected: list, images: list[Path]) -> None:
    assert [entry["image"] for entry in demo] == [str(path) for path in images]
    for entry, classes in zip(demo, expected, strict=True):
        assert [c["label"] for c in entry["top"]] == [name for name, _, _ in classes]
        for c, (_, probability, logit) in zip(entry["top"], classes, strict=True):
            assert c["probability"] == pytest.approx(probability, abs=1e-5)
            assert c["logit"] == pytest.approx(logit, abs=1e-4)


def test_onnx_demo_matches_predict_without_torch(tmp_path: Path, photos: list[Path]) -> None:
    result = convert("convformer_s18", "onnx", weights="random", image_size=SIZE, batch_size=2,
                     output=tmp_path / "onnx")
    demo, torch_modules = run_demo(result.output, photos)
    assert torch_modules == []
    assert_same_answer(demo, predict(result.output, photos), photos)


# Runs the demo with torch and executorch unimportable, as in a venv without them.
NO_TORCH = """
import runpy, sys
sys.modules.update(torch=None, executorch=None)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(("artifact", "needles"), [
    ("model.pte", ["pip install executorch", "apps/executorch_cpp"]),
    ("model.mlpackage", ["Core ML", "docs/deploy/ios.md"]),
    ("model.engine", ["mf-edge engine run", "docs/deploy/jetson.md"]),
])
def test_demo_names_what_to_install_or_where_to_run(tmp_path: Path, photos: list[Path], artifact: str,
                                                    needles: list[str]) -> None:
    """Without torch a ``.pte`` folder is one line naming what to install and the native app (it was a
    ModuleNotFoundError traceback); a Core ML or TensorRT folder points to its device guide."""
    (tmp_path / "manifest.json").write_text(json.dumps({"artifact": artifact}))
    (tmp_path / artifact).write_bytes(b"")
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(DEMO), str(tmp_path), str(photos[0])],
                          capture_output=True, text=True, timeout=120, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]
    for guide in ("docs/deploy/ios.md", "docs/deploy/jetson.md"):
        assert guide not in lines[0] or (DEMO.parents[2] / guide).is_file()
