"""``mf-edge sensitivity``: per-layer int8 sensitivity of a zoo model, as a report and a table.

The algorithm (ranking, ``choose_keep_float``, ``convert --max-drop``) is
``mf_edge.calibration.sensitivity``; this module loads the model and images and formats the result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, replace

from mf_edge.calibration.schemes import matches_keep_float
from mf_edge.calibration.sensitivity import (  # noqa: F401  (re-exported for callers of the command module)
    BUDGET_EVAL_IMAGES,
    DROP_METRICS,
    KeepFloatChoice,
    LayerEffect,
    QuantizedVariants,
    budget_keep_float,
    choose_keep_float,
    drop_of,
    keep_float_for_budget,
    layer_of,
    layer_sensitivity,
    logits,
    smallest_prefix,
    sqnr_db,
)
from mf_edge.converters.prepare import prepare_for_target
from mf_edge.errors import UserError


def split_images(calib, eval_size: int):
    """``(calibration set, evaluation images)``: the last ``eval_size`` images held out (one at least)."""
    count = len(calib.files)
    if count < 2:
        raise UserError(f"sensitivity needs at least 2 images (calibration + evaluation), {calib.source} has "
                        f"{count}; pass a folder with more images to --calib-data.")
    held_out = min(eval_size, count // 2) if count < 2 * eval_size else eval_size
    keep = count - held_out
    return replace(calib, images=calib.images[:keep], files=calib.files[:keep]), calib.images[keep:]


def run_sensitivity(model_name: str, calib_data: str, target: str = "executorch", weights: str = "imagenet",
                    image_size: int | None = None, calib_size: int = 32, eval_size: int = 32,
                    observer: str | None = None, layers: Iterable[str] = (), max_drop: float | None = None,
                    metric: str = "top1", seed: int = 0) -> dict:
    """Per-layer sensitivity of ``model_name`` under ``target``'s int8 scheme (and a ``--max-drop`` choice).

    Returns the report: the ranking (worst first), the images used, and with ``max_drop`` the chosen
    ``keep_float`` layers.
    """
    from mf_edge.calibration.data import load_calibration_set
    from mf_edge.calibration.graph import capture
    from mf_edge.calibration.observers import DEFAULT_OBSERVER, observer_class
    from mf_edge.calibration.quantize import QuantizeOptions, calibrate_graph
    from mf_edge.calibration.schemes import scheme_for
    from mf_edge.console import step
    from mf_edge.converters import get_target
    from mf_edge.pipeline import load_model, make_spec

    if eval_size < 1 or calib_size < 1:
        raise UserError("--calib-size and --eval-size must be at least 1.")
    scheme = scheme_for(target, "int8")
    if not scheme.calibrated:
        raise UserError(f"the {target} int8 scheme has no calibrated activations; sensitivity needs one.")
    observer = observer or DEFAULT_OBSERVER
    observer_class(observer)
    model = load_model(model_name, weights, image_size=image_size, seed=seed)
    spec = make_spec(model, get_target(target), "int8", image_size)
    prepared = prepare_for_target(model, spec, get_target(target))
    calib, images = split_images(load_calibration_set(calib_data, spec.preprocessing, calib_size + eval_size,
                                                      seed), eval_size)
    with step(f"capture and calibrate ({scheme.name}, {observer}, {len(calib.files)} images)"):
        graph = capture(prepared, spec.image_size)
        stats = calibrate_graph(graph, [scheme], observer, calib, QuantizeOptions(target=target))
    with step("quantizing once, every layer switchable"):
        variants = QuantizedVariants(graph, scheme, observer, stats, spec.image_size, prepared)
    patterns = tuple(layers)
    names = [name for name in variants.layers if not patterns or matches_keep_float(name, patterns)]
    if not names:
        raise UserError(f"no quantized layer matches --layers {', '.join(patterns)}; layer names look like "
                        "'stages.0.0.mlp.fc1' (shell patterns).")
    reference = logits(graph, images)
    effects = layer_sensitivity(variants, names, images, reference)
    report = {"model": model_name, "target": target, "scheme": scheme.describe(), "observer": observer,
              "image_size": spec.image_size, "weights": model.mf_edge_weights,
              "calibration": calib.describe(), "evaluation_images": len(images),
              "layers": [asdict(effect) for effect in effects]}
    if max_drop is not None:
        choice = choose_keep_float(variants, [e.layer for e in effects], images, max_drop, metric,
                                   reference=reference)
        report["max_drop"] = choice.to_dict()
    return report


def suggestion_table(report: dict, top: int = 5):
    """The ranking as a rich table, and lines with the ``convert`` options it suggests."""
    from rich.table import Table

    table = Table(title=f"{report['model']} - {report['scheme']['name']} ({report['target']}), one layer "
                        f"quantized at a time, {report['evaluation_images']} held-out images")
    for column in ("rank", "layer", "SQNR dB", "cosine", "top-1 agr %"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for rank, effect in enumerate(report["layers"], 1):
        table.add_row(str(rank), effect["layer"], f"{effect['sqnr_db']:.1f}", f"{effect['cosine']:.6f}",
                      f"{100 * effect['top1_agreement']:.1f}")
    worst = [effect["layer"] for effect in report["layers"][:top]]
    command = f"mf-edge convert {report['model']} --target {report['target']} --precision int8"
    lines = [f"worst {len(worst)} in float: {command} " + " ".join(f"--keep-float {name}" for name in worst)]
    choice = report.get("max_drop")
    if choice:
        kept = choice["keep_float"]
        options = " ".join(f"--keep-float {name}" for name in kept)
        lines.append(f"--max-drop {choice['max_drop']} ({choice['metric']}): keep {len(kept)} layer(s) in "
                     f"float, drop {choice['drop']:.4f}: {command} {options}")
    return table, lines
