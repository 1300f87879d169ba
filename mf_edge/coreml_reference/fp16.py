"""fp16 emulation and the numeric report.

An op whose output the program declares fp16 is computed in float32 and rounded to float16 right
after, as a GPU or Neural Engine running the fp16 program stores it. The rounding is where fp16 goes
wrong, and each such event becomes a ``Finding``:

- ``overflow``: finite values beyond the fp16 range (|x| > 65504) that became +-inf;
- ``non-finite``: the op produced inf/nan from finite inputs (in any precision);
- ``underflow``: at least ``underflow_fraction`` (default half) of the op's non-zero values, and at
  least 16 of them, fell below the smallest normal fp16 (6.1e-5), i.e. became subnormal (precision
  lost) or flushed to zero: the tensor as a whole lives below fp16's range.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

FP16_MAX = float(np.finfo(np.float16).max)
FP16_SMALLEST_NORMAL = float(np.finfo(np.float16).smallest_normal)
DEFAULT_UNDERFLOW_FRACTION = 0.5
UNDERFLOW_MIN_VALUES = 16  # a handful of tiny values (a mean of centred data) is no range problem


@dataclass
class Finding:
    """One numeric event at one op: ``count`` of ``total`` values, ``peak`` the largest |x| involved."""

    op_name: str
    op_type: str
    kind: str
    count: int
    total: int
    peak: float = 0.0
    zeros: int = 0

    def __str__(self) -> str:
        where = f"{self.op_name} ({self.op_type})"
        share = f"{self.count} of {self.total} values"
        if self.kind == "overflow":
            return f"{where}: {share} overflow fp16 to inf (max |x| {self.peak:.4g} > {FP16_MAX:.0f})"
        if self.kind == "underflow":
            return (f"{where}: {self.count} of {self.total} non-zero values fall below the fp16 normal "
                    f"range (|x| < {FP16_SMALLEST_NORMAL:.3g}; {self.zeros} flushed to zero)")
        return f"{where}: {share} are inf/nan"

    def to_dict(self) -> dict:
        return asdict(self)


class Report:
    """Findings accumulated over every run since load (or ``clear``), one per op and kind."""

    def __init__(self) -> None:
        self._findings: dict[tuple[str, str], Finding] = {}

    def add(self, finding: Finding) -> None:
        key = (finding.op_name, finding.kind)
        if key not in self._findings:
            self._findings[key] = finding
            return
        seen = self._findings[key]
        seen.count += finding.count
        seen.total += finding.total
        seen.zeros += finding.zeros
        seen.peak = max(seen.peak, finding.peak)

    def clear(self) -> None:
        self._findings.clear()

    def __iter__(self) -> Iterator[Finding]:
        return iter(list(self._findings.values()))

    def __len__(self) -> int:
        return len(self._findings)

    def __getitem__(self, index: int) -> Finding:
        return list(self._findings.values())[index]

    def kinds(self) -> set[str]:
        return {finding.kind for finding in self}

    def to_list(self) -> list[dict]:
        return [finding.to_dict() for finding in self]

    def __str__(self) -> str:
        if not self._findings:
            return "no fp16 range problems found"
        return "\n".join(str(finding) for finding in self)


def non_finite(value: np.ndarray, op_name: str, op_type: str) -> Finding | None:
    """A ``non-finite`` finding when ``value`` holds inf or nan."""
    bad = int(np.count_nonzero(~np.isfinite(value)))
    return Finding(op_name, op_type, "non-finite", bad, int(value.size)) if bad else None


def round_to_fp16(value: np.ndarray, op_name: str, op_type: str, inputs_finite: bool,
                  underflow_fraction: float = DEFAULT_UNDERFLOW_FRACTION) -> tuple[np.ndarray, list[Finding]]:
    """``value`` rounded to float16, with the findings the rounding caused."""
    wide = np.asarray(value, dtype=np.float32)
    with np.errstate(over="ignore"):
        narrow = wide.astype(np.float16)
    findings = []
    finite = np.isfinite(wide)
    if inputs_finite and not finite.all():
        findings.append(Finding(op_name, op_type, "non-finite", int(np.count_nonzero(~finite)),
                                int(wide.size)))
    overflowed = finite & ~np.isfinite(narrow)
    if overflowed.any():
        findings.append(Finding(op_name, op_type, "overflow", int(np.count_nonzero(overflowed)),
                                int(wide.size), float(np.abs(wide[overflowed]).max())))
    magnitude = np.abs(wide[finite])
    nonzero = magnitude[magnitude > 0]
    if nonzero.size:
        small = nonzero < FP16_SMALLEST_NORMAL
        lost = int(np.count_nonzero(small))
        if lost >= max(UNDERFLOW_MIN_VALUES, underflow_fraction * nonzero.size):
            zeros = int(np.count_nonzero(nonzero.astype(np.float16) == 0))
            findings.append(Finding(op_name, op_type, "underflow", lost, int(nonzero.size),
                                    float(nonzero[small].max()), zeros))
    return narrow, findings
