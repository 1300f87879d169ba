"""The op registry: one small numpy function per MIL op type, registered with ``@kernel("op_type")``.

A kernel takes the op's parameters as keyword arguments named as in the MIL op specification
(``coremltools/converters/mil/mil/ops/defs/iOS15..iOS18``): tensors as numpy arrays (fp16 inputs
arrive widened to float32), strings as ``str``, tuples as lists. Optional parameters have the spec's
default. It returns one array, or a tuple for a multi-output op; the interpreter casts (and for fp16,
rounds) each result to the dtype the program declares.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from mf_edge.coreml_reference.errors import UnsupportedOpError

Kernel = Callable[..., Any]
KERNELS: dict[str, Kernel] = {}


def kernel(*op_types: str) -> Callable[[Kernel], Kernel]:
    """Register ``fn`` as the implementation of ``op_types``."""

    def register(fn: Kernel) -> Kernel:
        for op_type in op_types:
            KERNELS[op_type] = fn
        return fn

    return register


def _load_kernels() -> None:
    from mf_edge.coreml_reference import (  # noqa: F401  (importing registers the kernels)
        ops_elementwise,
        ops_nn,
        ops_quantization,
        ops_tensor,
    )


def get_kernel(op_type: str, params: Iterable[str] = ()) -> Kernel:
    """The kernel of ``op_type``; ``UnsupportedOpError`` for an unknown op or a parameter it lacks."""
    _load_kernels()
    if op_type not in KERNELS:
        raise UnsupportedOpError(op_type)
    fn = KERNELS[op_type]
    accepted = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise UnsupportedOpError(op_type, f"parameter {', '.join(unknown)}")
    return fn


def supported_ops() -> list[str]:
    """Every op type the executor implements, each with every parameter of its MIL spec (iOS15-18;
    ``tests/test_coreml_reference_ops.py`` checks the kernels against coremltools' op registry)."""
    _load_kernels()
    return sorted(KERNELS)


# Small helpers for const parameters -------------------------------------------------------------


def as_int(value: Any) -> int:
    return int(np.asarray(value).reshape(-1)[0])


def as_ints(value: Any) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def as_bool(value: Any) -> bool:
    return bool(np.asarray(value).reshape(-1)[0])


def as_float(value: Any) -> float:
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


def as_axes(axes: Any, rank: int) -> tuple[int, ...] | None:
    """Normalised non-negative axes, or ``None`` for "all axes"."""
    if axes is None:
        return None
    return tuple(sorted(a % rank if rank else 0 for a in as_ints(axes)))


def as_list(values: Any) -> list:
    """A tuple parameter (``concat.values``) as a list, also when it holds a single binding."""
    return list(values) if isinstance(values, list) else [values]
