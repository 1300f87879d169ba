"""Parity: does an artifact, run in its own runtime, compute what its reference PyTorch model computes?

``compare`` turns two logit arrays into metrics; ``evaluate`` runs a runtime and one or more
references (``"float"``: the float model; ``"simulated"``: the PTQ simulation of a quantized model)
on the same inputs and checks the metrics against ``THRESHOLDS[precision][reference]``; a runtime
that emulates fp16 (the Core ML reference executor) adds its range findings as ``fp16``, and an fp16
overflow fails. The result is the ``parity.json`` report; ``raise_on_failure`` turns a failing report
into ``ParityFailure``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from mf_edge.converters.base import Runtime
from mf_edge.data import ParityInputs
from mf_edge.errors import ParityFailure

PASS, FAIL, NOT_RUN = "pass", "fail", "not run"
# The report entry of the check ``Target.fallback_runtime`` ran where the target's own runtime could not
# (TensorRT without a GPU: its ONNX in onnxruntime); the key is part of parity.json's format.
FALLBACK = "onnx"

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
    with the same argmax, ``top5_overlap`` the mean share of shared top-5 classes. ``nonfinite``
    counts the NaN/inf values of each side: with any, every metric is ``None`` (no number computed
    from a NaN means anything, and ``NaN < threshold`` is never true), and ``failures`` fails it.
    """
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if ref.shape != cand.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape}, candidate {cand.shape}")
    nonfinite = {"reference": int((~np.isfinite(ref)).sum()), "candidate": int((~np.isfinite(cand)).sum()),
                 "values": int(ref.size)}
    metrics: dict = dict.fromkeys(METRICS)
    if not (nonfinite["reference"] or nonfinite["candidate"]):
        metrics = _finite_metrics(ref, cand)
    # a finite input can still overflow a metric (float64 range): such a metric is None, and fails
    metrics = {name: value if value is None or math.isfinite(value) else None
               for name, value in metrics.items()}
    return metrics | {"samples": int(ref.shape[0]), "nonfinite": nonfinite}


METRICS = ("max_abs_error", "mean_abs_error", "cosine", "cosine_mean", "top1_agreement", "top5_overlap")


def _finite_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    error = np.abs(ref - cand)
    k = min(5, ref.shape[1])
    top_ref, top_cand = np.argsort(-ref, axis=1)[:, :k], np.argsort(-cand, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_ref, top_cand, strict=True)]
    cosine = _cosine(ref, cand)
    return {"max_abs_error": float(error.max()), "mean_abs_error": float(error.mean()),
            "cosine": float(cosine.min()), "cosine_mean": float(cosine.mean()),
            "top1_agreement": float((ref.argmax(1) == cand.argmax(1)).mean()),
            "top5_overlap": float(np.mean(overlap))}


def _cosine(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of finite rows, scaled first so that huge logits cannot overflow.

    Two all-zero rows are identical (1.0); an all-zero row against a non-zero one shares nothing (0.0).
    """
    def unit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = np.abs(rows).max(1, keepdims=True)
        scaled = rows / np.where(scale > 0, scale, 1.0)
        norm = np.linalg.norm(scaled, axis=1, keepdims=True)
        return scaled / np.where(norm > 0, norm, 1.0), norm[:, 0] > 0

    ref_unit, ref_nonzero = unit(ref)
    cand_unit, cand_nonzero = unit(cand)
    cosine = np.clip((ref_unit * cand_unit).sum(1), -1.0, 1.0)
    return np.where(ref_nonzero & cand_nonzero, cosine, np.where(ref_nonzero | cand_nonzero, 0.0, 1.0))


def failures(metrics: dict, thresholds: dict[str, float], reference: str = "reference") -> list[str]:
    """What fails in ``metrics``, as readable lines (empty when it passes).

    Non-finite logits on either side fail whatever the thresholds (also a reference reported only);
    so does a metric that could not be computed.
    """
    nonfinite = metrics.get("nonfinite", {})
    missed = [f"{count} of {nonfinite['values']} {side} logits are NaN/inf"
              for side, count in ((f"{reference} reference", nonfinite.get("reference", 0)),
                                  ("artifact", nonfinite.get("candidate", 0))) if count]
    if missed:
        return missed
    missed += [f"{name} is not a finite number" for name in METRICS
               if name in metrics and metrics[name] is None]
    return missed + [f"{name} {metrics[name]:.6f} < {minimum}" for name, minimum in thresholds.items()
                     if metrics.get(name) is not None and not metrics[name] >= minimum]


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
        missed = failures(metrics, thresholds, name)
        results[name] = {"metrics": metrics, "thresholds": thresholds, "enforced": bool(thresholds),
                         "passed": not missed, "failures": missed}
    findings = fp16_findings(runtime)
    overflows = [f"fp16 overflow at {f['op_name']} ({f['op_type']}, max |x| {f['peak']:.4g})"
                 for f in findings or [] if f["kind"] == "overflow"]
    enforced = [r for r in results.values() if r["enforced"]]
    nonfinite = any(_has_nonfinite(r["metrics"]) for r in results.values())
    passed = enforced and all(r["passed"] for r in enforced)
    status = PASS if passed and not nonfinite and not overflows else FAIL
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


def _has_nonfinite(metrics: dict) -> bool:
    """NaN/inf logits on either side, or a metric that could not be computed (enforced or not)."""
    counts = metrics.get("nonfinite", {})
    return bool(counts.get("reference") or counts.get("candidate")) or any(
        name in metrics and metrics[name] is None for name in METRICS)


def not_run(reason: str, precision: str, inputs: ParityInputs | None = None) -> dict:
    """The report of a parity check that could not run here (never a pass)."""
    return {"status": NOT_RUN, "reason": reason, "precision": precision, "runtime": None,
            "inputs": inputs.describe() if inputs is not None else None, "references": {}}


def summary(report: dict) -> str:
    """One line: status and the headline metrics of each reference."""
    if report["status"] == NOT_RUN:
        onnx = f" (its ONNX in onnxruntime: {summary(report[FALLBACK])})" if FALLBACK in report else ""
        return f"parity not run: {report['reason']}{onnx}"
    parts = [f"vs {name}: cosine {number(m['cosine'], '.6f')}, top-1 {number(m['top1_agreement'], '.0%')}, "
             f"max abs err {number(m['max_abs_error'], '.2e')}"
             for name, m in ((name, r["metrics"]) for name, r in report["references"].items())]
    return f"parity {report['status']} ({'; '.join(parts)})"


def number(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``; a metric that could not be computed (``None``) reads ``n/a``."""
    return "n/a" if value is None else format(value, spec)


def failed(report: dict) -> bool:
    """Whether ``report`` (or the ONNX check standing in for it) failed."""
    return report["status"] == FAIL or report.get(FALLBACK, {}).get("status") == FAIL


def raise_on_failure(report: dict, artifact: str, where: str = "the metrics are printed above") -> None:
    """Raise ``ParityFailure`` with the numbers when ``report`` failed; ``where`` says where the full
    report can be read (and what became of the artifact)."""
    if report.get(FALLBACK, {}).get("status") == FAIL:
        raise_on_failure(report[FALLBACK], f"{artifact} (its ONNX)", where)
    if report["status"] == FAIL:
        raise ParityFailure(f"{artifact} does not match its reference: {report['reason']} "
                            f"({summary(report)}); {where}. Report the model/target/precision if the "
                            "weights are sound.")
