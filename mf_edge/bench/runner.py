"""``run_bench``: every format of one model, made by the conversion pipeline, measured side by side.

For each target and precision the artifact comes from ``mf_edge.pipeline.convert`` (reused from
the artifacts folder when its manifest matches the request); each runtime that can run here,
plus PyTorch eager fp32 as the reference, is measured in a fresh process
(``mf_edge.bench.measure``) with the same thread count, images and run counts. With ``rounds > 1``
the runtimes are measured round-robin that many times and their timings pooled, which spreads the
noise of a shared machine over all of them alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mf_edge import parity as parity_lib
from mf_edge.bench import native
from mf_edge.bench.images import BenchImages, bench_images
from mf_edge.bench.measure import PYTORCH, latency_stats
from mf_edge.console import note, step
from mf_edge.converters import get_target
from mf_edge.errors import UserError
from mf_edge.models.zoo import get_model_info
from mf_edge.pipeline import QUANTIZED_PRECISIONS, default_output, make_spec, prepare_for_target

# Benchmarked when --targets is not given (each target's own ``bench`` facts say the rest: the
# precisions it is benchmarked in, its runtime's name, dynamic batch, size only, native app, reference).
DEFAULT_TARGETS = ("executorch", "onnx", "coreml", "tensorrt")
REFERENCE_STATUS = "reference"  # a target's bench reference row: measured like the others, marked here
DEFAULT_ARTIFACTS = Path("mf-edge-out") / "bench"
WORKER_TIMEOUT_S = 3600
# Manifest target details worth repeating in the bench report.
DETAIL_KEYS = ("delegation", "rewrites")


@dataclass
class BenchConfig:
    """One ``mf-edge bench`` request."""

    model: str
    targets: tuple[str, ...] = DEFAULT_TARGETS
    precisions: tuple[str, ...] | None = None
    weights: str = "imagenet"
    images: Path | None = None
    num_images: int = 32
    calib_data: Path | None = None
    runs: int = 50
    warmup: int = 5
    rounds: int = 1
    threads: int | None = None
    image_size: int | None = None
    batch: int = 8
    artifacts: Path | None = None
    rebuild: bool = False
    seed: int = 0

    def check(self) -> None:
        """Raise ``UserError`` for values no run can use."""
        for name in ("num_images", "runs", "rounds", "batch"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.warmup < 0:
            raise UserError(f"--warmup must be 0 or more, got {self.warmup}.")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}.")
        for target in self.targets:
            get_target(target.partition(":")[0])


@dataclass
class Row:
    """One format: what it is, where it came from, and (when it ran) what was measured."""

    runtime: str
    target: str | None
    precision: str
    status: str
    note: str | None = None
    artifact: str | None = None
    size_mb: float | None = None
    parity: str | None = None
    details: dict = field(default_factory=dict)
    measured: list[dict] = field(default_factory=list, repr=False)


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def host_facts() -> dict:
    """CPU, cores, OS and the load when asked (the machine may be shared)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": available_cores(), "os": platform.platform(),
            "python": platform.python_version(), "load_average": load_average()}


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (how busy a shared machine was)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def plan(config: BenchConfig) -> list[tuple[str, str]]:
    """``(target, precision)`` pairs to benchmark.

    A target given as ``name:precision`` is benchmarked in that precision only; a plain name in the
    requested precisions it supports (default: the target's ``bench.precisions``).
    """
    pairs = []
    for entry in config.targets:
        name, _, fixed = entry.partition(":")
        target = get_target(name)
        defaults = target.bench.precisions or (target.default_precision,)
        wanted = (fixed,) if fixed else config.precisions or defaults
        if fixed and fixed not in target.precisions:
            raise UserError(f"the {name} target supports {', '.join(target.precisions)}, not {fixed!r}; fix "
                            f"--targets {entry}.")
        pairs += [(name, precision) for precision in wanted if precision in target.precisions]
    if not pairs:
        raise UserError(f"no target among {', '.join(config.targets)} supports "
                        f"{', '.join(config.precisions or ())}; pick other --targets or --precisions.")
    return pairs


def artifact_dir(config: BenchConfig, image_size: int, target: str, precision: str) -> Path:
    root = config.artifacts or DEFAULT_ARTIFACTS
    return root / f"{config.model}-{image_size}-{target}-{precision}"


def converted_output(model, image_size: int, target: str, precision: str) -> Path:
    """Where ``mf-edge convert`` publishes this request by default (``pipeline.default_output``)."""
    chosen = get_target(target)
    spec = make_spec(model, chosen, precision, image_size=image_size)
    return default_output(spec, chosen, model.mf_edge_weights)


def reusable(output: Path, model, image_size: int, target: str, precision: str, dynamic: bool,
             calib_data: Path | None = None) -> bool:
    """Whether ``output`` holds a published conversion of exactly this request, made with today's
    deployment rewrites (and for int8/w8: the same calibration images and today's quantization scheme)."""
    from mf_edge.manifest import read_manifest

    try:
        manifest = read_manifest(output)
    except UserError:
        return False
    spec, weights = manifest.get("spec", {}), manifest.get("weights", {})
    ours = model.mf_edge_weights
    return (manifest.get("model", {}).get("name") == model.mf_edge_info.name
            and manifest.get("target") == target and spec.get("precision") == precision
            and spec.get("image_size") == image_size
            and bool(spec.get("dynamic_batch")) == dynamic and weights.get("sha256") == ours.get("sha256")
            and weights.get("seed") == ours.get("seed")
            and same_quantization(manifest.get("quantization"), target, precision, calib_data)
            and manifest.get("rewrites") == todays_rewrites(model, image_size, target, precision, dynamic))


def todays_rewrites(model, image_size: int, target: str, precision: str, dynamic: bool) -> dict:
    """What ``convert`` would record as ``rewrites`` for this request with this version's code."""
    chosen = get_target(target)
    spec = make_spec(model, chosen, precision, image_size=image_size, dynamic_batch=dynamic)
    return json.loads(json.dumps(prepare_for_target(model, spec, chosen).mf_edge_rewrites))


def same_quantization(quantization: dict | None, target: str, precision: str,
                      calib_data: Path | None) -> bool:
    """A manifest's ``quantization`` was made from ``calib_data`` with the scheme ``target`` uses now."""
    if quantization is None:
        return precision not in QUANTIZED_PRECISIONS
    from mf_edge.calibration.schemes import scheme_for

    current = json.loads(json.dumps(scheme_for(target, precision).describe()))
    recorded_images = (quantization.get("options") or {}).get("calib_data")
    wanted_images = str(calib_data) if calib_data else None
    return quantization.get("scheme") == current and recorded_images == wanted_images


def size_mb(path: Path) -> float:
    """Size of a file, or of everything in a folder (``.mlpackage``), in MB (10^6 bytes)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
    return path.stat().st_size / 1e6


def make_artifact(config: BenchConfig, model, image_size: int, target: str, precision: str) -> Row:
    """Convert (or reuse) one format through the pipeline; a failure becomes the row's note."""
    from mf_edge.pipeline import convert

    output = artifact_dir(config, image_size, target, precision)
    facts = get_target(target).bench
    dynamic = facts.dynamic_batch
    runtime = facts.runtime_name or target
    calib_data = config.calib_data or config.images if precision in QUANTIZED_PRECISIONS else None
    converted = converted_output(model, image_size, target, precision)  # `mf-edge convert`'s own folder
    if not config.rebuild and reusable(converted, model, image_size, target, precision, dynamic, calib_data):
        output = converted
        note(f"reusing {output}")
    elif not config.rebuild and reusable(output, model, image_size, target, precision, dynamic, calib_data):
        note(f"reusing {output}")
    else:
        ptq = {"calib_data": calib_data} if calib_data else None
        try:
            convert(model, target, precision, image_size=image_size, dynamic_batch=dynamic,
                    images=config.images, output=output, force=True, seed=config.seed, ptq_options=ptq)
        except UserError as exc:
            status = "not runnable here" if type(exc).__name__ == "RuntimeUnavailable" else "failed"
            return Row(runtime, target, precision, status, note=str(exc))
    from mf_edge.manifest import read_manifest

    manifest = read_manifest(output)
    artifact = output / manifest["artifact"]
    parity = manifest.get("parity", {}).get("status")
    status, reason = "measured", None
    if not artifact.exists():
        return Row(runtime, target, precision, "not runnable here", parity=parity,
                   note=(manifest.get("parity") or {}).get("reason") or f"{artifact.name} was not built here")
    if facts.size_only:
        status, reason = "size only", facts.size_only
    elif parity == "not run":  # the conversion could not run its own runtime here (TensorRT without a GPU)
        status = "not runnable here"
        reason = f"{manifest['parity'].get('reason')} (size: {artifact.name})"
    details = {key: value for key, value in (manifest.get("details") or {}).items() if key in DETAIL_KEYS}
    if manifest.get("quantization"):
        kept = ("scheme", "keep_float", "kept_float_layers")
        details["quantization"] = {key: manifest["quantization"][key] for key in kept
                                   if key in manifest["quantization"]}
    return Row(runtime, target, precision, status, note=reason, artifact=str(artifact),
               size_mb=size_mb(artifact), parity=parity, details=details)


def reference_row(config: BenchConfig, model, image_size: int, rows: list[Row], target: str) -> Row:
    """The target's ``bench.reference`` (ONNX: onnxruntime's own ``quantize_static`` on mf-edge's fp32
    ONNX), built from its ``source_precision`` artifact with the calibration images mf-edge's int8 uses:
    a reference row, not an mf-edge format."""
    from mf_edge.calibration.data import DEFAULT_CALIB_SIZE

    chosen = get_target(target)
    reference = chosen.bench.reference
    source = reference.source_precision
    fp32 = next((row for row in rows if row.target == target and row.precision == source), None)
    if fp32 is None or fp32.artifact is None:
        fp32 = make_artifact(config, model, image_size, target, source)
    row = Row(chosen.bench.runtime_name or target, target, reference.label, REFERENCE_STATUS,
              note=reference.note)
    if fp32.artifact is None:
        return dataclasses.replace(row, status="failed", note=f"no {source} {target} artifact to quantize: "
                                                             f"{fp32.note}")
    preprocessing = make_spec(model, chosen, source, image_size).preprocessing
    try:
        path = reference.build(Path(fp32.artifact), config.calib_data or config.images, preprocessing,
                               DEFAULT_CALIB_SIZE)
    except UserError as exc:
        return dataclasses.replace(row, status="failed", note=str(exc))
    return dataclasses.replace(row, artifact=str(path), size_mb=size_mb(path))


def run_worker(job: dict, workdir: Path, tag: str) -> dict:
    """Run ``mf_edge.bench.measure`` in a fresh interpreter; its result or ``{"error": ...}``."""
    job_path, result_path = workdir / f"{tag}.job.json", workdir / f"{tag}.result.json"
    job_path.write_text(json.dumps(job))
    command = [sys.executable, "-m", "mf_edge.bench.measure", str(job_path), str(result_path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    if done.returncode != 0 or not result_path.is_file():
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit code {done.returncode}"}
    return json.loads(result_path.read_text())


def base_job(config: BenchConfig, image_size: int, threads: int, images_path: Path) -> dict:
    return {"threads": threads, "runs": config.runs, "warmup": config.warmup, "batch": config.batch,
            "images": str(images_path), "image_size": image_size, "model": config.model,
            "model_info": get_model_info(config.model).to_dict(),  # a register_model'ed one too
            "weights": config.weights, "seed": config.seed}


def summarise(row: Row, reference: np.ndarray | None, images: BenchImages, workdir: Path) -> dict:
    """The row's JSON: pooled timings over rounds, memory (worst round), fidelity vs the float logits."""
    data = {key: value for key, value in asdict(row).items() if key != "measured"}
    runs = [m for m in row.measured if "error" not in m]
    errors = [m["error"] for m in row.measured if "error" in m]
    if errors and not runs:
        unavailable = all(m.get("unavailable") for m in row.measured)
        data["status"] = "not runnable here" if unavailable else "failed"
        data["note"] = errors[0]
    if not runs:
        return data
    first = runs[0]
    latency = latency_stats([t for m in runs for t in m["latency_ms"]])
    per_round = [float(np.median(m["latency_ms"])) for m in runs]
    batch_ms = float(np.median([t for m in runs for t in m["batch_ms"]]))
    data.update({
        "runtime": first["runtime"], "threads": first["threads"], "rounds": len(runs),
        "load_ms": float(np.median([m["load_ms"] for m in runs])),
        "latency_batch": first["latency_batch"],
        "latency": {**latency, "round_medians_ms": per_round},
        "throughput_batch": first["throughput_batch"],
        "throughput_ips": first["throughput_batch"] * 1000.0 / batch_ms,
        "peak_rss_mb": max(m["peak_rss_mb"] for m in runs),
        "peak_rss_batch_mb": max(m["peak_rss_batch_mb"] for m in runs),
        "rss_before_load_mb": max(m["rss_before_load_mb"] for m in runs),
    })
    logits = np.load(workdir / f"{tag_of(row)}.logits.npy")
    if reference is not None:
        data["fidelity"] = parity_lib.compare(reference, logits)
    if images.labels is not None and logits.shape[1] == len(images.classes or ()):
        data["accuracy"] = float((logits.argmax(1) == images.labels).mean())
    return data


def with_calibration_images(config: BenchConfig, pairs: list[tuple[str, str]], spec) -> BenchConfig:
    """``config``, with the parity sample images as ``calib_data`` when a calibrated int8 row has no
    calibration images (neither ``--calib-data`` nor ``--images``): int8 runs, with a note, not fails."""
    from dataclasses import replace

    from mf_edge.calibration.schemes import scheme_for

    if config.calib_data or config.images:
        return config
    if not any(p in QUANTIZED_PRECISIONS and scheme_for(t, p).calibrated for t, p in pairs):
        return config
    from mf_edge.data import DEFAULT_NOISE_IMAGES, noise_images, sample_images

    folder = (config.artifacts or DEFAULT_ARTIFACTS) / f"parity-images-{spec.image_size}px"
    pictures = sample_images() + noise_images(DEFAULT_NOISE_IMAGES, spec.image_size)
    if len(list(folder.glob("*.png"))) != len(pictures):
        folder.mkdir(parents=True, exist_ok=True)
        for index, (_, picture) in enumerate(pictures):
            picture.save(folder / f"{index:02d}.png")
    note(f"int8 calibrates on the {len(pictures)} parity sample images ({folder}): its accuracy is only "
         "indicative; pass --calib-data DIR (or --images DIR) with representative images")
    return replace(config, calib_data=folder)


def tag_of(row: Row) -> str:
    """A file-name-safe tag of the row (``onnxruntime-onnx-int8``, ``executorch-cpp-executorch-fp32``)."""
    runtime = "executorch-cpp" if row.runtime == native.RUNTIME else row.runtime
    return re.sub(r"[^\w.-]+", "-", f"{runtime}-{row.target or 'eager'}-{row.precision}").strip("-")


def native_rows(rows: list[Row], app: Path | None) -> list[Row]:
    """An ``executorch (C++)`` row per measured program of a target the native app runs
    (``bench.native_app``: ExecuTorch), when the app is built."""
    if app is None:
        return []
    return [Row(native.RUNTIME, row.target, row.precision, "measured", artifact=row.artifact,
                size_mb=row.size_mb, parity=row.parity, note=f"{app.name}: the app's own latency, no Python")
            for row in rows if row.target is not None and row.status == "measured"
            and get_target(row.target).bench.native_app]


def worker_kind(row: Row, app: Path | None) -> dict:
    """What a measuring worker loads for ``row``: the float model, the artifact, or the native app
    (and, for a target added with ``register_target``, the file that defines it)."""
    from mf_edge.converters import target_file

    if row.runtime == PYTORCH:
        return {"kind": PYTORCH}
    source = {"target_file": target_file(row.target)} if target_file(row.target) else {}
    if row.status == REFERENCE_STATUS:
        return {"kind": "reference", "target": row.target, "path": row.artifact, **source}
    kind = {"kind": "artifact", "target": row.target, "output": str(Path(row.artifact).parent), **source}
    if row.runtime == native.RUNTIME:
        kind.update(kind=native.KIND, app=str(app))
    return kind


def run_bench(config: BenchConfig) -> dict:
    """Convert, measure and compare every requested format of ``config.model``: the bench report."""
    from mf_edge.manifest import tool_versions
    from mf_edge.pipeline import load_model, make_spec

    config.check()
    started = time.time()
    host = host_facts()
    threads = config.threads or available_cores()
    pairs = plan(config)
    model = load_model(config.model, config.weights, image_size=config.image_size, seed=config.seed)
    spec = make_spec(model, get_target(pairs[0][0]), pairs[0][1], config.image_size)
    image_size = spec.image_size
    config = with_calibration_images(config, pairs, spec)
    images = bench_images(spec, config.images, config.num_images)

    rows = [Row(PYTORCH, None, "fp32", "measured", note="reference (float model, eager)",
                size_mb=sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6)]
    for target, precision in pairs:
        with step(f"{target} {precision}: convert"):
            rows.append(make_artifact(config, model, image_size, target, precision))
    for target, precision in pairs:
        reference = get_target(target).bench.reference
        if reference is not None and reference.precision == precision:
            with step(f"{target} {precision} reference: {reference.label}"):
                rows.append(reference_row(config, model, image_size, rows, target))
    app = native.find_app()
    rows += native_rows(rows, app)
    measured = [row for row in rows if row.status in ("measured", REFERENCE_STATUS)]

    with tempfile.TemporaryDirectory(prefix="mf-edge-bench-") as tmp:
        workdir = Path(tmp)
        images_path = workdir / "images.npy"
        np.save(images_path, images.batch)
        job = base_job(config, image_size, threads, images_path)
        for round_index in range(config.rounds):
            for row in measured:
                tag = tag_of(row)
                kind = worker_kind(row, app)
                logits = str(workdir / f"{tag}.logits.npy")
                with step(f"round {round_index + 1}/{config.rounds}: {tag}"):
                    row.measured.append(run_worker({**job, **kind, "logits": logits}, workdir,
                                                   f"{tag}-{round_index}"))
        reference_path = workdir / f"{tag_of(rows[0])}.logits.npy"
        reference = np.load(reference_path) if reference_path.is_file() else None
        summaries = [summarise(row, reference, images, workdir) for row in rows]

    return {
        "model": config.model, "weights": model.mf_edge_weights, "image_size": image_size,
        "threads": threads, "runs": config.runs, "warmup": config.warmup, "rounds": config.rounds,
        "batch": config.batch, "images": images.describe(), "host": host,
        "load_average_end": load_average(),
        "tools": tool_versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1), "rows": summaries,
    }
