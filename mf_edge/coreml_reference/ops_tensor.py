"""Tensor-manipulation MIL ops: const, cast, reshape, transpose, slicing, split/concat, gather, classify.

Semantics from ``coremltools/converters/mil/mil/ops/defs/iOS15/tensor_transformation.py``,
``tensor_operation.py``, ``scatter_gather.py``, ``classify.py`` and the iOS16-18 revisions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mf_edge.coreml_reference.registry import as_axes, as_bool, as_int, as_ints, as_list, kernel

#: ``cast``'s dtype strings.
CAST_DTYPES = {
    "bool": np.bool_, "fp16": np.float16, "fp32": np.float32, "fp64": np.float64,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
}


@kernel("const")
def const(val: Any) -> Any:
    return val


@kernel("identity")
def identity(x: np.ndarray) -> np.ndarray:
    return x


@kernel("cast")
def cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """Convert to ``dtype`` (float -> int truncates toward zero, as numpy and coremltools do).

    To fp16 the value stays float32 here: the interpreter rounds every declared-fp16 output, and so
    reports values beyond fp16's range as an overflow (not as inf/nan the cast made up).
    """
    if CAST_DTYPES[dtype] == np.float16:
        return np.asarray(x, dtype=np.float32)
    return np.asarray(x).astype(CAST_DTYPES[dtype])


@kernel("reshape")
def reshape(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """``-1`` is inferred; ``0`` copies the input's dimension counted from the right (iOS17; the same as
    iOS15's rule, which allows ``0`` only when the ranks match), or is 1 when there is none."""
    target = as_ints(shape)
    offset = x.ndim - len(target)
    target = [size if size != 0 else (x.shape[i + offset] if i + offset >= 0 else 1)
              for i, size in enumerate(target)]
    return x.reshape(target)


@kernel("transpose")
def transpose(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    return np.transpose(x, as_ints(perm))


@kernel("squeeze")
def squeeze(x: np.ndarray, axes: np.ndarray | None = None) -> np.ndarray:
    """Remove size-1 axes (all of them by default); a listed axis that is not size 1 is kept."""
    if axes is None:
        return np.squeeze(x)
    drop = tuple(a for a in as_axes(axes, x.ndim) if x.shape[a] == 1)
    return np.squeeze(x, axis=drop)


@kernel("expand_dims")
def expand_dims(x: np.ndarray, axes: np.ndarray) -> np.ndarray:
    rank = x.ndim + len(as_ints(axes))
    return np.expand_dims(x, tuple(sorted(a % rank for a in as_ints(axes))))


@kernel("slice_by_index")
def slice_by_index(x: np.ndarray, begin: np.ndarray, end: np.ndarray, stride: np.ndarray | None = None,
                   begin_mask: np.ndarray | None = None, end_mask: np.ndarray | None = None,
                   squeeze_mask: np.ndarray | None = None) -> np.ndarray:
    """``x[begin[i]:end[i]:stride[i], ...]`` with the begin/end/squeeze masks."""
    rank = x.ndim
    strides = as_ints(stride) if stride is not None else [1] * rank
    begins, ends = as_ints(begin), as_ints(end)
    begin_masked = [bool(m) for m in np.asarray(begin_mask).reshape(-1)] if begin_mask is not None else []
    end_masked = [bool(m) for m in np.asarray(end_mask).reshape(-1)] if end_mask is not None else []
    squeezed = [bool(m) for m in np.asarray(squeeze_mask).reshape(-1)] if squeeze_mask is not None else []
    index: list[Any] = []
    for i in range(rank):
        if squeezed and squeezed[i]:
            index.append(begins[i])
            continue
        start = None if begin_masked and begin_masked[i] else begins[i]
        stop = None if end_masked and end_masked[i] else ends[i]
        index.append(slice(start, stop, strides[i]))
    return np.asarray(x[tuple(index)])


@kernel("slice_by_size")
def slice_by_size(x: np.ndarray, begin: np.ndarray, size: np.ndarray) -> np.ndarray:
    """``x[begin[i] : begin[i] + size[i]]``; ``size -1`` takes the rest of the dimension."""
    index = tuple(slice(b, None if s == -1 else b + s) for b, s in zip(as_ints(begin), as_ints(size),
                                                                        strict=True))
    return x[index]


@kernel("split")
def split(x: np.ndarray, axis: np.ndarray, num_splits: np.ndarray | None = None,
          split_sizes: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Even ``num_splits`` pieces, or pieces of ``split_sizes`` along ``axis``."""
    dim = as_int(axis) % x.ndim
    if split_sizes is not None:
        bounds = np.cumsum(as_ints(split_sizes))[:-1]
        return tuple(np.split(x, bounds, axis=dim))
    return tuple(np.split(x, as_int(num_splits), axis=dim))


@kernel("concat")
def concat(values: Any, axis: np.ndarray, interleave: np.ndarray | None = None) -> np.ndarray:
    """Concatenate along ``axis``; ``interleave`` alternates slices of equally shaped inputs."""
    arrays = [np.asarray(v) for v in as_list(values)]
    dim = as_int(axis) % arrays[0].ndim
    if interleave is not None and as_bool(interleave):
        stacked = np.stack(arrays, axis=dim + 1)
        shape = list(arrays[0].shape)
        shape[dim] *= len(arrays)
        return stacked.reshape(shape)
    return np.concatenate(arrays, axis=dim)


@kernel("stack")
def stack(values: Any, axis: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(v) for v in as_list(values)], axis=as_int(axis))


@kernel("gather")
def gather(x: np.ndarray, indices: np.ndarray, axis: np.ndarray | int = 0,
           validate_indices: np.ndarray | None = None, batch_dims: np.ndarray | int = 0) -> np.ndarray:
    """``np.take`` along ``axis`` (negative indices count from the end); with ``batch_dims`` b (iOS16,
    as ``tf.gather``) the first b dimensions of ``x`` and ``indices`` are paired: the output is
    ``x.shape[:axis] + indices.shape[b:] + x.shape[axis + 1:]``."""
    index = np.asarray(indices).astype(np.int64)
    dim = as_int(axis) % x.ndim
    batch = as_int(batch_dims) % index.ndim if as_int(batch_dims) else 0
    if batch == 0:
        return np.take(x, index, axis=dim)
    lead = x.shape[:batch]
    out = [np.take(x[b], index[b], axis=dim - batch) for b in np.ndindex(*lead)]
    return np.stack(out).reshape(*lead, *out[0].shape)


@kernel("gather_nd")
def gather_nd(x: np.ndarray, indices: np.ndarray, validate_indices: Any = None,
              batch_dims: Any = 0) -> np.ndarray:
    """``x[indices[..., 0], ..., indices[..., K - 1]]`` (slices of the remaining dimensions); with
    ``batch_dims`` b (iOS16) the first b dimensions of ``x`` and ``indices`` are paired."""
    index = np.asarray(indices).astype(np.int64)
    batch = as_int(batch_dims)
    lead = x.shape[:batch]
    out = []
    for b in np.ndindex(*lead):
        data, where = x[b], index[b]
        depth = where.shape[-1]
        where = np.where(where < 0, where + np.asarray(data.shape[:depth]), where)
        out.append(data[tuple(np.moveaxis(where, -1, 0))])
    return np.stack(out).reshape(*lead, *out[0].shape)


@kernel("reshape_like")
def reshape_like(x: np.ndarray, ref_tensors: Any, begins: Any, ends: Any, end_masks: Any) -> np.ndarray:
    """Reshape to the concatenated ``ref_tensors[i].shape[begins[i]:ends[i]]`` (to the end when
    ``end_masks[i]``)."""
    shape: list[int] = []
    refs = as_list(ref_tensors)
    for ref, begin, end, to_end in zip(refs, as_ints(begins), as_ints(ends),
                                       [bool(m) for m in np.asarray(end_masks).reshape(-1)], strict=True):
        dims = np.shape(ref)
        shape.extend(dims[begin:] if to_end else dims[begin:end])
    return x.reshape(shape)


@kernel("shape")
def shape(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.shape(x), dtype=np.int32)


@kernel("tile")
def tile(x: np.ndarray, reps: np.ndarray) -> np.ndarray:
    return np.tile(x, as_ints(reps))


@kernel("pad")
def pad(x: np.ndarray, pad: np.ndarray, mode: str = "constant", constant_val: Any = 0.0) -> np.ndarray:
    """Pad the last ``len(pad) / 2`` dimensions: ``pad[2i]`` before and ``pad[2i+1]`` after."""
    amounts = as_ints(pad)
    padded = len(amounts) // 2
    widths = [(0, 0)] * (x.ndim - padded) + [(amounts[2 * i], amounts[2 * i + 1]) for i in range(padded)]
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=np.asarray(constant_val).item())
    return np.pad(x, widths, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@kernel("pixel_shuffle")
def pixel_shuffle(x: np.ndarray, upscale_factor: Any) -> np.ndarray:
    """``[N, C * f^2, H, W] -> [N, C, H * f, W * f]``, channel ``c * f^2 + i * f + j`` to pixel ``(i, j)``."""
    f = as_int(upscale_factor)
    n, c, h, w = x.shape
    blocks = x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3)
    return blocks.reshape(n, c // (f * f), h * f, w * f)


@kernel("pixel_unshuffle")
def pixel_unshuffle(x: np.ndarray, downscale_factor: Any) -> np.ndarray:
    """The inverse of ``pixel_shuffle``: ``[N, C, H * f, W * f] -> [N, C * f^2, H, W]``."""
    f = as_int(downscale_factor)
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, h // f, f, w // f, f).transpose(0, 1, 3, 5, 2, 4)
    return blocks.reshape(n, c * f * f, h // f, w // f)


@kernel("depth_to_space")
def depth_to_space(x: np.ndarray, block_size: Any) -> np.ndarray:
    """``[N, C * b^2, H, W] -> [N, C, H * b, W * b]``, channel ``(i * b + j) * C + c`` to pixel ``(i, j)``
    (depth-column-row order, as TensorFlow's ``depth_to_space``)."""
    b = as_int(block_size)
    n, c, h, w = x.shape
    blocks = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return blocks.reshape(n, c // (b * b), h * b, w * b)


@kernel("space_to_depth")
def space_to_depth(x: np.ndarray, block_size: Any) -> np.ndarray:
    """The inverse of ``depth_to_space``: ``[N, C, H * b, W * b] -> [N, C * b^2, H, W]``."""
    b = as_int(block_size)
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return blocks.reshape(n, c * b * b, h // b, w // b)


def _order(x: np.ndarray, axis: int, ascending: bool) -> np.ndarray:
    """Stable sort order along ``axis`` (ties keep the lower index first)."""
    keys = np.asarray(x, dtype=np.float64)
    return np.argsort(keys if ascending else -keys, axis=axis, kind="stable")


@kernel("topk")
def topk(x: np.ndarray, k: Any = 1, axis: Any = -1, ascending: Any = False, sort: Any = True,
         return_indices: Any = True, output_indices_dtype: str = "int32") -> Any:
    """The ``k`` largest (smallest when ``ascending``) values along ``axis`` and their indices; ``k = -1``
    takes all. The values are returned sorted whatever ``sort`` says (any order is allowed then)."""
    dim = as_int(axis) % x.ndim
    count = as_int(k)
    order = _order(x, dim, as_bool(ascending))
    if count != -1:
        order = np.take(order, np.arange(count), axis=dim)
    values = np.take_along_axis(x, order, axis=dim)
    if not as_bool(return_indices):
        return values
    return values, order.astype(CAST_DTYPES[output_indices_dtype])


@kernel("argsort")
def argsort(x: np.ndarray, axis: Any = -1, ascending: Any = False) -> np.ndarray:
    """Indices that sort ``x`` along ``axis`` (descending by default), stable."""
    return _order(x, as_int(axis) % x.ndim, as_bool(ascending)).astype(np.int32)


@kernel("cumsum")
def cumsum(x: np.ndarray, axis: Any = 0, exclusive: Any = False, reverse: Any = False) -> np.ndarray:
    """Cumulative sum along ``axis``; ``exclusive`` starts at 0, ``reverse`` sums from the end."""
    dim = as_int(axis) % x.ndim
    values = np.flip(x, dim) if as_bool(reverse) else x
    total = np.cumsum(values, axis=dim, dtype=values.dtype)
    if as_bool(exclusive):
        total = total - values
    return np.flip(total, dim) if as_bool(reverse) else total


@kernel("select")
def select(cond: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` where ``cond`` else ``b`` (broadcast)."""
    return np.where(np.asarray(cond).astype(bool), a, b)


@kernel("fill")
def fill(shape: np.ndarray, value: Any = 0.0) -> np.ndarray:
    return np.full(as_ints(shape), np.asarray(value))


@kernel("range_1d")
def range_1d(end: Any, start: Any, step: Any) -> np.ndarray:
    """``[start, start + step, ...)`` up to ``end`` (exclusive)."""
    return np.arange(np.asarray(start).item(), np.asarray(end).item(), np.asarray(step).item())


@kernel("flatten2d")
def flatten2d(x: np.ndarray, axis: Any = 1) -> np.ndarray:
    """``[prod(shape[:axis]), prod(shape[axis:])]``; ``axis`` lies in ``[-rank, rank]`` (``rank`` gives
    ``[size, 1]``)."""
    dim = as_int(axis)
    dim = dim + x.ndim if dim < 0 else dim
    return x.reshape(int(np.prod(x.shape[:dim], dtype=np.int64)), int(np.prod(x.shape[dim:], dtype=np.int64)))


@kernel("reverse")
def reverse(x: np.ndarray, axes: Any = None) -> np.ndarray:
    """Reverse the order along ``axes`` (all axes by default)."""
    return np.flip(x, as_axes(axes, x.ndim))


@kernel("gather_along_axis")
def gather_along_axis(x: np.ndarray, indices: np.ndarray, axis: Any = 0,
                      validate_indices: Any = None) -> np.ndarray:
    """``np.take_along_axis`` (negative indices count from the end)."""
    dim = as_int(axis) % x.ndim
    index = np.asarray(indices).astype(np.int64)
    return np.take_along_axis(x, np.where(index < 0, index + x.shape[dim], index), axis=dim)


@kernel("classify")
def classify(probabilities: np.ndarray, classes: list) -> tuple[np.ndarray, np.ndarray]:
    """A classifier's outputs: the label of the highest score, and the scores in ``classes`` order.

    Core ML returns the scores as a ``{label: score}`` dictionary; here they stay an array
    ``[..., len(classes)]`` (the dictionary's values in label order).
    """
    labels = np.array([np.asarray(c).item() if isinstance(c, np.ndarray) else c for c in classes],
                      dtype=object)
    scores = np.asarray(probabilities, dtype=np.float64)
    flat = scores.reshape(-1, scores.shape[-1])
    return labels[np.argmax(flat, axis=-1)], scores
