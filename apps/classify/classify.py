"""Classify images with an mf-edge output folder, using only the artifact's runtime.

Needs numpy, Pillow and the runtime of the artifact: onnxruntime for ``model.onnx``, the ExecuTorch
runtime for ``model.pte`` (its Python bindings take torch tensors, so that path imports torch;
the ONNX path never does; ``apps/executorch_cpp`` runs a ``.pte`` without Python). A Core ML
package or a TensorRT engine runs on its device: the error says where (``docs/deploy/``).
Preprocessing, input shape and labels come from the folder's ``manifest.json`` and ``labels.txt``;
nothing of mf-edge is imported.

    python classify.py OUTPUT_DIR IMAGE [IMAGE ...] [--top 5] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
              "nearest": Image.Resampling.NEAREST}


def preprocess(path: Path, prep: dict) -> np.ndarray:
    """Shorter side to ``resize_shorter_side``, centre crop, scale, normalise: float32 ``[3, H, W]``."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    short = prep["resize_shorter_side"]
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    image = image.resize(size, RESAMPLING[prep["interpolation"]])
    crop = prep["center_crop"]
    left, top = int(round((size[0] - crop) / 2)), int(round((size[1] - crop) / 2))
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255
    mean, std = np.asarray(prep["mean"], np.float32), np.asarray(prep["std"], np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)


ELSEWHERE = {  # artifacts this demo does not run, and where they run
    ".mlpackage": "a Core ML package runs on a Mac or iPhone: see docs/deploy/ios.md",
    ".engine": "a TensorRT engine runs on the NVIDIA device that built it: mf-edge engine run, "
               "docs/deploy/jetson.md",
}
NATIVE_APP = "apps/executorch_cpp (build/mf-classify FOLDER IMAGE, no Python needed)"


def missing_runtime(artifact: str, exc: ImportError) -> SystemExit:
    """The one-line error for a runtime that is not installed: what to install, or the native app."""
    if artifact.endswith(".pte"):
        return SystemExit(f"error: the ExecuTorch Python runtime is not installed ({exc}); pip install "
                          "executorch (it brings torch, which its Python bindings need), or run the native "
                          f"app {NATIVE_APP}")
    return SystemExit(f"error: onnxruntime is not installed ({exc}); pip install onnxruntime")


def load_runtime(folder: Path, artifact: str):
    """A function running one batch of the artifact in its runtime."""
    path = folder / artifact
    if path.suffix in ELSEWHERE:
        raise SystemExit(f"error: {artifact} is not for this demo: {ELSEWHERE[path.suffix]}")
    if path.suffix not in (".onnx", ".pte"):
        raise SystemExit(f"error: this demo runs model.onnx or model.pte, not {artifact}")
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist; pass an output folder written by mf-edge convert")
    try:
        if path.suffix == ".onnx":
            import onnxruntime
        else:
            import torch  # the ExecuTorch Python runtime exchanges torch tensors
            from executorch.runtime import Runtime
    except ImportError as exc:
        raise missing_runtime(artifact, exc) from None
    if path.suffix == ".onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch})[0]
    method = Runtime.get().load_program(path).load_method("forward")
    return lambda batch: method.execute([torch.from_numpy(batch)])[0].numpy()


def run_batches(run, batch: np.ndarray, batch_size: int, dynamic: bool) -> np.ndarray:
    """The whole batch for a dynamic-batch artifact, else chunks of its batch size (last one padded)."""
    if dynamic:
        return run(batch)
    outputs = []
    for start in range(0, len(batch), batch_size):
        chunk = batch[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)])
        outputs.append(run(np.ascontiguousarray(padded))[:len(chunk)])
    return np.concatenate(outputs)


def classify(folder: Path, images: list[Path], top: int) -> list[dict]:
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise SystemExit(f"error: {folder} has no manifest.json; pass an output folder written by "
                         "mf-edge convert")
    manifest = json.loads(manifest_file.read_text())
    run = load_runtime(folder, manifest["artifact"])
    labels_file = folder / "labels.txt"
    labels = labels_file.read_text().splitlines() if labels_file.is_file() else None
    batch = np.stack([preprocess(path, manifest["preprocessing"]) for path in images])
    shape = manifest["input"]["shape"]
    logits = run_batches(run, batch, shape[0], manifest["input"]["dynamic_batch"])
    results = []
    for path, row in zip(images, logits, strict=True):
        exp = np.exp(row - row.max())
        probabilities = exp / exp.sum()
        best = np.argsort(-row)[:top]
        results.append({"image": str(path), "top": [
            {"index": int(i), "label": labels[i] if labels else f"class {i}",
             "probability": float(probabilities[i]), "logit": float(row[i])} for i in best]})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Classify images with an mf-edge output folder.")
    parser.add_argument("folder", type=Path, help="output folder of `mf-edge convert`")
    parser.add_argument("images", type=Path, nargs="+", help="images to classify")
    parser.add_argument("--top", type=int, default=5, help="classes per image")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    results = classify(args.folder, args.images, args.top)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        print(result["image"])
        for rank, entry in enumerate(result["top"], 1):
            print(f"  {rank}. {entry['label']:<30} {entry['probability']:.3f}  (logit {entry['logit']:.3f})")


if __name__ == "__main__":
    main()
