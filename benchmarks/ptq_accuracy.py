"""PTQ accuracy per target and precision: artifact size, top-1 accuracy and agreement with the float model.

Takes a checkpoint fine-tuned on the evaluation data (``mf-edge train``; ``--weights random`` runs
but its accuracy means nothing) and an ImageFolder with labels. Calibrates once per target on
``--calib-data`` (by default the ``train/`` folder beside ``--data``), quantizes and exports through
the conversion pipeline's own steps, runs every artifact in its target's runtime on the same
class-balanced sample of ``--data`` and prints a markdown table::

    python benchmarks/ptq_accuracy.py --data cifar10/test --model identityformer_s12 \\
        --weights best.pt --num-classes 10 --image-size 32 --limit 500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mf_edge.calibration.data import load_calibration_set
from mf_edge.console import note, set_quiet
from mf_edge.converters import get_target
from mf_edge.errors import RuntimeUnavailable
from mf_edge.parity import compare, reference_logits, runtime_logits
from mf_edge.pipeline import export, load_model, make_spec, quantize
from mf_edge.spec import ExportSpec

PRECISIONS = ("int8", "w8")


def artifact_bytes(files: list[Path]) -> int:
    """Bytes of the exported artifact (a package folder counts its files)."""
    total = 0
    for path in files:
        paths = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        total += sum(p.stat().st_size for p in paths)
    return total


def runtime_for(target, out_dir: Path, spec):
    """The target's own runtime, else its ONNX in onnxruntime (TensorRT without a GPU), else None."""
    try:
        return target.runtime(out_dir, spec), None
    except RuntimeUnavailable as exc:
        if target.has_fallback_runtime:
            return target.fallback_runtime(out_dir, spec), f"onnxruntime ({exc})"
        return None, str(exc)


def evaluate(args: argparse.Namespace) -> tuple[list[dict], int]:
    """One row per artifact (plus the float model); and the number of evaluation images."""
    model = load_model(args.model, args.weights, image_size=args.image_size, num_classes=args.num_classes)
    calib_data = args.calib_data or _sibling_train(Path(args.data))
    rows = []
    fp32_bytes = sum(4 * p.numel() for p in model.parameters())
    preprocessing = ExportSpec.for_model(model.mf_edge_info, image_size=args.image_size).preprocessing
    data = load_calibration_set(args.data, preprocessing, args.limit, seed=1)
    if data.labels is None:
        raise SystemExit(f"{args.data} has no class folders; pass an ImageFolder with labels to --data.")
    batch, labels = data.images.numpy(), data.labels.numpy()
    float_logits = reference_logits(model, batch)
    rows.append({"target": "pytorch", "precision": "fp32", "bytes": fp32_bytes, "runtime": "pytorch",
                 "accuracy": float((float_logits.argmax(1) == labels).mean()), "agreement": 1.0,
                 "cosine_mean": 1.0, "seconds": 0.0})
    note(f"float accuracy {rows[0]['accuracy']:.1%} on {len(labels)} images")
    for target_name in args.targets:
        target = get_target(target_name)
        for precision in args.precisions:
            if precision not in target.schemes or precision not in target.precisions:
                continue
            started = time.perf_counter()
            spec = make_spec(model, target, precision, args.image_size)
            ptq = {"calib_data": calib_data, "calib_size": args.calib_size, "observer": args.observer}
            quantized = quantize(model, spec, target, ptq if precision == "int8" else {})
            with tempfile.TemporaryDirectory() as tmp:
                result = export(target, quantized.module, spec, Path(tmp))
                runtime, reason = runtime_for(target, Path(tmp), spec)
                if runtime is None:
                    note(f"{target_name} {precision}: not run ({reason})")
                    continue
                logits = runtime_logits(runtime, batch, spec.batch_size, spec.dynamic_batch)
                size = artifact_bytes([f for f in result.files if f.name == target.artifact] or result.files)
            metrics = compare(float_logits, logits)
            rows.append({"target": target_name, "precision": precision, "bytes": size,
                         "runtime": getattr(runtime, "name", target_name) + (" (onnx)" if reason else ""),
                         "accuracy": float((logits.argmax(1) == labels).mean()),
                         "agreement": metrics["top1_agreement"], "cosine_mean": metrics["cosine_mean"],
                         "seconds": time.perf_counter() - started})
    return rows, len(labels)


def _sibling_train(data: Path) -> Path:
    train = data.parent / "train"
    if train.is_dir() and train != data:
        return train
    note(f"no train/ folder beside {data}: calibrating on the evaluation images themselves")
    return data


def table(rows: list[dict], fp32_bytes: int) -> str:
    lines = ["| target | precision | runtime | size (MB) | size vs fp32 | top-1 accuracy | top-1 agreement "
             "with float | mean cosine vs float |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['target']} | {row['precision']} | {row['runtime']} | "
                     f"{row['bytes'] / 1e6:.1f} | {row['bytes'] / fp32_bytes:.0%} | {row['accuracy']:.1%} | "
                     f"{row['agreement']:.1%} | {row['cosine_mean']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="labelled ImageFolder to evaluate on (cifar10/test)")
    parser.add_argument("--calib-data", default=None, help="calibration images (default: train/ by --data)")
    parser.add_argument("--model", default="identityformer_s12")
    parser.add_argument("--weights", default="random", help="checkpoint fine-tuned on --data's classes")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--limit", type=int, default=500, help="evaluation images (class-balanced sample)")
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--observer", default="mse")
    parser.add_argument("--targets", nargs="+", default=["executorch", "onnx", "coreml", "tensorrt"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_quiet(True)
    rows, count = evaluate(args)
    print(f"\n{args.model} ({args.weights}), {args.image_size or 'default'} px, {count} images of "
          f"{args.data}, observer {args.observer}, {args.calib_size} calibration images\n")
    print(table(rows, rows[0]["bytes"]))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
