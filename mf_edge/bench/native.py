"""The native ExecuTorch app (``apps/executorch_cpp``) in the bench: the ``executorch (C++)`` row.

Next to the ``executorch`` row (the same ``.pte`` in the Python runtime), this row runs ``mf-classify``
on the same images and reports the latency and load time the app measures itself, around
``Module::forward`` and ``Module::load_forward``: no Python, no tensor conversion, no process start.
The difference between the two rows is the Python runtime's overhead.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from mf_edge.errors import UserError

RUNTIME = "executorch (C++)"
KIND = "native"
APP_ENV = "MF_EDGE_NATIVE_APP"
DEFAULT_APP = Path("build") / "mf-classify"
APP_TIMEOUT_S = 3600


def find_app() -> Path | None:
    """The built ``mf-classify``: ``$MF_EDGE_NATIVE_APP``, else ``build/mf-classify`` in the working directory
    (where ``cmake -S apps/executorch_cpp -B build && cmake --build build`` puts it); ``None`` when absent."""
    path = Path(os.environ.get(APP_ENV) or DEFAULT_APP)
    return path.resolve() if path.is_file() and os.access(path, os.X_OK) else None


def run_app(app: str, folder: str, batch: np.ndarray, classes: int, runs: int, warmup: int, threads: int,
            workdir: Path) -> list[dict]:
    """``mf-classify FOLDER --tensor`` on ``batch``: its JSON, one entry per image (every class's logit)."""
    tensor = workdir / "input.bin"
    np.ascontiguousarray(batch, dtype=np.float32).tofile(tensor)
    command = [app, folder, "--tensor", str(tensor), "--json", "--top", str(classes), "--runs", str(runs),
               "--warmup", str(warmup), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=APP_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise UserError(done.stderr.strip() or f"{app} exited with code {done.returncode}")
    return json.loads(done.stdout)


def logits_of(results: list[dict], classes: int) -> np.ndarray:
    """The ``[N, classes]`` logits in the app's JSON."""
    logits = np.zeros((len(results), classes), np.float32)
    for row, result in zip(logits, results, strict=True):
        for entry in result["top"]:
            row[entry["index"]] = entry["logit"]
    return logits


def measure_native(job: dict) -> dict:
    """``mf_edge.bench.measure.measure``'s result for the app running ``job["output"]``'s program."""
    from mf_edge.bench.measure import batch_of
    from mf_edge.manifest import read_manifest

    manifest = read_manifest(job["output"])
    classes = manifest["output"]["shape"][1]
    static = not manifest["input"]["dynamic_batch"]
    batch_size = manifest["input"]["shape"][0]
    images = np.load(job["images"])
    app, folder, threads = job["app"], job["output"], job["threads"]
    with tempfile.TemporaryDirectory(prefix="mf-edge-native-") as tmp:
        workdir = Path(tmp)
        single = batch_of(images, batch_size if static else 1)
        first = run_app(app, folder, single, classes, job["runs"], job["warmup"], threads, workdir)[0]
        everything = run_app(app, folder, images, classes, 1, 0, threads, workdir)
        np.save(job["logits"], logits_of(everything, classes))
        max_batch = (manifest.get("details") or {}).get("max_batch") or job["batch"]
        large_batch = batch_size if static else min(job["batch"], max_batch)
        batch_runs = job.get("batch_runs", max(3, job["runs"] // 4))
        large_input = batch_of(images, large_batch)
        large = run_app(app, folder, large_input, classes, batch_runs, 1, threads, workdir)[0]
    return {
        "runtime": RUNTIME,
        "threads": {"executorch_threadpool": threads},
        "load_ms": first["load_ms"],
        "latency_batch": len(single),
        "latency_ms": first["latency_ms"]["times"],
        "throughput_batch": large_batch,
        "batch_ms": large["latency_ms"]["times"],
        "rss_before_load_mb": 0.0,  # the app's memory is its own process's: nothing before its load
        "peak_rss_mb": first["peak_rss_mb"],  # VmHWM of the app (-1 where /proc is absent)
        "peak_rss_batch_mb": large["peak_rss_mb"],
    }
