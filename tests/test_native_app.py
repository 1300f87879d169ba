"""``apps/executorch_cpp``: the native app, built from a clean tree with CMake against the executorch wheel,
gives the Python ExecuTorch runtime's logits and the Python eval transform's input tensor.

One build per session (about a minute on 2 cores) and two programs of the cheapest graph to lower,
IdentityFormer with one block per stage (``small_models``; the app is the same for every model), at
32 px: fp32 with a dynamic batch, int8 with a static batch of 2. Skips only where no C++ compiler or
CMake exists.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mf_edge import convert
from mf_edge.console import set_quiet
from mf_edge.converters import TARGET_MODULES, get_target
from mf_edge.data import load_image, preprocess
from mf_edge.manifest import read_manifest, spec_from_manifest
from mf_edge.spec import Preprocessing

APP_SOURCE = Path(__file__).resolve().parents[1] / "apps" / "executorch_cpp"
MODEL = "identityformer_d1"
SIZE = 32
CALIB = 16


def sample_photo_paths() -> list[Path]:
    """scikit-learn's two sample JPEGs, as files (the app decodes them itself)."""
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    return [folder / "china.jpg", folder / "flower.jpg"]


@pytest.fixture(scope="session")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mf-classify`` configured and built in a fresh temporary build tree."""
    cmake = shutil.which("cmake")
    compiler = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cmake is None or compiler is None:
        pytest.skip(f"the native app needs CMake and a C++ compiler (cmake: {cmake}, compiler: {compiler})")
    build = tmp_path_factory.mktemp("mf-classify-build")
    # no executorch_DIR: the CMakeLists asks this Python where the executorch package is
    configure = [cmake, "-S", str(APP_SOURCE), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"]
    for command in (configure, [cmake, "--build", str(build), "-j2"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build / "mf-classify"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, cifar10_small: Path) -> dict[str, Path]:
    """Two converted folders: ``fp32`` (dynamic batch) and ``int8`` (static batch 2)."""
    set_quiet(True)
    out = tmp_path_factory.mktemp("native")
    fp32 = convert(MODEL, "executorch", weights="random", image_size=SIZE, dynamic_batch=True,
                   output=out / "fp32")
    int8 = convert(MODEL, "executorch", "int8", weights="random", image_size=SIZE, batch_size=2,
                   output=out / "int8",
                   ptq_options={"calib_data": cifar10_small / "train", "calib_size": CALIB})
    return {"fp32": fp32.output, "int8": int8.output}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The sample JPEGs plus PNGs of other shapes and modes (wide, tall, grey, palette, RGBA)."""
    folder = tmp_path_factory.mktemp("native-photos")
    china, flower = sample_photo_paths()
    source = Image.open(flower)
    made = {"wide.png": source.crop((0, 0, 300, 120)), "tall.png": source.crop((0, 0, 100, 190)),
            "grey.png": source.convert("L"), "palette.png": source.convert("P"),
            "rgba.png": source.convert("RGBA"), "grey.jpg": source.convert("L")}
    for name, image in made.items():
        image.save(folder / name)
    return [china, flower, *(folder / name for name in made)]


def run_app(app: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(app), *map(str, args)], capture_output=True, text=True, timeout=300,
                          check=False)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def app_logits(app: Path, folder: Path, *inputs: str | Path) -> tuple[np.ndarray, list[dict]]:
    """The app's logits of every class for each input (``--top`` = all classes), and its JSON."""
    classes = read_manifest(folder)["output"]["shape"][1]
    results = json.loads(run_app(app, folder, *inputs, "--json", "--top", str(classes)).stdout)
    logits = np.zeros((len(results), classes), np.float32)
    for row, result in zip(logits, results, strict=True):
        for entry in result["top"]:
            row[entry["index"]] = entry["logit"]
    return logits, results


def python_logits(folder: Path, batch: np.ndarray) -> np.ndarray:
    """The Python ExecuTorch runtime's logits of ``batch`` (a static program in padded chunks)."""
    manifest = read_manifest(folder)
    runtime = get_target("executorch").runtime(folder, spec_from_manifest(manifest))
    size = len(batch) if manifest["input"]["dynamic_batch"] else manifest["input"]["shape"][0]
    outputs = []
    for start in range(0, len(batch), size):
        chunk = batch[start:start + size]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), axis=0)])
        outputs.append(runtime.run(padded)[:len(chunk)])
    return np.concatenate(outputs)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_logits_equal_the_python_runtime_on_the_same_tensor(app, folders, precision, tmp_path):
    """Three seeded images through ``--tensor``: the app's logits are the Python runtime's (<= 1e-5).
    Catches a wrong input layout or size, a padding or chunking error, a wrong output read or ranking."""
    batch = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    tensor = tmp_path / "batch.bin"
    batch.tofile(tensor)
    got, results = app_logits(app, folders[precision], "--tensor", tensor)
    expected = python_logits(folders[precision], batch)
    assert got.shape == expected.shape == (3, 1000)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert [r["image"] for r in results] == [f"{tensor}[{i}]" for i in range(3)]
    for result, row in zip(results, expected, strict=True):
        probabilities = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert [e["index"] for e in result["top"][:5]] == list(np.argsort(-row, kind="stable")[:5])
        assert result["top"][0]["probability"] == pytest.approx(probabilities.max(), rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_sample_photos_agree_with_the_python_path(app, folders, precision):
    """scikit-learn's photos decoded and preprocessed by the app vs Pillow + torchvision + the Python
    runtime: worst cosine >= 0.999 and the same top-1 (exact here, as the input tensors are identical)."""
    paths = sample_photo_paths()
    folder = folders[precision]
    prep = spec_from_manifest(read_manifest(folder)).preprocessing
    expected = python_logits(folder, preprocess([load_image(path) for path in paths], prep))
    got, _ = app_logits(app, folder, *paths)
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.999, cosine
    assert list(got.argmax(1)) == list(expected.argmax(1))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("interpolation", "crop_pct"),
                         [("bicubic", 1.0), ("bicubic", 0.875), ("bilinear", 0.9), ("nearest", 0.95),
                          ("lanczos", 0.875), ("box", 0.8), ("hamming", 0.875)])
def test_preprocessing_is_the_eval_transform_bit_for_bit(app, folders, photos, interpolation, crop_pct,
                                                         tmp_path):
    """``--save-input``: the app's input tensor equals ``mf_edge.data.preprocess`` (Pillow + torchvision)
    exactly, for JPEG and PNG in several modes and shapes, each interpolation and crop. Catches a filter
    without antialiasing, float instead of Pillow's fixed-point weights, round-half-up crop anchors,
    greyscale/palette/alpha decoding that differs from ``convert("RGB")``."""
    folder = tmp_path / "folder"
    shutil.copytree(folders["fp32"], folder)
    manifest = read_manifest(folder)
    prep = Preprocessing(SIZE, crop_pct, interpolation, tuple(manifest["preprocessing"]["mean"]),
                         tuple(manifest["preprocessing"]["std"]))
    manifest["preprocessing"].update(interpolation=interpolation, resize_shorter_side=prep.resize_size,
                                     crop_pct=crop_pct)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    saved = tmp_path / "input.bin"
    run_app(app, folder, *photos, "--save-input", saved, "--warmup", "0")
    expected = preprocess([load_image(path) for path in photos], prep)
    got = np.fromfile(saved, np.float32).reshape(expected.shape)
    assert np.array_equal(got, expected), [p.name for p, g, e in zip(photos, got, expected, strict=True)
                                           if not np.array_equal(g, e)]


def test_dynamic_batch_runs_all_images_in_one_call_and_static_in_chunks(app, folders, photos):
    """The dynamic-batch program takes the 8 images as one batch; the static one in 4 batches of 2;
    both give each image the same logits as running it alone (padding and chunking change nothing)."""
    dynamic, dynamic_results = app_logits(app, folders["fp32"], *photos)
    assert [r["batch"] for r in dynamic_results] == [len(photos)] * len(photos)
    static, static_results = app_logits(app, folders["int8"], *photos, "--runs", "3")
    assert [r["batch"] for r in static_results] == [2] * len(photos)
    assert all(r["latency_ms"]["runs"] == 3 and 0 < r["latency_ms"]["min"] <= r["latency_ms"]["median"]
               for r in static_results)
    alone, _ = app_logits(app, folders["fp32"], photos[3])
    np.testing.assert_allclose(alone[0], dynamic[3], rtol=0, atol=1e-5)
    alone, _ = app_logits(app, folders["int8"], photos[3])
    np.testing.assert_allclose(alone[0], static[3], rtol=0, atol=1e-5)


def broken_inputs(folders: dict[str, Path], tmp: Path) -> dict[str, tuple[list, str]]:
    text = tmp / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp / "truncated.jpg"
    truncated.write_bytes(sample_photo_paths()[0].read_bytes()[:2000])
    coreml = tmp / "coreml"
    coreml.mkdir()
    manifest = read_manifest(folders["fp32"]) | {"target": "coreml", "artifact": "model.mlpackage"}
    (coreml / "manifest.json").write_text(json.dumps(manifest))
    garbage = tmp / "garbage"
    shutil.copytree(folders["fp32"], garbage)
    (garbage / "model.pte").write_bytes(b"\0" * 64)
    odd = tmp / "odd.bin"
    odd.write_bytes(b"\0" * 100)
    photo = sample_photo_paths()[0]
    fp32 = folders["fp32"]
    return {
        "missing folder": ([tmp / "nowhere", photo], "does not exist"),
        "not an output folder": ([tmp, photo], "has no manifest.json"),
        "a Core ML folder": ([coreml, photo], "docs/deploy/ios.md"),
        "a program the runtime rejects": ([garbage, photo], "cannot load"),
        "missing image": ([fp32, tmp / "nope.png"], "does not exist"),
        "not an image": ([fp32, text], "neither JPEG nor PNG"),
        "truncated JPEG": ([fp32, truncated], "cannot decode JPEG"),
        "tensor of the wrong size": ([fp32, "--tensor", odd], "not a whole number"),
        "unknown option": ([fp32, photo, "--fast"], "unknown option --fast"),
        "bad --top": ([fp32, photo, "--top", "0"], "--top takes an integer"),
    }


def test_bad_inputs_are_one_line_errors(app, folders, tmp_path):
    """Each bad input: exit status 1, nothing on stdout, one ``error: ...`` line on stderr naming the
    problem (no runtime log lines, no abort)."""
    for case, (args, needle) in broken_inputs(folders, tmp_path).items():
        done = run_app(app, *args, check=False)
        lines = done.stderr.splitlines()
        assert done.returncode == 1, (case, done.returncode, done.stderr)
        assert done.stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), (case, done.stderr)
        assert needle in lines[0], (case, lines[0])


@pytest.mark.parametrize("name", TARGET_MODULES)
def test_each_target_names_its_next_step(name):
    """``mf-edge convert`` ends with the target's ``next_step``: it names the output folder and each guide
    or app it points to exists (catches a step pointing at a moved or missing page)."""
    text = get_target(name).next_step.format(output="OUT")
    assert "OUT" in text
    root = APP_SOURCE.parents[1]
    for word in text.replace(",", " ").replace(")", " ").replace(";", " ").split():
        if word.startswith(("docs/", "apps/")):
            assert (root / word.rstrip(".:")).exists(), word


def test_bench_measures_the_native_app_by_its_own_clock(app, folders, tmp_path, monkeypatch):
    """The bench's ``executorch (C++)`` worker: the app's own timed runs (as many as asked), its load time,
    and logits of every image equal to the Python runtime's (a static program's last chunk padded)."""
    from mf_edge.bench import native
    from mf_edge.bench.runner import Row, native_rows

    monkeypatch.setenv(native.APP_ENV, str(app))
    assert native.find_app() == app.resolve()
    executorch_row = Row("executorch", "executorch", "int8", "measured",
                         artifact=str(folders["int8"] / "model.pte"))
    assert [row.runtime for row in native_rows([executorch_row], native.find_app())] == [native.RUNTIME]
    assert native_rows([executorch_row], None) == []
    images = np.random.default_rng(1).standard_normal((5, 3, SIZE, SIZE)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    for precision, folder in folders.items():
        job = {"kind": native.KIND, "app": str(app), "output": str(folder), "threads": 1, "runs": 4,
               "warmup": 1, "batch": 4, "images": str(tmp_path / "images.npy"),
               "logits": str(tmp_path / f"{precision}.npy")}
        result = native.measure_native(job)
        assert result["runtime"] == native.RUNTIME and len(result["latency_ms"]) == 4
        assert result["load_ms"] > 0 and min(result["latency_ms"]) > 0 and len(result["batch_ms"]) == 3
        assert result["throughput_batch"] == (2 if precision == "int8" else 4)
        np.testing.assert_allclose(np.load(job["logits"]), python_logits(folder, images), rtol=0, atol=1e-5)
