"""mf-edge's ONNX int8 against onnxruntime's own quantizer, timed interleaved in one process.

For each model: mf-edge's fp32 and int8 ONNX (the conversion pipeline); onnxruntime's
``quantize_static`` (QDQ, per-channel, U8S8) on mf-edge's fp32 ONNX with the same calibration images
(``mf_edge.converters.onnx.reference``); and, where timm has the model, the route a user takes without
mf-edge: timm's model (random weights) -> ``torch.onnx.export`` -> onnxruntime, fp32 and
``quantize_static`` on the same images (``--peers none`` leaves both peers out). Every session gets
the same thread count and is timed round-robin, ``--runs`` single-image inferences per session per
round, so the noise of a shared machine falls on all alike; medians and minimums over every run, and
each row's median ratio to mf-edge fp32 within each round (``vs fp32``: the median over rounds).
Fidelity is against the row's own float PyTorch model on the evaluation images (worst-image and mean
cosine, top-1 agreement). Also counts what onnxruntime's optimizer makes of each graph
(``ORT_ENABLE_EXTENDED``)::

    python benchmarks/onnx_int8_peer.py --calib-data cifar10/train --images cifar10/test \\
        --models convformer_s18 caformer_s18 --image-size 224 --threads 2 --rounds 5 --runs 20
"""

from __future__ import annotations

import argparse
import collections
import os
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


def timm_onnx(name: str, image_size: int, seed: int, path: Path):
    """timm's ``name`` (random weights, eval) exported by ``torch.onnx.export``: the path and the model."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.zeros(1, 3, image_size, image_size),), str(path), input_names=["image"],
                      output_names=["logits"], opset_version=18, dynamo=True, external_data=False)
    return path, model


def build(name: str, args: argparse.Namespace, work: Path) -> tuple[dict[str, tuple[Path, np.ndarray]],
                                                                    np.ndarray]:
    """``{label: (model.onnx, its float model's logits)}`` for one model, and the evaluation batch."""
    model = load_model(name, args.weights, image_size=args.image_size, seed=args.seed)
    spec = make_spec(model, get_target("onnx"), "fp32", args.image_size)
    batch = parity_inputs(spec, args.images).batch
    logits = reference_logits(model, batch)
    routes = {}
    for precision in ("fp32", "int8"):
        ptq = {"calib_data": args.calib_data, "calib_size": args.calib_size} if precision == "int8" else None
        out = work / f"{name}-{precision}"
        convert(model, "onnx", precision, image_size=args.image_size, images=args.images, output=out,
                force=True, seed=args.seed, ptq_options=ptq)
        routes[f"mf-edge {precision}"] = (out / "model.onnx", logits)
    if args.peers == "none":
        return routes, batch
    images = load_calibration_set(args.calib_data, spec.preprocessing, args.calib_size, seed=0).images.numpy()
    routes["ORT quantize_static of mf-edge fp32"] = (ort_quantize_static(
        routes["mf-edge fp32"][0], work / f"{name}-ort-int8" / "model.onnx", images), logits)
    import timm

    if name in timm.list_models(name):
        path, peer = timm_onnx(name, args.image_size, args.seed, work / f"{name}-timm-fp32" / "model.onnx")
        peer_logits = reference_logits(peer, batch)
        routes["peer: timm -> torch.onnx fp32"] = (path, peer_logits)
        routes["peer: timm -> torch.onnx -> quantize_static"] = (ort_quantize_static(
            path, work / f"{name}-timm-int8" / "model.onnx", images), peer_logits)
    return routes, batch


def time_interleaved(sessions: dict[str, OnnxRuntime], image: np.ndarray, rounds: int, runs: int,
                     warmup: int) -> dict[str, list[list[float]]]:
    """Single-image latencies in ms per session and round, sessions taking turns each round."""
    times: dict[str, list[list[float]]] = {label: [] for label in sessions}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(image)
    for _ in range(rounds):
        for label, session in sessions.items():
            times[label].append([])
            for _ in range(runs):
                start = time.perf_counter()
                session.run(image)
                times[label][-1].append((time.perf_counter() - start) * 1e3)
    return times


def ratio_to(times: dict[str, list[list[float]]], label: str, base: str) -> float:
    """The median over rounds of ``label``'s median divided by ``base``'s median in the same round."""
    return float(np.median([np.median(mine) / np.median(theirs)
                            for mine, theirs in zip(times[label], times[base], strict=True)]))


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
    parser.add_argument("--peers", choices=("all", "none"), default="all",
                        help="none: mf-edge fp32 and int8 only (the int8-vs-fp32 check of every family)")
    args = parser.parse_args()
    set_quiet(True)
    import onnxruntime

    print(f"host: {platform.processor() or platform.machine()}, {args.threads} threads, onnxruntime "
          f"{onnxruntime.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory(prefix="onnx-int8-peer-") as tmp:
        work = Path(tmp)
        for name in args.models:
            routes, batch = build(name, args, work)
            sessions = {label: OnnxRuntime(path, threads=args.threads) for label, (path, _) in routes.items()}
            times = time_interleaved(sessions, batch[:1], args.rounds, args.runs, args.warmup)
            print(f"\n{name} {args.image_size} px, {args.rounds} rounds x {args.runs} runs, batch 1, "
                  f"ended {time.strftime('%H:%M UTC', time.gmtime())}, load average "
                  f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
            print("| format | median ms | min ms | vs mf-edge fp32 (per round) | worst cosine | "
                  "mean cosine | top-1 | after onnxruntime's optimizer |")
            print("|---|---:|---:|---:|---:|---:|---:|---|")
            for label, session in sessions.items():
                path, float_logits = routes[label]
                fidelity = compare(float_logits, runtime_logits(session, batch, 1, False))
                every = [t for round_times in times[label] for t in round_times]
                print(f"| {label} | {np.median(every):.1f} | {min(every):.1f} | "
                      f"{ratio_to(times, label, 'mf-edge fp32'):.2f} | "
                      f"{fidelity['cosine']:.4f} | {fidelity['cosine_mean']:.4f} | "
                      f"{fidelity['top1_agreement']:.2f} | {fused_ops(path, work)} |", flush=True)


if __name__ == "__main__":
    main()
