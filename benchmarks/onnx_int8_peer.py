"""mf-edge's ONNX int8 against onnxruntime's own quantizer, timed interleaved in one process.

For each model: mf-edge's fp32 and int8 ONNX (the conversion pipeline), and the peer: onnxruntime's
``quantize_static`` (QDQ, per-channel, U8S8) on mf-edge's fp32 ONNX with the same calibration images
(``mf_edge.converters.onnx.reference``). Every session gets the same thread count and is timed round-robin,
``--runs`` single-image inferences per session per round, so the noise of a shared machine falls on
all alike; medians and minimums over every run. Fidelity is against the float PyTorch model on the
evaluation images (worst-image and mean cosine, top-1 agreement). Also counts what onnxruntime's
optimizer makes of each graph (``ORT_ENABLE_EXTENDED``)::

    python benchmarks/onnx_int8_peer.py --calib-data cifar10/train --images cifar10/test \\
        --models convformer_s18 caformer_s18 --image-size 224 --threads 2 --rounds 5 --runs 20
"""

from __future__ import annotations

import argparse
import collections
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from mf_edge.calibration.data import load_calibration_set
from mf_edge.console import set_quiet
from mf_edge.converters import get_target
from mf_edge.converters.onnx.reference import ort_quantize_static
from mf_edge.converters.onnx.target import OnnxRuntime, float_gemms_on_int8_weights, optimized_graph
from mf_edge.data import parity_inputs
from mf_edge.parity import compare, reference_logits, runtime_logits
from mf_edge.pipeline import convert, load_model, make_spec

INT8_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger")


def fused_ops(path: Path, work: Path) -> str:
    """What onnxruntime's optimizer makes of ``path``: its int8 GEMMs and float GEMMs on int8 weights."""
    graph = optimized_graph(path, work / f"{path.parent.name}-optimized.onnx").graph
    counts = collections.Counter(node.op_type for node in graph.node)
    int8 = ", ".join(f"{counts[op]} {op}" for op in INT8_OPS if counts[op])
    return f"{int8 or 'no int8 op'}; {len(float_gemms_on_int8_weights(graph))} float on int8 weights"


def build(name: str, args: argparse.Namespace, work: Path) -> tuple[dict[str, Path], np.ndarray, np.ndarray]:
    """``{label: model.onnx}`` for one model, the evaluation batch and the float model's logits on it."""
    model = load_model(name, args.weights, image_size=args.image_size, seed=args.seed)
    spec = make_spec(model, get_target("onnx"), "fp32", args.image_size)
    paths = {}
    for precision in ("fp32", "int8"):
        ptq = {"calib_data": args.calib_data, "calib_size": args.calib_size} if precision == "int8" else None
        out = work / f"{name}-{precision}"
        convert(model, "onnx", precision, image_size=args.image_size, images=args.images, output=out,
                force=True, seed=args.seed, ptq_options=ptq)
        paths[f"mf-edge {precision}"] = out / "model.onnx"
    calib = load_calibration_set(args.calib_data, spec.preprocessing, args.calib_size, seed=0)
    peer = work / f"{name}-peer-int8" / "model.onnx"
    paths["peer int8 (ORT quantize_static)"] = ort_quantize_static(paths["mf-edge fp32"], peer,
                                                                   calib.images.numpy())
    batch = parity_inputs(spec, args.images).batch
    return paths, batch, reference_logits(model, batch)


def time_interleaved(sessions: dict[str, OnnxRuntime], image: np.ndarray, rounds: int, runs: int,
                     warmup: int) -> dict[str, list[float]]:
    """Single-image latencies in ms per session, sessions taking turns each round."""
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(image)
    for _ in range(rounds):
        for label, session in sessions.items():
            for _ in range(runs):
                start = time.perf_counter()
                session.run(image)
                times[label].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["convformer_s18", "caformer_s18"])
    parser.add_argument("--calib-data", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=None, help="evaluation images (default: parity's)")
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    set_quiet(True)
    import onnxruntime

    print(f"host: {platform.processor() or platform.machine()}, {args.threads} threads, onnxruntime "
          f"{onnxruntime.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory(prefix="onnx-int8-peer-") as tmp:
        work = Path(tmp)
        for name in args.models:
            paths, batch, float_logits = build(name, args, work)
            sessions = {label: OnnxRuntime(path, threads=args.threads) for label, path in paths.items()}
            times = time_interleaved(sessions, batch[:1], args.rounds, args.runs, args.warmup)
            base = float(np.median(times["mf-edge fp32"]))
            print(f"\n{name} {args.image_size} px, {args.rounds} rounds x {args.runs} runs, batch 1\n")
            print("| format | median ms | min ms | vs mf-edge fp32 | worst cosine | mean cosine | top-1 | "
                  "after onnxruntime's optimizer |")
            print("|---|---:|---:|---:|---:|---:|---:|---|")
            for label, session in sessions.items():
                fidelity = compare(float_logits, runtime_logits(session, batch, 1, False))
                median = float(np.median(times[label]))
                print(f"| {label} | {median:.1f} | {min(times[label]):.1f} | {median / base:.2f} | "
                      f"{fidelity['cosine']:.4f} | {fidelity['cosine_mean']:.4f} | "
                      f"{fidelity['top1_agreement']:.2f} | {fused_ops(paths[label], work)} |")


if __name__ == "__main__":
    main()
