"""Running the calibration images through the graph and recording each observed node's statistics.

The graph runs under a ``torch.fx.Interpreter`` that hands the outputs of the chosen nodes to one
observer each. Min-max and moving-average observers take the batches directly (one pass).
Histogram observers get two passes: the first finds each tensor's range, the second accumulates a
fixed-range histogram, which is exactly the state ``HistogramObserver`` keeps (its own ``forward``
re-bins on every batch, which is much slower). The result is each observer's state
(``min_val``, ``max_val`` and, for histograms, ``histogram``) keyed by node name, on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import GraphModule, Interpreter, Node
from torchao.quantization.pt2e import MinMaxObserver

from mf_edge.calibration.observers import HISTOGRAM_BINS, observer_class, uses_histogram
from mf_edge.console import track
from mf_edge.errors import UserError

NodeStats = dict[str, dict[str, torch.Tensor]]
DEFAULT_BATCH = 32


class _Tap(Interpreter):
    """Runs a graph and calls ``taps[name](output)`` for the tapped nodes."""

    def __init__(self, module: GraphModule, taps: dict[str, Callable[[torch.Tensor], None]]) -> None:
        super().__init__(module)
        self.taps = taps

    def run_node(self, node: Node):
        output = super().run_node(node)
        tap = self.taps.get(node.name)
        if tap is not None:
            tap(output.detach().float())
        return output


def resolve_device(device: str | None) -> torch.device:
    """``device`` as asked; by default CUDA when present, else the CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA, which this host lacks; use --device cpu.")
    count = torch.cuda.device_count() if resolved.type == "cuda" else 0
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= count:
        raise UserError(f"--device {device} asks for GPU {resolved.index}, but this host has {count} "
                        f"(cuda:0 to cuda:{count - 1}); pick one of those.")
    return resolved


def _run(module: GraphModule, taps: dict, images: torch.Tensor, batch_size: int, device: torch.device,
         description: str) -> None:
    interpreter = _Tap(module, taps)
    starts = range(0, len(images), batch_size)
    with torch.no_grad():
        for start in track(starts, description, total=len(starts)):
            interpreter.run(images[start:start + batch_size].to(device))


def _histogram_tap(histograms: dict, name: str, low: float, high: float) -> Callable[[torch.Tensor], None]:
    top = high if high > low else low + 1e-6

    def tap(value: torch.Tensor) -> None:
        histograms[name] += torch.histc(value, HISTOGRAM_BINS, min=low, max=top)

    return tap


def collect_statistics(graph_module: GraphModule, nodes: list[str], images: torch.Tensor, observer: str,
                       device: str | None = None, batch_size: int = DEFAULT_BATCH) -> NodeStats:
    """Observer state per node of ``nodes`` after ``images`` ran through ``graph_module``."""
    if not nodes:
        return {}
    target = resolve_device(device)
    module = graph_module.to(target)
    try:
        histogram = uses_histogram(observer)
        first = MinMaxObserver if histogram else observer_class(observer)
        ranges = {name: first().to(target) for name in nodes}
        passes = "pass 1/2: ranges" if histogram else "calibrating"
        _run(module, dict(ranges), images, batch_size, target, f"{passes} ({observer}, {target.type})")
        stats = {name: {"min_val": obs.min_val.detach().cpu().clone(),
                        "max_val": obs.max_val.detach().cpu().clone()} for name, obs in ranges.items()}
        if histogram:
            histograms = {name: torch.zeros(HISTOGRAM_BINS, device=target) for name in nodes}
            taps = {name: _histogram_tap(histograms, name, float(s["min_val"]), float(s["max_val"]))
                    for name, s in stats.items()}
            _run(module, taps, images, batch_size, target,
                 f"pass 2/2: histograms ({observer}, {target.type})")
            for name, counts in histograms.items():
                stats[name]["histogram"] = counts.cpu()
    finally:
        graph_module.to("cpu")
    missing = [name for name, s in stats.items() if not torch.isfinite(s["min_val"]).all()]
    if missing:
        raise UserError(f"calibration never reached node {missing[0]} of the graph; this is a bug in "
                        "mf-edge, please report it with the model name.")
    return stats


def merge_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One observer state for values that share qparams: the union range, histograms re-binned onto it."""
    if len(states) == 1:
        return states[0]
    low = torch.stack([s["min_val"] for s in states]).min()
    high = torch.stack([s["max_val"] for s in states]).max()
    merged = {"min_val": low, "max_val": high}
    if "histogram" in states[0]:
        bins = len(states[0]["histogram"])
        edges = torch.linspace(float(low), float(high), bins + 1)
        total = torch.zeros(bins)
        for state in states:
            width = (state["max_val"] - state["min_val"]) / bins
            centres = state["min_val"] + (torch.arange(bins) + 0.5) * width
            index = (torch.bucketize(centres, edges, right=True) - 1).clamp(0, bins - 1)
            total.index_add_(0, index, state["histogram"].float())
        merged["histogram"] = total
    return merged
