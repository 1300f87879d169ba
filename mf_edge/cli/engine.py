"""``mf-edge engine build`` / ``mf-edge engine run``: TensorRT engines, built and run on the device itself."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mf_edge.cli import app
from mf_edge.cli.convert import check_top
from mf_edge.console import note
from mf_edge.errors import UserError
from mf_edge.models.zoo import IMAGENET_MEAN, IMAGENET_STD, get_model_info
from mf_edge.paths import not_a_file

DEFAULT_MAX_BATCH = 8  # converters.tensorrt.DEFAULT_MAX_BATCH, not imported: it loads PyTorch

engine_app = typer.Typer(help="Build and run TensorRT engines (on the NVIDIA device that will run them).",
                         no_args_is_help=True)
app.add_typer(engine_app, name="engine")


@engine_app.command("build")
def build_command(
    onnx: Path = typer.Argument(..., help="The model.onnx written by `mf-edge convert --target tensorrt`."),
    precision: str = typer.Option("fp16", "--precision", help="fp16, int8 (needs a Q/DQ ONNX) or fp32."),
    workspace: int = typer.Option(None, "--workspace", help="Builder workspace limit in MiB (default: "
                                  "TensorRT's, the whole device memory)."),
    timing_cache: Path = typer.Option(None, "--timing-cache", help="Timing cache file, read if present and "
                                      "updated: rebuilds on the same device get faster."),
    max_batch: int = typer.Option(None, "--max-batch", help="Largest batch of a dynamic-batch ONNX "
                                  f"(default {DEFAULT_MAX_BATCH})."),
    output: Path = typer.Option(None, "--output", "-o", help="Engine path (default: beside the ONNX, "
                                ".engine)."),
) -> None:
    """Build a TensorRT engine from a TensorRT-ready ONNX on this GPU.

    Example: mf-edge engine build mf-edge-out/convformer_s18-224px-tensorrt-onnx-fp32/model.onnx
    """
    from mf_edge.converters.tensorrt.target import build_engine, plan_engine

    plan = plan_engine(onnx, precision, workspace, timing_cache, max_batch)
    target = output or onnx.with_suffix(".engine")
    facts = build_engine(plan, target)
    typing = ", strongly typed" if facts["strongly_typed"] else ""
    Console().print(f"built {target} ({facts['size_bytes'] / 2**20:.1f} MiB, {precision}{typing}, TensorRT "
                    f"{facts['tensorrt_version']} on {facts['device']}) in {facts['build_seconds']} s")


@engine_app.command("run")
def run_command(
    engine: Path = typer.Argument(..., help="A model.engine built on this device."),
    images: list[Path] = typer.Argument(None, help="Images to classify."),
    random: bool = typer.Option(False, "--random", help="Run a random batch instead of images."),
    repeat: int = typer.Option(10, "--repeat", help="Timed runs of the batch (after one warm-up)."),
    top: int = typer.Option(5, "--top", help="How many classes to print per image."),
    model: str = typer.Option(None, "--model", help="Zoo name whose eval transform to use (default: the "
                              "zoo's ImageNet one: bicubic, crop 1.0, ImageNet mean/std)."),
) -> None:
    """Run a TensorRT engine on images (or a random batch) and print the top classes and latency.

    Example: mf-edge engine run model.engine cat.jpg --model convformer_s18
    """
    import numpy as np

    from mf_edge.converters.tensorrt.target import TensorRTRuntime

    problem = not_a_file(engine)
    if problem:
        raise UserError(f"{engine} {problem}; build it with `mf-edge engine build model.onnx`.")
    check_top(top)
    if bool(images) == random:
        raise UserError("give either IMAGE paths or --random (not both, not neither).")
    for path in images or []:
        problem = not_a_file(path)
        if problem:
            raise UserError(f"image {path} {problem}; pass existing image files.")
    if model is not None:
        get_model_info(model)  # an unknown name fails here, before the engine loads
    runtime = TensorRTRuntime(engine)
    _, opt, high = runtime.batch_range
    batch_size = runtime.fixed_batch or opt  # a dynamic engine's random batch: the size it was tuned for
    if random:
        names = [f"random[{i}]" for i in range(batch_size)]
        shape = (batch_size, *runtime.input_shape[1:])
        batch = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    else:
        names, batch = [str(p) for p in images], _image_batch(images, runtime.input_shape[-1], model)
    if len(batch) > high:
        note(f"{len(batch)} images run in chunks of {high}, the engine's largest batch")
    logits = runtime.run(batch)
    timings = []
    for _ in range(max(1, repeat)):
        started = time.perf_counter()
        runtime.run(batch)
        timings.append(time.perf_counter() - started)
    _print_top(names, logits, top)
    Console().print(f"latency for {len(batch)} image(s): median {np.median(timings) * 1e3:.2f} ms "
                    f"over {len(timings)} runs")


def _image_batch(images: list[Path], image_size: int, model: str | None):
    """Images -> the eval transform (of ``model``, else the zoo's ImageNet one) -> normalised batch."""
    from mf_edge.data import load_image, preprocess
    from mf_edge.spec import ExportSpec, Preprocessing

    if model is not None:
        prep = ExportSpec.for_model(get_model_info(model), image_size=image_size).preprocessing
    else:
        prep = Preprocessing(image_size, 1.0, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    return preprocess([load_image(path) for path in images], prep)


def _print_top(names: list[str], logits, top: int) -> None:
    import numpy as np

    from mf_edge.labels import label_name, labels_for

    labels = labels_for(logits.shape[1])
    table = Table(title="top classes")
    for column in ("input", "rank", "class", "logit"):
        table.add_column(column)
    for name, row in zip(names, logits, strict=True):
        for rank, index in enumerate(np.argsort(-row)[:top], start=1):
            table.add_row(name if rank == 1 else "", str(rank), label_name(int(index), labels),
                          f"{row[index]:.3f}")
    Console().print(table)
