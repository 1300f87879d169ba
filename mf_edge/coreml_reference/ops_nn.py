"""Neural-network MIL ops: conv, pooling, linear/matmul, normalisation, softmax, reductions, attention.

Semantics from ``coremltools/converters/mil/mil/ops/defs/iOS15/{conv,pool,linear,normalization,
activation,reduction}.py``, padding from ``defs/_utils.py`` (``aggregated_pad``), and
``iOS18/transformers.py``. Arithmetic is float32 (the interpreter rounds fp16 results afterwards).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from mf_edge.coreml_reference.ops_tensor import CAST_DTYPES
from mf_edge.coreml_reference.registry import as_axes, as_bool, as_float, as_int, as_ints, as_list, kernel

# Convolution and pooling -------------------------------------------------------------------------


def _pads(pad_type: str, pad: Any, sizes: list[int], kernel_sizes: list[int], strides: list[int],
          dilations: list[int]) -> list[tuple[int, int]]:
    """``(before, after)`` padding of each spatial dimension for ``pad_type``."""
    if pad_type == "valid":
        return [(0, 0)] * len(sizes)
    if pad_type == "custom":
        amounts = as_ints(pad) if pad is not None else [0] * (2 * len(sizes))
        return [(amounts[2 * i], amounts[2 * i + 1]) for i in range(len(sizes))]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(sizes, kernel_sizes, strides, dilations, strict=True):
            effective = (k - 1) * d + 1
            total = max(0, (math.ceil(size / s) - 1) * s + effective - size)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if pad_type == "same" else (large, small))
        return pads
    raise ValueError(f"unknown pad_type {pad_type!r}")


def _out_size(size: int, before: int, after: int, effective: int, stride: int, ceil_mode: bool) -> int:
    span = size + before + after - effective
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + before:  # the last window must start inside the input or left pad
        out -= 1
    return out


def _windows(padded: np.ndarray, kernel_sizes: list[int], strides: list[int], dilations: list[int],
             out_sizes: list[int]) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """``(kernel offset, strided view [N, C, *out_sizes])`` for every kernel position."""
    for offsets in itertools.product(*(range(k) for k in kernel_sizes)):
        index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                      for o, d, s, n in zip(offsets, dilations, strides, out_sizes, strict=True))
        yield offsets, padded[(slice(None), slice(None), *index)]


def _geometry(x: np.ndarray, kernel_sizes: list[int], strides: Any, dilations: Any, pad_type: str, pad: Any,
              ceil_mode: bool = False) -> tuple[list[tuple[int, int]], list[int], list[int], list[int]]:
    """Explicit pads (including ceil-mode extra), output sizes, strides and dilations."""
    spatial = list(x.shape[2:])
    rank = len(spatial)
    strides_l = as_ints(strides) if strides is not None else [1] * rank
    dilations_l = as_ints(dilations) if dilations is not None else [1] * rank
    pads = _pads(pad_type, pad, spatial, kernel_sizes, strides_l, dilations_l)
    outs, full_pads = [], []
    for size, (before, after), k, s, d in zip(spatial, pads, kernel_sizes, strides_l, dilations_l,
                                              strict=True):
        effective = (k - 1) * d + 1
        out = _out_size(size, before, after, effective, s, ceil_mode)
        extra = max(0, (out - 1) * s + effective - (size + before + after))
        outs.append(out)
        full_pads.append((before, after + extra))
    return full_pads, outs, strides_l, dilations_l


@kernel("conv")
def conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, strides: Any = None,
         pad_type: str = "valid", pad: Any = None, dilations: Any = None, groups: Any = 1) -> np.ndarray:
    """Grouped N-d convolution ``[N, C_in, *D] * [C_out, C_in / groups, *K] (+ bias)``."""
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    kernel_sizes = list(weight.shape[2:])
    group_count = as_int(groups)
    pads, outs, strides_l, dilations_l = _geometry(x, kernel_sizes, strides, dilations, pad_type, pad)
    padded = np.pad(x, [(0, 0), (0, 0), *pads])
    per_group_in, per_group_out = c_in // group_count, c_out // group_count
    positions = int(np.prod(outs))
    w = weight.reshape(group_count, per_group_out, per_group_in, *kernel_sizes)
    out = np.zeros((n, group_count, per_group_out, positions), dtype=np.float32)
    for offsets, view in _windows(padded, kernel_sizes, strides_l, dilations_l, outs):
        patch = view.reshape(n, group_count, per_group_in, positions)
        w_k = w[(..., *offsets)]  # [G, O/G, C/G]
        if per_group_in == 1:
            out += patch * w_k[None]
        else:
            out += np.matmul(w_k[None], patch)
    out = out.reshape(n, c_out, *outs)
    if bias is not None:
        out += bias.reshape(1, c_out, *([1] * len(outs)))
    return out


@kernel("conv_transpose")
def conv_transpose(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, pad: Any = None,
                   output_shape: Any = None, pad_type: str = "valid", strides: Any = None,
                   dilations: Any = None, groups: Any = 1) -> np.ndarray:
    """Transposed convolution ``[N, C_in, *D] -> [N, C_out, *D_out]``, weight ``[C_in, C_out / groups, *K]``.

    Each input element scatters ``x * weight`` into the full output ``(D - 1) * stride + (K - 1) *
    dilation + 1``, which is then cropped: ``custom`` by ``pad`` before/after, ``same`` to ``D * stride``
    (the odd element cropped after), ``output_shape`` to its size (zeros appended where it is larger).
    """
    n, c_in = x.shape[:2]
    kernel_sizes = list(weight.shape[2:])
    rank = len(kernel_sizes)
    group_count = as_int(groups)
    per_group_in, per_group_out = c_in // group_count, weight.shape[1]
    strides_l = as_ints(strides) if strides is not None else [1] * rank
    dilations_l = as_ints(dilations) if dilations is not None else [1] * rank
    sizes = list(x.shape[2:])
    full = [(d - 1) * s + (k - 1) * dl + 1 for d, s, k, dl in zip(sizes, strides_l, kernel_sizes, dilations_l,
                                                                   strict=True)]
    out = np.zeros((n, group_count, per_group_out, *full), dtype=np.float32)
    xg = x.reshape(n, group_count, per_group_in, -1)
    w = weight.reshape(group_count, per_group_in, per_group_out, *kernel_sizes)
    for offsets in itertools.product(*(range(k) for k in kernel_sizes)):
        w_k = w[(..., *offsets)]  # [G, C_in/G, C_out/G]
        contribution = np.einsum("ngcp,gco->ngop", xg, w_k).reshape(n, group_count, per_group_out, *sizes)
        index = tuple(slice(o * dl, o * dl + (d - 1) * s + 1, s)
                      for o, dl, s, d in zip(offsets, dilations_l, strides_l, sizes, strict=True))
        out[(slice(None), slice(None), slice(None), *index)] += contribution
    out = out.reshape(n, group_count * per_group_out, *full)
    if pad_type == "custom" and pad is not None:
        amounts = as_ints(pad)
        crops = [(amounts[2 * i], amounts[2 * i + 1]) for i in range(rank)]
    elif pad_type == "same":
        crops = [((f - d * s) // 2, (f - d * s) - (f - d * s) // 2) if f > d * s else (0, 0)
                 for f, d, s in zip(full, sizes, strides_l, strict=True)]
    else:
        crops = [(0, 0)] * rank
    targets = [f - before - after for f, (before, after) in zip(full, crops, strict=True)]
    if output_shape is not None:
        targets = as_ints(output_shape)[2:]
    index = tuple(slice(before, before + t) for (before, _), t in zip(crops, targets, strict=True))
    out = out[(slice(None), slice(None), *index)]
    missing = [(0, t - size) for t, size in zip(targets, out.shape[2:], strict=True)]
    if any(extra for _, extra in missing):
        out = np.pad(out, [(0, 0), (0, 0), *missing])
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * rank))
    return out


def _pool(x: np.ndarray, kernel_sizes: Any, strides: Any, pad_type: str, pad: Any, ceil_mode: Any,
          fill: float, combine: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[np.ndarray, Any]:
    sizes = as_ints(kernel_sizes)
    ceil = as_bool(ceil_mode) if ceil_mode is not None else False
    pads, outs, strides_l, dilations_l = _geometry(x, sizes, strides, None, pad_type, pad, ceil)
    padded = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=fill)
    result = None
    for _, view in _windows(padded, sizes, strides_l, dilations_l, outs):
        result = view.copy() if result is None else combine(result, view)
    return result, (pads, outs, strides_l, sizes)


@kernel("avg_pool")
def avg_pool(x: np.ndarray, kernel_sizes: Any, strides: Any = None, pad_type: str = "valid", pad: Any = None,
             exclude_padding_from_average: Any = False, ceil_mode: Any = False) -> np.ndarray:
    """Window mean; the divisor counts padded zeros unless ``exclude_padding_from_average``."""
    total, (pads, outs, strides_l, sizes) = _pool(x, kernel_sizes, strides, pad_type, pad, ceil_mode, 0.0,
                                                  np.add)
    spatial = list(x.shape[2:])
    explicit = _pads(pad_type, pad, spatial, sizes, strides_l, [1] * len(sizes))
    # 1 where a window element counts: inside the input, or inside explicit padding when it is counted.
    counted = np.ones([1, 1, *spatial], dtype=np.float32)
    if not as_bool(exclude_padding_from_average):
        counted = np.pad(counted, [(0, 0), (0, 0), *explicit], constant_values=1.0)
        ceil_extra = [(0, after - e_after) for (_, after), (_, e_after) in zip(pads, explicit, strict=True)]
    else:
        ceil_extra = pads
    counted = np.pad(counted, [(0, 0), (0, 0), *ceil_extra])
    count = None
    for _, view in _windows(counted, sizes, strides_l, [1] * len(sizes), outs):
        count = view.copy() if count is None else count + view
    return total / count


@kernel("max_pool")
def max_pool(x: np.ndarray, kernel_sizes: Any, strides: Any = None, pad_type: str = "valid", pad: Any = None,
             ceil_mode: Any = False) -> np.ndarray:
    result, _ = _pool(x, kernel_sizes, strides, pad_type, pad, ceil_mode, -np.inf, np.maximum)
    return result


# Linear algebra ----------------------------------------------------------------------------------


@kernel("linear")
def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight.T + bias``."""
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # one 2-D GEMM instead of a stack of them
    out = (flat @ np.ascontiguousarray(weight.T)).reshape(*x.shape[:-1], weight.shape[0])
    return out + bias if bias is not None else out


@kernel("matmul")
def matmul(x: np.ndarray, y: np.ndarray, transpose_x: Any = False, transpose_y: Any = False) -> np.ndarray:
    """Batched matmul with numpy broadcasting; ``transpose_*`` swap the last two axes first."""
    if as_bool(transpose_x) and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if as_bool(transpose_y) and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@kernel("einsum")
def einsum(values: Any, equation: str) -> np.ndarray:
    """``np.einsum(equation, *values)``."""
    return np.einsum(equation, *as_list(values))


@kernel("scaled_dot_product_attention")
def scaled_dot_product_attention(query: np.ndarray, key: np.ndarray, value: np.ndarray,
                                 attn_mask: np.ndarray | None = None) -> np.ndarray:
    """``softmax(Q K^T / sqrt(E) + mask) V``; a boolean mask is ``-inf`` where False."""
    scores = np.matmul(query, np.swapaxes(key, -1, -2)) / np.float32(math.sqrt(query.shape[-1]))
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        additive = np.where(mask, 0.0, -np.inf).astype(np.float32) if mask.dtype == np.bool_ else mask
        scores = scores + additive
    return np.matmul(softmax(scores, -1), value)


# Normalisation and softmax -----------------------------------------------------------------------


def _affine(param: np.ndarray, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``gamma``/``beta`` of shape ``x.shape[axes]`` placed on ``axes`` for broadcasting."""
    if param.shape == tuple(x.shape[i] for i in axes):
        return param.reshape([x.shape[i] if i in axes else 1 for i in range(x.ndim)])
    return param


@kernel("layer_norm")
def layer_norm(x: np.ndarray, axes: Any = None, gamma: np.ndarray | None = None,
               beta: np.ndarray | None = None, epsilon: Any = 1e-5) -> np.ndarray:
    """``gamma * (x - mean) / sqrt(var + epsilon) + beta`` over ``axes`` (all axes by default)."""
    dims = as_axes(axes, x.ndim) or tuple(range(x.ndim))
    centred = x - x.mean(axis=dims, keepdims=True)
    var = np.square(centred).mean(axis=dims, keepdims=True)
    out = centred / np.sqrt(var + np.float32(as_float(epsilon)))
    if gamma is not None:
        out = out * _affine(gamma, x, dims)
    if beta is not None:
        out = out + _affine(beta, x, dims)
    return out


@kernel("batch_norm")
def batch_norm(x: np.ndarray, mean: np.ndarray, variance: np.ndarray, gamma: np.ndarray | None = None,
               beta: np.ndarray | None = None, epsilon: Any = 1e-5) -> np.ndarray:
    """Per-channel (axis 1) ``gamma * (x - mean) / sqrt(variance + epsilon) + beta``."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    out = (x - mean.reshape(shape)) / np.sqrt(variance.reshape(shape) + np.float32(as_float(epsilon)))
    if gamma is not None:
        out = out * gamma.reshape(shape)
    return out + beta.reshape(shape) if beta is not None else out


@kernel("instance_norm")
def instance_norm(x: np.ndarray, gamma: np.ndarray | None = None, beta: np.ndarray | None = None,
                  epsilon: Any = 1e-5) -> np.ndarray:
    """Normalise each ``[n, c]`` slice over the spatial axes, then per-channel affine."""
    dims = tuple(range(2, x.ndim))
    centred = x - x.mean(axis=dims, keepdims=True)
    out = centred / np.sqrt(np.square(centred).mean(axis=dims, keepdims=True) + np.float32(as_float(epsilon)))
    shape = [1, -1] + [1] * (x.ndim - 2)
    if gamma is not None:
        out = out * gamma.reshape(shape)
    return out + beta.reshape(shape) if beta is not None else out


@kernel("l2_norm")
def l2_norm(x: np.ndarray, epsilon: Any = 1e-6) -> np.ndarray:
    """``x / sqrt(sum(x^2) + epsilon)`` over the last three dimensions (the leading ones are batch)."""
    dims = tuple(range(x.ndim - 3, x.ndim))
    return x / np.sqrt(np.square(x).sum(axis=dims, keepdims=True) + np.float32(as_float(epsilon)))


@kernel("local_response_norm")
def local_response_norm(x: np.ndarray, size: Any, alpha: Any = 1e-4, beta: Any = 0.75,
                        k: Any = 1.0) -> np.ndarray:
    """``x / (k + alpha / size * sum(x^2 over size neighbouring channels)) ^ beta``; the window of
    channel c spans ``c - size // 2 .. c + (size - 1) // 2``."""
    n = as_int(size)
    squares = np.square(x.astype(np.float64))
    padded = np.pad(squares, [(0, 0), (n // 2, (n - 1) // 2)] + [(0, 0)] * (x.ndim - 2))
    cumulative = np.concatenate([np.zeros_like(padded[:, :1]), np.cumsum(padded, axis=1)], axis=1)
    window = cumulative[:, n:] - cumulative[:, :-n]
    scale = (as_float(k) + as_float(alpha) / n * window) ** as_float(beta)
    return (x / scale).astype(np.float32)


@kernel("softmax")
def softmax(x: np.ndarray, axis: Any = -1) -> np.ndarray:
    """``exp(x) / sum(exp(x), axis)`` (max-shifted)."""
    dim = as_int(axis)
    shifted = np.exp(x - x.max(axis=dim, keepdims=True))
    return shifted / shifted.sum(axis=dim, keepdims=True)


# Reductions --------------------------------------------------------------------------------------

_REDUCERS: dict[str, Callable[..., np.ndarray]] = {
    "reduce_mean": lambda x, a, k: np.mean(x, axis=a, keepdims=k),
    "reduce_sum": lambda x, a, k: np.sum(x, axis=a, keepdims=k),
    "reduce_max": lambda x, a, k: np.max(x, axis=a, keepdims=k),
    "reduce_min": lambda x, a, k: np.min(x, axis=a, keepdims=k),
    "reduce_prod": lambda x, a, k: np.prod(x, axis=a, keepdims=k),
    "reduce_sum_square": lambda x, a, k: np.sum(np.square(x), axis=a, keepdims=k),
    "reduce_l1_norm": lambda x, a, k: np.sum(np.abs(x), axis=a, keepdims=k),
    "reduce_l2_norm": lambda x, a, k: np.sqrt(np.sum(np.square(x), axis=a, keepdims=k)),
    "reduce_log_sum": lambda x, a, k: np.log(np.sum(x, axis=a, keepdims=k)),
    "reduce_log_sum_exp": lambda x, a, k: np.log(np.sum(np.exp(x), axis=a, keepdims=k)),
}


def _reduction(reduce: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def apply(x: np.ndarray, axes: Any = None, keep_dims: Any = False) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.asarray(reduce(x, as_axes(axes, x.ndim), as_bool(keep_dims)))

    return apply


for _op_type, _reduce in _REDUCERS.items():
    kernel(_op_type)(_reduction(_reduce))


@kernel("reduce_argmax")
def reduce_argmax(x: np.ndarray, axis: Any = -1, keep_dims: Any = False,
                  output_dtype: str = "int32") -> np.ndarray:
    """Index of the first maximum; ``output_dtype`` (iOS17) is the index dtype."""
    return np.argmax(x, axis=as_int(axis), keepdims=as_bool(keep_dims)).astype(CAST_DTYPES[output_dtype])


@kernel("reduce_argmin")
def reduce_argmin(x: np.ndarray, axis: Any = -1, keep_dims: Any = False,
                  output_dtype: str = "int32") -> np.ndarray:
    """Index of the first minimum; ``output_dtype`` (iOS17) is the index dtype."""
    return np.argmin(x, axis=as_int(axis), keepdims=as_bool(keep_dims)).astype(CAST_DTYPES[output_dtype])
