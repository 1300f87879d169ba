"""``mf-edge calibrate``: calibrate once on images, save the ranges, export int8 to every target from them."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mf_edge.cli import app
from mf_edge.console import set_quiet


@app.command("calibrate")
def calibrate_command(
    model: str = typer.Argument(..., help="Zoo name, e.g. caformer_s18 (see `mf-edge models`)."),
    calib_data: Path = typer.Option(..., "--calib-data", help="Calibration images: an ImageFolder tree, a "
                                    "flat folder or a text file of image paths."),
    target: list[str] = typer.Option(None, "--target", "-t", help="Target to calibrate for (repeatable; "
                                     "default: every int8 target)."),
    calib_size: int = typer.Option(256, "--calib-size", help="Images to calibrate on (class-balanced "
                                   "sample)."),
    observer: str = typer.Option(None, "--observer", help="minmax, ema, percentile, mse (default) or "
                                 "entropy."),
    image_size: int = typer.Option(None, "--image-size", help="Input size, a multiple of 32 (default: the "
                                   "model's)."),
    weights: str = typer.Option("imagenet", "--weights", help="imagenet, random or a checkpoint path."),
    num_classes: int = typer.Option(None, "--num-classes", help="Classes of the head (default: the "
                                    "checkpoint's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --weights random and of the image sample."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when present)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per calibration batch."),
    output: Path = typer.Option(None, "--output", "-o", help="Calibration file (default: "
                                "mf-edge-out/<model>-<size>px-calibration.safetensors)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing calibration file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, only the result line."),
) -> None:
    """Run calibration images through the model once and save the activation ranges for `convert
    --calibration FILE` (int8 for every target without calibrating again).

    Example: mf-edge calibrate convformer_s18 --calib-data ~/data/val --calib-size 256
    """
    from mf_edge.calibration.calibrate import calibrate, save_new
    from mf_edge.calibration.observers import DEFAULT_OBSERVER
    from mf_edge.pipeline import load_model

    set_quiet(quiet)
    float_model = load_model(model, weights, image_size=image_size, seed=seed, num_classes=num_classes)
    record = calibrate(float_model, calib_data, target or None, image_size, calib_size,
                       observer or DEFAULT_OBSERVER, device, batch_size, seed)
    path = save_new(record, output, force)
    if not quiet:
        table = Table(title=f"calibration of {record.model} ({record.image_size}px, {record.observer}, "
                            f"{record.calibration_set['count']} images)")
        for column in ("targets", "observed nodes", "graph sha256"):
            table.add_column(column)
        for graph in record.graphs:
            table.add_row(", ".join(graph.targets), str(len(graph.stats)), graph.graph_sha256[:12])
        Console(stderr=True).print(table)
    Console().print(str(path), highlight=False, markup=False)
