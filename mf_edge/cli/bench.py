"""``mf-edge bench`` (every format's size, speed and fidelity) and ``mf-edge sensitivity`` (per layer)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from mf_edge.cli import app
from mf_edge.console import note, set_quiet

TABLE_WIDTH = 150  # the bench table's columns need this much, even when the output is not a terminal


def wide_console() -> Console:
    """A console at least ``TABLE_WIDTH`` wide (tables stay whole when piped to a file)."""
    console = Console()
    console.width = max(console.width, TABLE_WIDTH)
    return console


def split_list(value: str | None) -> tuple[str, ...] | None:
    """``"a,b c"`` -> ``("a", "b", "c")``; ``None`` stays ``None``."""
    if value is None:
        return None
    return tuple(part for chunk in value.split(",") for part in chunk.split() if part)


@app.command("bench")
def bench_command(
    model: str = typer.Argument(..., help="Zoo name, e.g. convformer_s18 (see `mf-edge models`)."),
    targets: str = typer.Option("executorch,onnx,coreml,tensorrt", "--target", "-t",
                                "--targets",
                                help="Comma-separated targets, each optionally as target:precision "
                                "(e.g. executorch:int8); PyTorch eager fp32 is always measured."),
    precisions: str = typer.Option(None, "--precision", "-p", "--precisions",
                                   help="Comma-separated precisions (default per target: ExecuTorch "
                                   "fp32,int8,w8; ONNX fp32,int8; Core ML, TensorRT fp16)."),
    weights: str = typer.Option("imagenet", "--weights", help="imagenet, random or a checkpoint path."),
    images: Path = typer.Option(None, "--images", help="Image folder for fidelity (and int8 calibration); "
                                "class subfolders give accuracy too (default: the parity sample images)."),
    num_images: int = typer.Option(32, "--num-images", help="Images for fidelity, balanced over classes."),
    calib_data: Path = typer.Option(None, "--calib-data", help="Calibration images for int8/w8 "
                                    "(default: --images)."),
    runs: int = typer.Option(50, "--runs", help="Timed runs per runtime (batch 1), after the warm-up."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed runs before timing."),
    rounds: int = typer.Option(1, "--rounds", help="Measure all runtimes round-robin this many times and "
                               "pool the timings (steadier numbers on a shared machine)."),
    threads: int = typer.Option(None, "--threads", help="Threads for every runtime (default: all cores)."),
    image_size: int = typer.Option(None, "--image-size", help="Input size (default: the model's)."),
    batch: int = typer.Option(8, "--batch-size", "--batch", help="Batch for the throughput measurement."),
    artifacts: Path = typer.Option(None, "--artifacts", help="Where converted artifacts are kept and reused "
                                   "(default: mf-edge-out/bench)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Convert again even where a matching artifact "
                                 "exists."),
    out: Path = typer.Option(None, "--out", help="JSON report (CSV and PNG beside it; default: "
                             "mf-edge-out/bench/<model>-<size>.json)."),
    seed: int = typer.Option(0, "--seed", help="Seed of random weights."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Size, load time, latency, throughput, peak memory and fidelity of every format, side by side.

    Example: mf-edge bench convformer_s18 --target executorch,onnx --images ~/data/val
    """
    from mf_edge.bench import BenchConfig, report, run_bench

    set_quiet(quiet)
    config = BenchConfig(model=model, targets=split_list(targets), precisions=split_list(precisions),
                         weights=weights, images=images, num_images=num_images, calib_data=calib_data,
                         runs=runs, warmup=warmup, rounds=rounds, threads=threads, image_size=image_size,
                         batch=batch, artifacts=artifacts, rebuild=rebuild, seed=seed)
    result = run_bench(config)
    path = out or (artifacts or Path("mf-edge-out") / "bench") / f"{model}-{result['image_size']}.json"
    written = report.write_all(result, path)
    table, notes = report.table(result)
    console = wide_console()
    console.print(table)
    for i, text in enumerate(notes, 1):
        console.print(f"[{i}] {text}", highlight=False, markup=False)
    note("wrote " + ", ".join(str(p) for p in written))


@app.command("sensitivity")
def sensitivity_command(
    model: str = typer.Argument(..., help="Zoo name, e.g. convformer_s18."),
    calib_data: Path = typer.Option(..., "--calib-data", help="Images to calibrate on and to measure with "
                                    "(a folder, class subfolders or not, or a text file of paths)."),
    target: str = typer.Option("executorch", "--target", "-t", help="Whose int8 scheme: executorch, onnx, "
                               "tensorrt or coreml."),
    weights: str = typer.Option("imagenet", "--weights", help="imagenet, random or a checkpoint path."),
    image_size: int = typer.Option(None, "--image-size", help="Input size (default: the model's)."),
    calib_size: int = typer.Option(32, "--calib-size", help="Images to calibrate on."),
    eval_size: int = typer.Option(32, "--eval-size", help="Further images the effects are measured on."),
    observer: str = typer.Option(None, "--observer", help="Activation observer: minmax, ema, percentile, "
                                 "mse (default) or entropy."),
    layers: list[str] = typer.Option(None, "--layers", help="Only layers matching these shell patterns."),
    max_drop: float = typer.Option(None, "--max-drop", help="Also choose the fewest worst layers to keep in "
                                   "float for a drop <= this (see --metric)."),
    metric: str = typer.Option("top1", "--metric", help="Drop metric: top1 (1 - top-1 agreement with float) "
                               "or cosine (1 - mean cosine)."),
    top: int = typer.Option(5, "--top", help="How many of the worst layers to suggest for --keep-float."),
    threads: int = typer.Option(None, "--threads", help="PyTorch threads (default: PyTorch's)."),
    out: Path = typer.Option(None, "--out", help="JSON report (default: mf-edge-out/sensitivity/"
                             "<model>-<target>.json)."),
    seed: int = typer.Option(0, "--seed", help="Seed of random weights and of the image sample."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Quantize one layer at a time with the target's int8 scheme and rank the layers by their effect.

    Example: mf-edge sensitivity convformer_s18 --calib-data ~/data/val --target executorch
    """
    import torch

    from mf_edge.bench.report import write_json
    from mf_edge.sensitivity import run_sensitivity, suggestion_table

    set_quiet(quiet)
    if threads:
        torch.set_num_threads(threads)
    result = run_sensitivity(model, str(calib_data), target, weights, image_size, calib_size, eval_size,
                             observer, layers or (), max_drop, metric, seed)
    path = out or Path("mf-edge-out") / "sensitivity" / f"{model}-{target}.json"
    write_json(result, path)
    console = wide_console()
    table, lines = suggestion_table(result, top)
    console.print(table)
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    note(f"wrote {path}")
