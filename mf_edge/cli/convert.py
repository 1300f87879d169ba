"""``mf-edge convert``, ``mf-edge parity`` and ``mf-edge predict``: the pipeline from the command line."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mf_edge.cli import app
from mf_edge.console import set_quiet
from mf_edge.errors import UserError

PTQ_HELP = "PTQ (int8/w8 only): "


def ptq_options(precision: str, calibration: Path | None, calib_data: Path | None, calib_size: int,
                observer: str | None, keep_float: list[str] | None, max_drop: float | None) -> dict | None:
    """The PTQ options for ``quantize_for_export``; given for a float precision they are a ``UserError``."""
    given = {"calibration": calibration, "calib_data": calib_data, "observer": observer,
             "keep_float": keep_float or None, "max_drop": max_drop}
    if precision not in ("int8", "w8"):
        used = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
        if used:
            raise UserError(f"PTQ options ({', '.join(used)}) only apply to --precision int8 or w8, not "
                            f"{precision}; drop them or pick a quantized precision.")
        return None
    if calib_size <= 0:
        raise UserError(f"--calib-size must be at least 1, got {calib_size}.")
    return {"calibration": calibration, "calib_data": calib_data, "calib_size": calib_size,
            "observer": observer, "keep_float": list(keep_float or []), "max_drop": max_drop}


def check_top(top: int) -> None:
    """``--top`` counts classes to print: at least one."""
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}.")


def flag_of(option: str) -> str:
    """The ``convert`` flag of a target option: the target that takes it names it, else ``--<option>``."""
    from mf_edge.converters import get_target, target_names

    for name in target_names():
        flag = get_target(name).option_flags.get(option)
        if flag:
            return flag
    return f"--{option.replace('_', '-')}"


def target_options(target, **given) -> dict:
    """The target-specific options that were given; one for another target is a ``UserError``."""
    used = {name: value for name, value in given.items() if value not in (None, False)}
    wrong = [flag_of(name) for name in used if name not in target.options]
    if wrong:
        raise UserError(f"{', '.join(wrong)} do not apply to --target {target.name}; drop them.")
    return {name: str(value) if isinstance(value, Path) else value for name, value in used.items()}


@app.command("convert")
def convert_command(
    model: str = typer.Argument(..., help="Zoo name, e.g. caformer_s18 (see `mf-edge models`)."),
    target: str = typer.Option(..., "--target", "-t", help="coreml, executorch, onnx or tensorrt."),
    weights: str = typer.Option("imagenet", "--weights", help="imagenet, random or a checkpoint path."),
    precision: str = typer.Option(None, "--precision", "-p", help="fp32, fp16, int8 or w8 (default: Core ML "
                                  "fp16, ExecuTorch fp32, ONNX fp32, TensorRT fp16)."),
    image_size: int = typer.Option(None, "--image-size", help="Input size, a multiple of 32 (default: the "
                                   "model's)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Batch of the artifact's input."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Batch dimension left free."),
    images: Path = typer.Option(None, "--images", help="Folder of images for the parity check (default: "
                                "scikit-learn's sample photos + seeded noise)."),
    output: Path = typer.Option(None, "--output", "-o", help="Output folder (default: "
                                "mf-edge-out/<model>-<target>-<precision>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    seed: int = typer.Option(0, "--seed", help="Seed of --weights random."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, only the result line."),
    calibration: Path = typer.Option(None, "--calibration", help=PTQ_HELP + "saved calibration file."),
    calib_data: Path = typer.Option(None, "--calib-data", help=PTQ_HELP + "folder of calibration images."),
    calib_size: int = typer.Option(256, "--calib-size", help=PTQ_HELP + "calibration images to use."),
    observer: str = typer.Option(None, "--observer", help=PTQ_HELP + "activation observer: minmax, ema, "
                                 "percentile, mse (default) or entropy."),
    keep_float: list[str] = typer.Option(None, "--keep-float", help=PTQ_HELP + "module name pattern left in "
                                         "float (repeatable)."),
    max_drop: float = typer.Option(None, "--max-drop", help=PTQ_HELP + "largest accepted drop in "
                                   "top-1 agreement with the float model (0.01 = 1%) on held-out --calib-data"
                                   " images; the fewest worst layers stay float."),
    classifier: bool = typer.Option(False, "--classifier", help="Core ML: a classifier (classLabel + "
                                    "per-label logits) instead of a logits output."),
    deployment_target: str = typer.Option(None, "--deployment-target", help="Core ML: minimum deployment "
                                          "target, e.g. iOS16, iOS17 (default), macOS14."),
    workspace: int = typer.Option(None, "--workspace", help="TensorRT: builder workspace limit in MiB."),
    timing_cache: Path = typer.Option(None, "--timing-cache", help="TensorRT: timing cache file (read and "
                                      "updated)."),
    max_batch: int = typer.Option(None, "--max-batch", help="TensorRT: largest batch of the --dynamic-batch "
                                  "profile."),
) -> None:
    """Convert a model for a target, verify it in the target's runtime and publish the output folder.

    Example: mf-edge convert convformer_s18 --target coreml --weights random
    """
    from mf_edge.converters import get_target
    from mf_edge.pipeline import convert

    set_quiet(quiet)
    chosen = get_target(target)
    ptq = ptq_options(precision or chosen.default_precision, calibration, calib_data, calib_size, observer,
                      keep_float, max_drop)
    options = target_options(chosen, classifier=classifier, minimum_deployment_target=deployment_target,
                             workspace_mib=workspace, timing_cache=timing_cache, max_batch=max_batch)
    result = convert(model, target, precision=precision, weights=weights, image_size=image_size,
                     batch_size=batch_size, dynamic_batch=dynamic_batch, images=images, output=output,
                     force=force, seed=seed, target_options=options, ptq_options=ptq)
    Console().print(f"{result.artifact}  ({end_note(result.parity, result.manifest, quiet)})",
                    highlight=False, markup=False)
    Console().print(chosen.next_step.format(output=result.output), highlight=False, markup=False)


def runtime_words() -> dict[str, str]:
    """How the result line names a runtime: every target's ``Target.runtime_words``."""
    from mf_edge.converters import get_target, target_names

    return {runtime: words for name in target_names()
            for runtime, words in get_target(name).runtime_words.items()}


def end_note(report: dict, manifest: dict, quiet: bool) -> str:
    """What the result line says about parity: where it ran, why not, and whether the weights were random.

    A reason already printed by the notes above (not ``quiet``) is not repeated.
    """
    from mf_edge.parity import FALLBACK

    status = report["status"]
    if status == "not run":
        text = f"parity not run here: {report['reason']}" if quiet else "parity not run here (why: above)"
        if FALLBACK in report:
            text += f"; its ONNX: {report[FALLBACK]['status']} in {report[FALLBACK].get('runtime')}"
    else:
        runtime = report.get("runtime")
        text = f"parity {status} in {runtime_words().get(runtime, runtime)}"
        if status != "pass":
            text += f", {report['reason']}"
    if (manifest.get("weights") or {}).get("source") == "random":
        text += "; random weights: the predictions mean nothing"
    return text


def _parity_table(report: dict) -> Table:
    from mf_edge.parity import number

    table = Table(title=f"parity: {report['status']} ({report['runtime']}, {report['precision']}, "
                        f"{report['inputs']['count']} images)")
    for column in ("reference", "cosine (min)", "top-1", "top-5", "max abs err", "mean abs err", "enforced"):
        table.add_column(column, justify="left" if column == "reference" else "right")
    for name, result in report["references"].items():
        m = result["metrics"]
        table.add_row(name, number(m["cosine"], ".6f"), number(m["top1_agreement"], ".1%"),
                      number(m["top5_overlap"], ".1%"), number(m["max_abs_error"], ".3e"),
                      number(m["mean_abs_error"], ".3e"),
                      ("pass" if result["passed"] else "FAIL") if result["enforced"] else "-")
    return table


@app.command("parity")
def parity_command(
    output_dir: Path = typer.Argument(..., help="An output folder written by `mf-edge convert`."),
    images: Path = typer.Option(None, "--images", help="Folder of images (default: the convert defaults)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress."),
) -> None:
    """Re-run the parity check of an existing artifact against the float model it was made from.

    Example: mf-edge parity mf-edge-out/convformer_s18-224px-onnx-fp32
    """
    from mf_edge import parity as parity_lib
    from mf_edge.manifest import strict_json
    from mf_edge.pipeline import recheck

    set_quiet(quiet)
    report = recheck(output_dir, images)
    console = Console()
    if as_json:
        console.print_json(strict_json(report))
    elif report["status"] == parity_lib.NOT_RUN:
        console.print(parity_lib.summary(report), highlight=False)
    else:
        console.print(_parity_table(report))
    parity_lib.raise_on_failure(report, str(output_dir))


@app.command("predict")
def predict_command(
    output_dir: Path = typer.Argument(..., help="An output folder written by `mf-edge convert`."),
    images: list[Path] = typer.Argument(..., help="Images to classify."),
    top: int = typer.Option(5, "--top", help="Classes to print per image."),
) -> None:
    """Classify images with a converted artifact, in its own runtime: top classes with their names.

    Example: mf-edge predict mf-edge-out/convformer_s18-224px-onnx-fp32 cat.jpg
    """
    from mf_edge.pipeline import predict

    check_top(top)
    for path, classes in zip(images, predict(output_dir, images, top), strict=True):
        table = Table(title=str(path), title_justify="left")
        for column in ("#", "class", "probability", "logit"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for rank, (name, probability, logit) in enumerate(classes, 1):
            table.add_row(str(rank), name, f"{probability:.3f}", f"{logit:.3f}")
        Console().print(table)

