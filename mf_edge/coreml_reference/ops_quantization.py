"""Quantization MIL ops: activation ``quantize``/``dequantize`` and compressed-weight ``constexpr_*`` ops.

Semantics from ``coremltools/converters/mil/mil/ops/defs/iOS17/quantization_ops.py``,
``iOS16/constexpr_ops.py`` and ``iOS18/compression.py``:
``quantize``: ``clip(round(x / scale) + zero_point)`` (round half to even), ``dequantize`` and
``constexpr_affine_dequantize``: ``scale * (q - zero_point)``, a vector scale lying along ``axis``;
``constexpr_blockwise_shift_scale``: ``scale * (data - offset)`` with one scale per block.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mf_edge.coreml_reference.ops_tensor import CAST_DTYPES
from mf_edge.coreml_reference.registry import as_int, kernel


def _along_axis(param: np.ndarray | None, data: np.ndarray, axis: Any) -> np.ndarray | None:
    """A scalar stays scalar; a vector is shaped to lie along ``axis`` of ``data``."""
    if param is None:
        return None
    param = np.asarray(param)
    if param.ndim == 0 or param.ndim == data.ndim:
        return param
    shape = [1] * data.ndim
    shape[as_int(axis) % data.ndim] = param.size
    return param.reshape(shape)


def _dequantize(data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: Any) -> np.ndarray:
    values = np.asarray(data).astype(np.float32)
    zero = _along_axis(zero_point, values, axis)
    if zero is not None:
        values = values - zero.astype(np.float32)
    return values * _along_axis(scale, values, axis).astype(np.float32)


@kernel("quantize")
def quantize(input: np.ndarray, scale: np.ndarray, output_dtype: str, zero_point: np.ndarray | None = None,
             axis: Any = None) -> np.ndarray:
    """``clip(round(input / scale) + zero_point)`` into int8 or uint8."""
    dtype = CAST_DTYPES[output_dtype]
    info = np.iinfo(dtype)
    with np.errstate(all="ignore"):
        values = np.round(input / _along_axis(scale, input, axis).astype(np.float32))
    zero = _along_axis(zero_point, input, axis)
    if zero is not None:
        values = values + zero.astype(np.float32)
    return np.clip(values, info.min, info.max).astype(dtype)


@kernel("dequantize")
def dequantize(input: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None,
               axis: Any = None) -> np.ndarray:
    return _dequantize(input, scale, zero_point, axis)


@kernel("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data: np.ndarray, zero_point: np.ndarray, scale: np.ndarray,
                                axis: Any) -> np.ndarray:
    return _dequantize(quantized_data, scale, zero_point, axis)


@kernel("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(data: np.ndarray, scale: np.ndarray,
                                    offset: np.ndarray | None = None) -> np.ndarray:
    """``scale * (data - offset)``; ``scale[i0, j0, ...]`` covers block ``data.shape / scale.shape``."""
    values = np.asarray(data).astype(np.float32)

    def expand(param: np.ndarray) -> np.ndarray:
        param = np.asarray(param).astype(np.float32)
        for axis, (size, blocks) in enumerate(zip(values.shape, param.shape, strict=True)):
            if blocks != size:
                param = np.repeat(param, size // blocks, axis=axis)
        return param

    if offset is not None:
        values = values - expand(offset)
    return values * expand(scale)


@kernel("constexpr_cast")
def constexpr_cast(source_val: np.ndarray, output_dtype: str) -> np.ndarray:
    return np.asarray(source_val).astype(CAST_DTYPES[output_dtype])
