"""Errors of the Core ML reference executor."""

from __future__ import annotations

from mf_edge.errors import RuntimeUnavailable


class UnsupportedOpError(RuntimeUnavailable):
    """The program holds an op (or an op parameter or dtype) the reference executor does not implement.

    A check that meets it is "not run: unsupported op X", never a pass. ``op_type`` names the op.
    """

    def __init__(self, op_type: str, detail: str = "") -> None:
        self.op_type = op_type
        self.detail = detail
        extra = f" ({detail})" if detail else ""
        super().__init__(f"unsupported op {op_type}{extra}: the Core ML reference executor does not "
                         "implement it; check this package with Core ML on macOS.")
