"""One runtime measured in its own process: load time, latency, throughput, peak memory, logits.

``python -m mf_edge.bench.measure JOB.json RESULT.json`` runs ``measure(job)``. A fresh process per
runtime keeps runtimes from sharing thread pools, caches and the peak-memory high-water mark.
The job says what to load (``"pytorch"``: the float model; otherwise a published output folder),
how many threads, runs and warm-up runs, the batch for throughput and where the fidelity batch is.
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PYTORCH = "pytorch"


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), ``None`` off Linux."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", status.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Restart the peak-RSS mark at the current RSS (Linux ``clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_mb() -> float:
    """Resident memory now, in MiB (the peak so far where the current value is not readable)."""
    current = _status_kib("VmRSS")
    return current / 1024 if current is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory since the last ``reset_peak_rss`` (else since start), in MiB."""
    peak = _status_kib("VmHWM")
    if peak is not None:
        return peak / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def set_threads(threads: int, target: str | None) -> dict:
    """Set the thread pools the runtime of ``target`` uses (``None``: PyTorch) to ``threads``.

    Returns what each pool reports back. onnxruntime's pool belongs to its session: the ONNX target
    sizes it from ``spec.options["threads"]`` and the loaded runtime reports it.
    """
    import torch

    torch.set_num_threads(threads)
    applied: dict = {"torch": torch.get_num_threads()}
    if target is not None:  # the runtime's own pool (ExecuTorch's threadpool), Target.set_runtime_threads
        from mf_edge.converters import get_target

        applied.update(get_target(target).set_runtime_threads(threads))
    return applied


def import_runtime(target: str | None) -> None:
    """Import the runtime library of ``target`` (so load time is the model's, not the library's)."""
    import importlib

    from mf_edge.converters import get_target

    module = get_target(target).bench.runtime_module if target else None
    if module:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the target's runtime() says what is missing


def timings(run: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Wall-clock milliseconds of ``runs`` calls of ``run`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def latency_stats(times: list[float]) -> dict:
    """Median, 90th percentile, min and mean of ``times`` (ms)."""
    values = np.asarray(times, dtype=np.float64)
    return {"median_ms": float(np.median(values)), "p90_ms": float(np.percentile(values, 90)),
            "min_ms": float(values.min()), "mean_ms": float(values.mean()), "runs": len(times)}


def batch_of(images: np.ndarray, size: int) -> np.ndarray:
    """``size`` images from ``images``, cycling when there are fewer."""
    index = np.arange(size) % len(images)
    return np.ascontiguousarray(images[index])


def load_pytorch(job: dict):
    """The float PyTorch model of the job, as a runner of ``[B, 3, H, W]`` float32 batches."""
    import torch

    from mf_edge.models import create_model

    model = create_model(job["model"], weights=job["weights"], image_size=job["image_size"],
                         seed=job.get("seed", 0), num_classes=job.get("num_classes"))

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).float().numpy()

    return run, {"dynamic_batch": True, "batch_size": 1, "runtime": "pytorch"}


def load_artifact(job: dict):
    """The published artifact of the job in its target's own runtime (threads passed in the spec)."""
    from mf_edge.pipeline import load_published

    _, spec, target = load_published(job["output"])
    spec = dataclasses.replace(spec, options={**spec.options, "threads": job["threads"]})
    runtime = target.runtime(Path(job["output"]), spec)
    facts = {"dynamic_batch": spec.dynamic_batch, "batch_size": spec.batch_size,
             "runtime": getattr(runtime, "name", target.name)}
    if spec.dynamic_batch and getattr(runtime, "max_batch", None):
        facts["max_batch"] = runtime.max_batch  # an ExecuTorch memory plan's upper bound
    threads = getattr(runtime, "threads", None)
    if threads is not None:
        facts["runtime_threads"] = threads
    return runtime.run, facts


def load_reference(job: dict):
    """A target's bench reference model (``BenchReference``: onnxruntime's ``quantize_static`` of the
    fp32 ONNX), loaded by the target, batch dynamic."""
    from mf_edge.converters import get_target

    runtime = get_target(job["target"]).bench.reference.load(Path(job["path"]), job["threads"])
    return runtime.run, {"dynamic_batch": True, "batch_size": 1, "runtime": runtime.name,
                         "runtime_threads": runtime.threads}


LOADERS = {PYTORCH: load_pytorch, "artifact": load_artifact, "reference": load_reference}


def logits_in_chunks(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, chunk: int,
                     static: bool) -> np.ndarray:
    """Logits of every image, ``chunk`` at a time; a static-batch runtime gets its last chunk padded."""
    outputs = []
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        padded = batch_of(part, chunk) if static else np.ascontiguousarray(part)
        outputs.append(np.asarray(run(padded))[:len(part)])
    return np.concatenate(outputs)


def measure(job: dict) -> dict:
    """Measure one runtime as the job describes (see the module docstring); logits go to ``job["logits"]``.

    Order: memory baseline (Python, torch and mf-edge imported; the peak-RSS mark is reset to it
    where Linux allows, so import-time peaks do not hide what follows), the runtime library and its
    threads, load, batch-1 latency (then the peak memory of serving one image), the fidelity batch
    in chunks of the throughput batch, throughput (then the peak memory at that batch). The native
    app (``kind`` ``"native"``) is measured by its own clock instead (``mf_edge.bench.native``).
    """
    if job["kind"] == "native":
        from mf_edge.bench.native import measure_native

        return measure_native(job)
    import mf_edge.pipeline  # noqa: F401  (torch and mf-edge: imported before the memory baseline)
    from mf_edge.converters import get_target, load_target_file

    images = np.load(job["images"])
    target = job.get("target")
    if job.get("model_info"):  # the model as the runner knew it, register_model'ed ones included
        from mf_edge.models import ModelInfo, register_model

        register_model(ModelInfo.from_dict(job["model_info"]), replace=True)
    if job.get("target_file"):  # a target added with register_target, defined outside mf-edge
        load_target_file(job["target_file"])
    if target:
        get_target(target)  # the target's own mf-edge module, before the baseline too
    reset_peak_rss()
    baseline = rss_mb()
    import_runtime(target)
    applied = set_threads(job["threads"], target)
    start = time.perf_counter()
    run, facts = LOADERS[job["kind"]](job)
    load_ms = (time.perf_counter() - start) * 1000.0
    if "runtime_threads" in facts:
        applied[facts["runtime"]] = facts.pop("runtime_threads")
    static = not facts["dynamic_batch"]

    single = batch_of(images, facts["batch_size"] if static else 1)
    latency_ms = timings(lambda: run(single), job["runs"], job["warmup"])
    peak_single = peak_rss_mb()

    large_batch = facts["batch_size"] if static else min(job["batch"], facts.get("max_batch") or job["batch"])
    np.save(job["logits"], logits_in_chunks(run, images, large_batch, static))
    large = batch_of(images, large_batch)
    batch_ms = timings(lambda: run(large), job.get("batch_runs", max(3, job["runs"] // 4)), 1)
    return {
        "runtime": facts["runtime"],
        "threads": applied,
        "load_ms": load_ms,
        "latency_batch": len(single),
        "latency_ms": latency_ms,
        "throughput_batch": large_batch,
        "batch_ms": batch_ms,
        "rss_before_load_mb": baseline,
        "peak_rss_mb": peak_single,
        "peak_rss_batch_mb": peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m mf_edge.bench.measure JOB.json RESULT.json``."""
    args = sys.argv[1:] if argv is None else argv
    from mf_edge.errors import RuntimeUnavailable, UserError

    job = json.loads(Path(args[0]).read_text())
    try:
        result = measure(job)
    except UserError as exc:  # a runtime or artifact problem the report shows as the row's note
        result = {"error": str(exc), "unavailable": isinstance(exc, RuntimeUnavailable)}
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
