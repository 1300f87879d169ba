"""CIFAR-10: float fine-tuning, then int8 by PTQ and by QAT, measured in the real runtimes.

For each model: train from random init (offline here) on a class-balanced CIFAR-10 subset at a small
image size, then for each target convert to int8 twice through the conversion pipeline, once with
post-training calibration (PTQ) and once from a QAT checkpoint (``mf-edge train --qat``), and measure
top-1 of the float model (PyTorch) and of both int8 artifacts in the target's runtime (ExecuTorch's
XNNPACK, onnxruntime) on the same held-out CIFAR-10 test images. Prints a markdown table.

    python benchmarks/train_cifar.py --data /path/to/cifar10 --models convformer_s18 caformer_s18
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mf_edge import create_model
from mf_edge.console import set_quiet
from mf_edge.converters import get_target
from mf_edge.data import find_images, load_image, preprocess
from mf_edge.parity import reference_logits, runtime_logits
from mf_edge.pipeline import convert
from mf_edge.spec import ExportSpec
from mf_edge.train import TrainConfig, train
from mf_edge.train.checkpoint import load_checkpoint, read_qat_section


def make_subset(root: Path, out: Path, train_per_class: int, val_per_class: int) -> Path:
    """``out/{train,val}/<class>/`` symlinks: the first N images per class of CIFAR's train/ and test/."""
    for split, source, count in (("train", "train", train_per_class), ("val", "test", val_per_class)):
        for class_dir in sorted((root / source).iterdir()):
            target = out / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.iterdir())[:count]:
                link = target / image.name
                if not link.exists():
                    link.symlink_to(image.resolve())
    return out


def labelled_batch(folder: Path, spec: ExportSpec, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The eval-transformed images of an ImageFolder and their class indices."""
    found = find_images(folder)
    batch = preprocess([load_image(path) for path, _ in found], spec.preprocessing)
    return batch, np.array([classes.index(label) for _, label in found])


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean() * 100)


def int8_accuracy(model_name: str, weights: Path, target: str, args: argparse.Namespace, out: Path,
                  batch: np.ndarray, labels: np.ndarray, calib_data: Path) -> tuple[float, dict]:
    """Convert ``weights`` to int8 for ``target`` (PTQ, or QAT's learned ranges) and measure top-1 there."""
    model = create_model(model_name, weights=weights, image_size=args.image_size)
    ptq = None if read_qat_section(weights) else {"calib_data": calib_data, "calib_size": args.calib_size}
    conversion = convert(model, target, precision="int8", image_size=args.image_size, output=out, force=True,
                         ptq_options=ptq)
    spec = ExportSpec.for_model(model.mf_edge_info, args.image_size, precision="int8",
                                num_classes=model.num_classes)
    runtime = get_target(target).runtime(out, spec)
    logits = runtime_logits(runtime, batch, spec.batch_size, spec.dynamic_batch)
    return top1(logits, labels), conversion.manifest.get("quantization") or {}


def train_or_reuse(config: TrainConfig) -> tuple[Path, float]:
    """Train (continuing an interrupted run in the same folder, reusing a finished one); last.pt and
    training seconds."""
    last = config.output / "last.pt"
    if last.is_file():
        state = load_checkpoint(last)
        if state["meta"]["epoch"] + 1 >= config.epochs:  # finished: `train` refuses to resume it
            return last, sum(row["seconds"] for row in state["train"]["history"])
    result = train(replace(config, resume=last if last.is_file() else None))
    return result.last_checkpoint, sum(row["seconds"] for row in result.history)


def run_model(name: str, args: argparse.Namespace, data: Path, work: Path) -> list[dict]:
    common = {"model": name, "data": data, "image_size": args.image_size, "batch_size": args.batch_size,
              "workers": args.workers, "seed": args.seed, "device": args.device}
    float_weights, float_seconds = train_or_reuse(TrainConfig(
        **common, output=work / name / "float", epochs=args.epochs, lr=args.lr,
        warmup_epochs=args.warmup_epochs))
    model = create_model(name, weights=float_weights, image_size=args.image_size)
    spec = ExportSpec.for_model(model.mf_edge_info, args.image_size, num_classes=model.num_classes)
    classes = sorted(p.name for p in (data / "val").iterdir())
    batch, labels = labelled_batch(data / "val", spec, classes)
    float_top1 = top1(reference_logits(model, batch), labels)
    rows = []
    for target in args.targets:
        ptq_top1, _ = int8_accuracy(name, float_weights, target, args, work / name / f"ptq-{target}", batch,
                                    labels, data / "train")
        qat_weights, qat_seconds = train_or_reuse(TrainConfig(
            **common, output=work / name / f"qat-{target}", weights=str(float_weights),
            epochs=args.qat_epochs, lr=args.qat_lr, warmup_epochs=0.0, qat=True, target=target,
            calib_size=args.calib_size, freeze_observers_after=args.freeze_observers_after,
            max_steps_per_epoch=args.qat_steps))
        qat_top1, quantization = int8_accuracy(name, qat_weights, target, args,
                                               work / name / f"qat-{target}-int8", batch, labels,
                                               data / "train")
        gap = float_top1 - ptq_top1
        closed = (qat_top1 - ptq_top1) / gap * 100 if gap > 0 else float("nan")
        rows.append({"model": name, "target": target, "float": float_top1, "ptq": ptq_top1, "qat": qat_top1,
                     "gap_closed": closed, "float_train_s": float_seconds, "qat_train_s": qat_seconds,
                     "qat_source": (quantization.get("calibration") or {}).get("source")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], images: int) -> str:
    lines = ["| model | target | float top-1 (PyTorch) | int8 PTQ | int8 QAT | PTQ gap closed by QAT |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        closed = "n/a (no gap)" if np.isnan(r["gap_closed"]) else f"{r['gap_closed']:.0f}%"
        lines.append(f"| {r['model']} | {r['target']} | {r['float']:.2f}% | {r['ptq']:.2f}% "
                     f"| {r['qat']:.2f}% | {closed} |")
    lines.append(f"\ntop-1 on {images} CIFAR-10 test images; int8 numbers from the target's runtime.")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 root with train/ and test/")
    parser.add_argument("--models", nargs="+", default=["convformer_s18", "caformer_s18"])
    parser.add_argument("--targets", nargs="+", default=["executorch", "onnx"])
    parser.add_argument("--work", type=Path, default=Path("mf-edge-out/bench-train-cifar"))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-epochs", type=float, default=0.5)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--qat-steps", type=int, default=None, help="cap on QAT steps per epoch")
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--freeze-observers-after", type=float, default=0.5)
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="training device: cpu or cuda")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(args.quiet)
    data = make_subset(args.data, args.work / "data", args.train_per_class, args.val_per_class)
    started = time.perf_counter()
    rows = [row for name in args.models for row in run_model(name, args, data, args.work)]
    print(markdown(rows, args.val_per_class * 10))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; per run: "
          + ", ".join(f"{r['model']} float {r['float_train_s']:.0f} s / QAT-{r['target']} "
                      f"{r['qat_train_s']:.0f} s" for r in rows))
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
