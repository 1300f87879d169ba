"""The bench report in four forms: a rich table, JSON, CSV (one line per format) and a PNG chart."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

from rich.table import Table

from mf_edge.publish import current_umask

CSV_FIELDS = ("runtime", "target", "precision", "status", "size_mb", "load_ms", "latency_median_ms",
              "latency_p90_ms", "latency_min_ms", "throughput_ips", "throughput_batch", "peak_rss_mb",
              "peak_rss_batch_mb", "memory_mb", "cosine", "top1_agreement", "accuracy", "speedup_vs_pytorch",
              "parity", "note")


def reference_row(report: dict) -> dict | None:
    return next((row for row in report["rows"] if row["runtime"] == "pytorch" and "latency" in row), None)


def flat(row: dict, reference: dict | None) -> dict:
    """One row as flat columns (CSV, table); absent values are ``None``."""
    latency = row.get("latency") or {}
    fidelity = row.get("fidelity") or {}
    speedup = None
    if reference is not None and latency:
        speedup = reference["latency"]["median_ms"] / latency["median_ms"]
    return {
        "runtime": row["runtime"], "target": row.get("target") or "-", "precision": row["precision"],
        "status": row["status"], "size_mb": row.get("size_mb"), "load_ms": row.get("load_ms"),
        "latency_median_ms": latency.get("median_ms"), "latency_p90_ms": latency.get("p90_ms"),
        "latency_min_ms": latency.get("min_ms"), "throughput_ips": row.get("throughput_ips"),
        "throughput_batch": row.get("throughput_batch"), "peak_rss_mb": row.get("peak_rss_mb"),
        "peak_rss_batch_mb": row.get("peak_rss_batch_mb"),
        "memory_mb": (row["peak_rss_mb"] - row["rss_before_load_mb"]) if "peak_rss_mb" in row else None,
        "cosine": fidelity.get("cosine"),
        "top1_agreement": fidelity.get("top1_agreement"), "accuracy": row.get("accuracy"),
        "speedup_vs_pytorch": speedup, "parity": row.get("parity"), "note": row.get("note"),
    }


# (header, flat key, format, scale): the columns of the terminal and Markdown tables.
COLUMNS = (
    ("size MB", "size_mb", ".1f", 1), ("load ms", "load_ms", ".0f", 1),
    ("median ms", "latency_median_ms", ".1f", 1), ("p90 ms", "latency_p90_ms", ".1f", 1),
    ("min ms", "latency_min_ms", ".1f", 1), ("img/s", "throughput_ips", ".1f", 1),
    ("+RSS MB", "memory_mb", ".0f", 1), ("cosine", "cosine", ".5f", 1),
    ("top-1 agr %", "top1_agreement", ".1f", 100), ("acc %", "accuracy", ".1f", 100),
    ("x eager", "speedup_vs_pytorch", ".2f", 1),
)


def cells(f: dict) -> list[str]:
    """The formatted ``COLUMNS`` of one flat row (``-`` where absent)."""
    return ["-" if f[key] is None else format(scale * f[key], spec) for _, key, spec, scale in COLUMNS]


def status_text(f: dict, notes: list[str]) -> str:
    """The status, with a ``[n]`` reference into ``notes`` for its explanation (appended there)."""
    if not f["note"] or f["status"] == "measured":
        return f["status"]
    notes.append(f["note"])
    return f"{f['status']} [{len(notes)}]"


def title(report: dict) -> str:
    return (f"{report['model']} @ {report['image_size']}px, {report['threads']} threads, batch 1 latency "
            f"over {report['runs']} runs x {report['rounds']} round(s), img/s at batch {report['batch']} "
            f"- {report['host']['cpu']}")


def table(report: dict) -> tuple[Table, list[str]]:
    """The terminal table (one line per format, the float PyTorch model first) and its numbered notes."""
    reference = reference_row(report)
    out, notes = Table(title=title(report)), []
    names = [flat(row, reference) for row in report["rows"]]
    # never cut a runtime's name ("execut..."): the number columns wrap their headers instead
    out.add_column("runtime", no_wrap=True, min_width=max(len(f["runtime"]) for f in names))
    out.add_column("precision", no_wrap=True)
    for header, *_ in COLUMNS:
        out.add_column(header, justify="right")
    out.add_column("status", no_wrap=True)
    for row in report["rows"]:
        f = flat(row, reference)
        out.add_row(f["runtime"], terminal_precision(f), *cells(f), status_text(f, notes))
    return out, notes


def terminal_precision(f: dict) -> str:
    """A reference row's precision without its long "(onnxruntime quantize_static)": its status note
    says what it is, and the number columns keep their width on the terminal (CSV and Markdown keep it)."""
    return f["precision"].split(" (")[0] if f["status"] == "reference" else f["precision"]


def markdown(report: dict) -> str:
    """The table as Markdown (for the README), notes numbered below it."""
    reference = reference_row(report)
    headers = ["runtime", "precision", *(header for header, *_ in COLUMNS), "status"]
    lines, notes = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)], []
    for row in report["rows"]:
        f = flat(row, reference)
        line = [f["runtime"], f["precision"], *cells(f), status_text(f, notes)]
        lines.append("| " + " | ".join(line) + " |")
    lines += [""] + [f"[{i}] {text}" for i, text in enumerate(notes, 1)] if notes else []
    return "\n".join(lines)


def _atomic_write(path: Path, write) -> None:
    """Write ``path`` through a temporary file in the same folder, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a report is as readable as any file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(report: dict, path: Path) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(report, indent=2, default=str) + "\n"))


def write_csv(report: dict, path: Path) -> None:
    reference = reference_row(report)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for row in report["rows"]:
                writer.writerow(flat(row, reference))

    _atomic_write(path, write)


def write_chart(report: dict, path: Path) -> None:
    """Latency (median, batch 1) against fidelity (top-1 agreement with float), one point per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = reference_row(report)
    points = [flat(row, reference) for row in report["rows"]]
    points = [p for p in points if p["latency_median_ms"] is not None and p["top1_agreement"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    markers = "osD^v<>ph*"
    for i, p in enumerate(points):  # named in the legend: labels beside close points would overlap
        ax.scatter(p["latency_median_ms"], 100 * p["top1_agreement"], s=45, marker=markers[i % len(markers)],
                   label=f"{p['runtime']} {p['precision']}", clip_on=False, zorder=3)
    lowest = min((100 * p["top1_agreement"] for p in points), default=100.0)
    ax.set_ylim(max(0.0, lowest - max(2.0, 0.1 * (100 - lowest))), 100.0)  # agreement ends at 100 %
    if points:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("latency per image, batch 1, median (ms, log scale)")
    ax.set_ylabel("top-1 agreement with float (%)")
    ax.set_title(f"{report['model']} @ {report['image_size']}px, {report['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_all(report: dict, json_path: Path) -> list[Path]:
    """JSON at ``json_path``, CSV and PNG beside it (same stem); the paths written."""
    paths = [json_path, json_path.with_suffix(".csv"), json_path.with_suffix(".png")]
    write_json(report, paths[0])
    write_csv(report, paths[1])
    write_chart(report, paths[2])
    return paths
