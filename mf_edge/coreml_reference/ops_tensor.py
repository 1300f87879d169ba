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
    """``0`` keeps the input's size of that dimension (when ranks match); ``-1`` is inferred."""
    target = as_ints(shape)
    if len(target) == x.ndim:
        target = [x.shape[i] if size == 0 else size for i, size in enumerate(target)]
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
    """``np.take`` along ``axis`` (negative indices count from the end)."""
    if as_int(batch_dims) != 0:
        from mf_edge.coreml_reference.errors import UnsupportedOpError

        raise UnsupportedOpError("gather", "batch_dims > 0")
    return np.take(x, np.asarray(indices).astype(np.int64), axis=as_int(axis))


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
