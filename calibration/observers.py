"""Activation observers (``--observer``): how a tensor's calibration statistics become a quantization range.

Each name maps onto a torchao PT2E observer class, so the quantizer inserts it and ``convert_pt2e``
computes the scale and zero point from it:

- ``minmax``: ``MinMaxObserver``, the full observed range.
- ``ema``: ``MovingAverageMinMaxObserver``, an exponential moving average of per-batch ranges.
- ``mse``: ``HistogramObserver``, the range minimising the L2 quantization error over a histogram.
- ``percentile``: ``PercentileObserver`` (below), the 0.01% / 99.99% quantiles of the histogram.
- ``entropy``: ``EntropyObserver`` (below), the symmetric clip minimising the KL divergence between
  the histogram and its quantized version (TensorRT's entropy calibration).

Histogram observers are filled by ``calibration.statistics`` in two passes (range, then a fixed-range
histogram) rather than by their own ``forward``, which re-bins on every batch and is far slower.
"""

from __future__ import annotations

import numpy as np
import torch
from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

from mf_edge.errors import UserError

HISTOGRAM_BINS = 2048
DEFAULT_OBSERVER = "mse"


class PercentileObserver(HistogramObserver):
    """Clips the range to the ``percentile`` (and ``100 - percentile``) quantile of the histogram."""

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(**kwargs)
        self.percentile = percentile

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        cumulative = torch.cumsum(self.histogram, 0) / self.histogram.sum()
        fraction = self.percentile / 100.0
        width = (self.max_val - self.min_val) / self.bins
        low_bin = int(torch.searchsorted(cumulative, torch.tensor(1.0 - fraction, device=cumulative.device)))
        high_bin = int(torch.searchsorted(cumulative, torch.tensor(fraction, device=cumulative.device)))
        low = self.min_val + width * low_bin
        high = self.min_val + width * min(high_bin + 1, self.bins)
        return torch.minimum(low, torch.zeros_like(low)), torch.maximum(high, torch.zeros_like(high))


class EntropyObserver(HistogramObserver):
    """TensorRT-style entropy calibration: the ``|x|`` threshold with the least KL divergence."""

    levels = 128
    stride = 8

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = float(self.min_val), float(self.max_val)
        amax = max(abs(low), abs(high))
        if amax == 0.0:
            return self.min_val, self.max_val
        centres = low + (np.arange(self.bins) + 0.5) * (high - low) / self.bins
        magnitude = np.histogram(np.abs(centres), bins=self.bins, range=(0.0, amax),
                                 weights=self.histogram.cpu().double().numpy())[0]
        threshold = (kl_threshold_bin(magnitude, self.levels, self.stride) + 0.5) * amax / self.bins
        clip = torch.tensor(threshold, dtype=self.min_val.dtype, device=self.min_val.device)
        return torch.maximum(self.min_val, -clip), torch.minimum(self.max_val, clip)


def kl_threshold_bin(histogram: np.ndarray, levels: int = 128, stride: int = 1) -> int:
    """The bin index ``i`` whose clip ``histogram[:i]`` (outliers folded in) loses least information.

    For each candidate the reference ``P`` keeps bins below ``i`` and adds the mass beyond to bin
    ``i - 1``; ``Q`` merges the clipped bins (without that mass) into ``levels`` quantization levels
    and spreads each level's mass evenly over ``P``'s non-empty bins. The answer minimises
    ``KL(P || Q)``.
    """
    bins = len(histogram)
    best, best_bin = np.inf, bins - 1
    for i in range(levels, bins + 1, stride):
        clipped = histogram[:i].astype(np.float64)
        reference = clipped.copy()
        reference[-1] += histogram[i:].sum()
        nonzero = reference > 0
        level = np.arange(i) * levels // i
        mass = np.bincount(level, weights=clipped, minlength=levels)
        used = np.bincount(level, weights=nonzero, minlength=levels)
        candidate = np.where(nonzero, mass[level] / np.maximum(used[level], 1), 0.0)
        p, q = reference / reference.sum(), candidate / max(candidate.sum(), 1e-300)
        mask = p > 0
        divergence = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if divergence < best:
            best, best_bin = divergence, i - 1
    return best_bin


OBSERVERS: dict[str, type] = {
    "minmax": MinMaxObserver,
    "ema": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": HistogramObserver,
    "entropy": EntropyObserver,
}


def observer_class(name: str) -> type:
    """The torchao observer class called ``name`` (see ``OBSERVERS``); unknown names raise ``UserError``."""
    if name not in OBSERVERS:
        raise UserError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)} (--observer).")
    return OBSERVERS[name]


def uses_histogram(name: str) -> bool:
    """Whether observer ``name`` computes its range from a histogram (two calibration passes)."""
    return issubclass(observer_class(name), HistogramObserver)


def activation_observer(name: str):
    """The observer constructor a ``QuantizationSpec`` takes (``eps`` as XNNPACK's configs use it)."""
    cls = observer_class(name)
    kwargs: dict = {"eps": 2**-12}
    if uses_histogram(name):
        kwargs["bins"] = HISTOGRAM_BINS
    return cls.with_args(**kwargs)


def state_keys(name: str) -> tuple[str, ...]:
    """The observer buffers a calibration file stores for observer ``name``."""
    return ("min_val", "max_val", "histogram") if uses_histogram(name) else ("min_val", "max_val")
