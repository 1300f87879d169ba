"""Decoding MIL ``Value`` protobufs (inline immediates and ``weight.bin`` blob entries) into numpy.

Blob entries are read with coremltools' own storage reader (``libmilstoragepython``), the code Core ML
tools use to write them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from coremltools.proto import MIL_pb2

from mf_edge.coreml_reference.errors import UnsupportedOpError
from mf_edge.errors import UserError

DataType = MIL_pb2.DataType

#: MIL dtype -> numpy dtype for the tensor types the executor computes with.
NUMPY_DTYPES: dict[int, Any] = {
    DataType.BOOL: np.bool_,
    DataType.STRING: np.str_,
    DataType.FLOAT16: np.float16,
    DataType.FLOAT32: np.float32,
    DataType.FLOAT64: np.float64,
    DataType.INT8: np.int8,
    DataType.INT16: np.int16,
    DataType.INT32: np.int32,
    DataType.INT64: np.int64,
    DataType.UINT8: np.uint8,
    DataType.UINT16: np.uint16,
    DataType.UINT32: np.uint32,
    DataType.UINT64: np.uint64,
    DataType.INT4: np.int8,
    DataType.UINT4: np.uint8,
    DataType.UINT1: np.uint8,
    DataType.UINT2: np.uint8,
    DataType.UINT3: np.uint8,
    DataType.UINT6: np.uint8,
}

#: MIL dtype -> the blob reader method that decodes it.
_BLOB_READERS = {
    DataType.FLOAT16: "read_fp16_data",
    DataType.FLOAT32: "read_float_data",
    DataType.INT8: "read_int8_data",
    DataType.INT16: "read_int16_data",
    DataType.INT32: "read_int32_data",
    DataType.UINT8: "read_uint8_data",
    DataType.UINT16: "read_uint16_data",
    DataType.UINT32: "read_uint32_data",
    DataType.INT4: "read_int4_data",
    DataType.UINT4: "read_uint4_data",
    DataType.UINT1: "read_uint1_data",
    DataType.UINT2: "read_uint2_data",
    DataType.UINT3: "read_uint3_data",
    DataType.UINT6: "read_uint6_data",
}


#: Sub-byte MIL dtypes: bits per element and whether they are signed.
SUB_BYTE_BITS: dict[int, tuple[int, bool]] = {
    DataType.INT4: (4, True),
    DataType.UINT4: (4, False),
    DataType.UINT1: (1, False),
    DataType.UINT2: (2, False),
    DataType.UINT3: (3, False),
    DataType.UINT6: (6, False),
}


def unpack_bits(packed: bytes, data_type: int, count: int) -> np.ndarray:
    """``count`` sub-byte integers packed least significant bit first (as MIL stores them)."""
    nbits, signed = SUB_BYTE_BITS[data_type]
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), bitorder="little")[:count * nbits]
    values = bits.reshape(count, nbits).astype(np.int16) @ (1 << np.arange(nbits, dtype=np.int16))
    if signed:
        values = np.where(values >= 1 << (nbits - 1), values - (1 << nbits), values)
    return values.astype(np.int8 if signed else np.uint8)


def dtype_name(data_type: int) -> str:
    """``FLOAT16`` etc. for a MIL ``DataType`` number."""
    return DataType.Name(data_type)


def numpy_dtype(data_type: int, what: str) -> Any:
    """The numpy dtype of a MIL ``DataType``; ``what`` names the op for the unsupported-dtype error."""
    if data_type not in NUMPY_DTYPES:
        raise UnsupportedOpError(what, f"dtype {dtype_name(data_type)}")
    return NUMPY_DTYPES[data_type]


def tensor_shape(tensor_type: MIL_pb2.TensorType) -> tuple[int | None, ...]:
    """The shape of a MIL tensor type; ``None`` for a dimension known only at run time."""
    return tuple(dim.constant.size if dim.WhichOneof("dimension") == "constant" else None
                 for dim in tensor_type.dimensions)


@dataclass
class BlobFiles:
    """Open ``weight.bin`` readers of one package, by file name."""

    weights_dir: Path | None
    readers: dict[str, Any] = field(default_factory=dict)

    def read(self, file_name: str, offset: int, data_type: int, what: str) -> np.ndarray:
        """The flat array stored at ``offset`` of ``file_name`` (``@model_path/weights/weight.bin``)."""
        from coremltools.libmilstoragepython import _BlobStorageReader

        if self.weights_dir is None:
            raise UserError(f"{what} refers to {file_name} but the package has no weights folder; "
                            "re-save the .mlpackage with coremltools.")
        name = Path(file_name).name
        if name not in self.readers:
            path = self.weights_dir / name
            if not path.is_file():
                raise UserError(f"weight file {path} is missing; re-save the .mlpackage with coremltools.")
            self.readers[name] = _BlobStorageReader(str(path))
        if data_type not in _BLOB_READERS:
            raise UnsupportedOpError(what, f"blob dtype {dtype_name(data_type)}")
        try:
            data = getattr(self.readers[name], _BLOB_READERS[data_type])(offset)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"weight file {name} is corrupt at offset {offset} ({exc}); re-save the "
                            ".mlpackage with coremltools.") from None
        if data_type == DataType.FLOAT16:
            data = np.asarray(data).view(np.float16)
        return np.asarray(data)


def _immediate_tensor(tensor: MIL_pb2.TensorValue, data_type: int, shape: tuple[int, ...], what: str) -> Any:
    kind = tensor.WhichOneof("value")
    dtype = numpy_dtype(data_type, what)
    if kind == "strings":
        values = list(tensor.strings.values)
        return values[0] if not shape and len(values) == 1 else np.array(values, dtype=object).reshape(shape)
    if kind == "bytes":
        if data_type in SUB_BYTE_BITS:
            count = int(np.prod(shape, dtype=np.int64))
            return unpack_bits(tensor.bytes.values, data_type, count).reshape(shape)
        flat = np.frombuffer(tensor.bytes.values, dtype=dtype)
    elif kind is None:
        flat = np.zeros(0, dtype=dtype)
    else:
        flat = np.asarray(getattr(tensor, kind).values).astype(dtype)
    return flat.reshape(shape)


def decode_value(value: MIL_pb2.Value, blobs: BlobFiles, what: str) -> Any:
    """A MIL ``Value`` as numpy (tensors, scalars as 0-d arrays), ``str`` or a list of decoded values."""
    kind = value.type.WhichOneof("type")
    if kind == "listType":
        return [decode_value(item, blobs, what) for item in value.immediateValue.list.values]
    if kind != "tensorType":
        raise UnsupportedOpError(what, f"{kind} value")
    tensor_type = value.type.tensorType
    shape = tensor_shape(tensor_type)
    if None in shape:
        raise UserError(f"{what}: a constant with an unknown dimension; the package is malformed.")
    data_type = tensor_type.dataType
    if value.WhichOneof("value") == "blobFileValue":
        blob = value.blobFileValue
        flat = blobs.read(blob.fileName, blob.offset, data_type, what)
        count = int(np.prod(shape, dtype=np.int64))
        if flat.size < count:
            raise UserError(f"{what}: weight file holds {flat.size} values at offset {blob.offset}, the "
                            f"program expects {count}; the package is corrupt.")
        return flat[:count].astype(numpy_dtype(data_type, what), copy=False).reshape(shape)
    immediate = value.immediateValue
    if immediate.WhichOneof("value") == "list":
        return [decode_value(item, blobs, what) for item in immediate.list.values]
    if immediate.WhichOneof("value") != "tensor":
        raise UnsupportedOpError(what, f"{immediate.WhichOneof('value')} immediate")
    return _immediate_tensor(immediate.tensor, data_type, shape, what)
