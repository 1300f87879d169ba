"""Parity: does an artifact, run in its own runtime, compute what its reference PyTorch model computes?

``compare`` turns two logit arrays into metrics; ``evaluate`` runs a runtime and one or more
references (``"float"``: the float model; ``"simulated"``: the PTQ simulation of a quantized model)
on the same inputs and checks the metrics against ``THRESHOLDS[precision][reference]``; a runtime
that emulates fp16 (the Core ML reference executor) adds its range findings as ``fp16``, and an fp16
overflow fails. The result is the ``parity.json`` report; ``raise_on_failure`` turns a failing report
into ``ParityFailure``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mf_edge.converters.base import Runtime
from mf_edge.data import ParityInputs
from mf_edge.errors import ParityFailure

PASS, FAIL, NOT_RUN = "pass", "fail", "not run"

# Per precision and reference: minimum cosine similarity (worst sample) and top-1 agreement.
# An empty dict: the metrics are reported, nothing is enforced (a quantized model vs the float one).
# fp16 tolerates a few top-1 flips: on random-weight models, half-precision rounding can reorder
# near-tied logits.
THRESHOLDS: dict[str, dict[str, dict[str, float]]] = {
    "fp32": {"float": {"cosine": 0.9999, "top1_agreement": 1.0}},
    "fp16": {"float": {"cosine": 0.999, "top1_agreement": 0.75}},
    "int8": {"simulated": {"cosine": 0.99, "top1_agreement": 0.75}, "float": {}},
    "w8": {"simulated": {"cosine": 0.999, "top1_agreement": 0.75}, "float": {}},
}


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Metrics of ``candidate`` logits against ``reference`` logits (both ``[N, classes]``).

    ``cosine`` is the worst per-sample cosine similarity, ``top1_agreement`` the share of samples
    with the same argmax, ``top5_overlap`` the mean share of shared top-5 classes.
    """
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if ref.shape != cand.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape}, candidate {cand.shape}")
    error = np.abs(ref - cand)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.where(norms > 0, (ref * cand).sum(1) / np.maximum(norms, 1e-300), 1.0)
    k = min(5, ref.shape[1])
    top_ref, top_cand = np.argsort(-ref, axis=1)[:, :k], np.argsort(-cand, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_ref, top_cand, strict=True)]
    return {
        "max_abs_error": float(error.max()),
        "mean_abs_error": float(error.mean()),
        "cosine": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "top1_agreement": float((ref.argmax(1) == cand.argmax(1)).mean()),
        "top5_overlap": float(np.mean(overlap)),
        "samples": int(ref.shape[0]),
    }


def failures(metrics: dict, thresholds: dict[str, float]) -> list[str]:
    """The thresholds ``metrics`` misses, as readable lines (empty when it passes)."""
    return [f"{name} {metrics[name]:.6f} < {minimum}" for name, minimum in thresholds.items()
            if metrics[name] < minimum]


def reference_logits(model: nn.Module, batch: np.ndarray, chunk: int = 16) -> np.ndarray:
    """Logits of a PyTorch ``model`` on ``batch``, in chunks, without gradients."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(batch), chunk):
            outputs.append(model(torch.from_numpy(batch[start:start + chunk])).float().numpy())
    return np.concatenate(outputs)


def runtime_logits(runtime: Runtime, batch: np.ndarray, batch_size: int, dynamic_batch: bool) -> np.ndarray:
    """Logits of ``runtime`` on ``batch``: whole for a dynamic batch, else in chunks of ``batch_size``.

    A dynamic batch runs in chunks of the runtime's ``max_batch`` where it has one (an ExecuTorch
    memory plan is sized for its upper bound). The last chunk of a static-batch artifact is padded by
    repeating its first image; padded rows are dropped from the result.
    """
    if dynamic_batch:
        chunk = getattr(runtime, "max_batch", None) or len(batch)
        return np.concatenate([np.asarray(runtime.run(np.ascontiguousarray(batch[start:start + chunk])))
                               for start in range(0, len(batch), chunk)])
    outputs = []
    for start in range(0, len(batch), batch_size):
        chunk = batch[start:start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        outputs.append(np.asarray(runtime.run(np.ascontiguousarray(chunk)))[:real])
    return np.concatenate(outputs)


def evaluate(runtime: Runtime, inputs: ParityInputs, references: dict[str, np.ndarray], precision: str,
             batch_size: int = 1, dynamic_batch: bool = False) -> dict:
    """Run ``runtime`` on ``inputs`` and compare with each reference's logits: the parity report."""
    candidate = runtime_logits(runtime, inputs.batch, batch_size, dynamic_batch)
    limits = THRESHOLDS.get(precision, {})
    results = {}
    for name, logits in references.items():
        metrics = compare(logits, candidate)
        thresholds = limits.get(name, {})
        missed = failures(metrics, thresholds)
        results[name] = {"metrics": metrics, "thresholds": thresholds, "enforced": bool(thresholds),
                         "passed": not missed, "failures": missed}
    findings = fp16_findings(runtime)
    overflows = [f"fp16 overflow at {f['op_name']} ({f['op_type']}, max |x| {f['peak']:.4g})"
                 for f in findings or [] if f["kind"] == "overflow"]
    enforced = [r for r in results.values() if r["enforced"]]
    status = PASS if enforced and all(r["passed"] for r in enforced) and not overflows else FAIL
    problems = [f"vs {n}: {', '.join(r['failures'])}" for n, r in results.items() if r["failures"]]
    problems += overflows
    reason = None if status == PASS else (
        "; ".join(problems) or f"no enforced reference for precision {precision}")
    report = {"status": status, "reason": reason, "precision": precision, "runtime": runtime.name,
              "inputs": inputs.describe(), "references": results}
    if findings is not None:
        report["fp16"] = findings
    return report


def fp16_findings(runtime: Runtime) -> list[dict] | None:
    """The fp16 range findings a runtime keeps (the Core ML reference executor's ``report``: overflow,
    inf/nan, underflow per op), or ``None`` for a runtime that keeps none. An overflow fails parity."""
    report = getattr(runtime, "report", None)
    return None if report is None else report.to_list()


def not_run(reason: str, precision: str, inputs: ParityInputs | None = None) -> dict:
    """The report of a parity check that could not run here (never a pass)."""
    return {"status": NOT_RUN, "reason": reason, "precision": precision, "runtime": None,
            "inputs": inputs.describe() if inputs is not None else None, "references": {}}


def summary(report: dict) -> str:
    """One line: status and the headline metrics of each reference."""
    if report["status"] == NOT_RUN:
        onnx = f" (its ONNX in onnxruntime: {summary(report['onnx'])})" if "onnx" in report else ""
        return f"parity not run: {report['reason']}{onnx}"
    parts = [f"vs {name}: cosine {r['metrics']['cosine']:.6f}, top-1 {r['metrics']['top1_agreement']:.0%}, "
             f"max abs err {r['metrics']['max_abs_error']:.2e}" for name, r in report["references"].items()]
    return f"parity {report['status']} ({'; '.join(parts)})"


def raise_on_failure(report: dict, artifact: str) -> None:
    """Raise ``ParityFailure`` with the numbers when ``report`` failed."""
    if report.get("onnx", {}).get("status") == FAIL:
        raise_on_failure(report["onnx"], f"{artifact} (its ONNX)")
    if report["status"] == FAIL:
        raise ParityFailure(f"{artifact} does not match its reference: {report['reason']} "
                            f"({summary(report)}); see parity.json, or report the model/target/precision.")
