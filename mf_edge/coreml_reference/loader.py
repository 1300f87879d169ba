"""Reading a saved ``.mlpackage`` into a plain ``MilProgram``: inputs, operations, outputs, constants.

The spec is read with coremltools' own loader (``MLModel(path, skip_model_load=True)``) and the
ML Program protobuf (``MIL.proto``) is walked as saved: nothing is re-derived or optimised, so the
executor runs exactly the operations Core ML would load. Constants (``const`` ops, op attributes and
inline argument values) are decoded to numpy here, weights from the package's ``weight.bin``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coremltools.proto import MIL_pb2

from mf_edge.coreml_reference.errors import UnsupportedOpError
from mf_edge.coreml_reference.registry import get_kernel
from mf_edge.coreml_reference.values import BlobFiles, decode_value, tensor_shape
from mf_edge.errors import RuntimeUnavailable, UserError


@dataclass(frozen=True)
class Ref:
    """An op argument bound to a named variable (a program input or another op's output)."""

    name: str


@dataclass(frozen=True)
class OutputSpec:
    """A variable an op defines: its name, MIL ``DataType`` and shape (``None`` for non-tensors and for
    a tensor of unknown rank, e.g. ``fill`` with a run-time shape)."""

    name: str
    data_type: int | None
    shape: tuple[int | None, ...] | None


@dataclass(frozen=True)
class Operation:
    """One op as saved: ``params`` maps a parameter to a ``Ref``, a constant, or a list of them."""

    type: str
    name: str
    params: dict[str, Any]
    outputs: tuple[OutputSpec, ...]


@dataclass(frozen=True)
class ImageFormat:
    """How Core ML turns an image input into the program's ``[1, C, H, W]`` float tensor."""

    color_space: str
    height: int
    width: int


@dataclass(frozen=True)
class ProgramInput:
    name: str
    data_type: int
    shape: tuple[int | None, ...]
    image: ImageFormat | None = None


@dataclass(frozen=True)
class MilProgram:
    """The ``main`` function of an ML Program, ready to interpret."""

    path: Path
    opset: str
    specification_version: int
    inputs: tuple[ProgramInput, ...]
    operations: tuple[Operation, ...]
    outputs: tuple[str, ...]


def _output_spec(named: MIL_pb2.NamedValueType) -> OutputSpec:
    if named.type.WhichOneof("type") == "tensorType":
        tensor = named.type.tensorType
        shape = tensor_shape(tensor)
        if None in shape and any(dim.WhichOneof("dimension") == "unknown" and dim.unknown.variadic
                                 for dim in tensor.dimensions):
            shape = None  # unknown rank
        return OutputSpec(named.name, tensor.dataType, shape)
    return OutputSpec(named.name, None, None)


def _binding(binding: MIL_pb2.Argument.Binding, blobs: BlobFiles, what: str) -> Any:
    if binding.WhichOneof("binding") == "name":
        return Ref(binding.name)
    return decode_value(binding.value, blobs, what)


def _operation(op: MIL_pb2.Operation, blobs: BlobFiles) -> Operation:
    get_kernel(op.type)  # an unknown op is named as such before its values are decoded
    if len(op.blocks):
        raise UnsupportedOpError(op.type, "control flow with nested blocks")
    name = op.outputs[0].name if op.outputs else op.type
    what = f"{op.type} {name}"
    params: dict[str, Any] = {key: decode_value(value, blobs, what)
                              for key, value in op.attributes.items() if key != "name"}
    for key, argument in op.inputs.items():
        bound = [_binding(binding, blobs, what) for binding in argument.arguments]
        params[key] = bound[0] if len(bound) == 1 else bound
    return Operation(op.type, name, params, tuple(_output_spec(out) for out in op.outputs))


def _image_formats(description: Any) -> dict[str, ImageFormat]:
    formats = {}
    for feature in description.input:
        if feature.type.WhichOneof("Type") == "imageType":
            image = feature.type.imageType
            color = image.ColorSpace.Name(image.colorSpace)
            formats[feature.name] = ImageFormat(color, int(image.height), int(image.width))
    return formats


def _load_spec(path: Path) -> tuple[Any, Path | None]:
    import coremltools as ct

    if not path.exists():
        raise UserError(f"{path} does not exist; pass the path of a saved .mlpackage.")
    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as exc:  # coremltools raises bare Exceptions for unreadable packages
        raise UserError(f"cannot read Core ML model {path} ({exc}); re-save it with coremltools.") from None
    weights_dir = getattr(model, "weights_dir", None)
    return model.get_spec(), Path(weights_dir) if weights_dir else None


def load_program(path: str | Path) -> MilProgram:
    """Read the ML Program of the ``.mlpackage`` at ``path`` (its default function)."""
    path = Path(path)
    spec, weights_dir = _load_spec(path)
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise RuntimeUnavailable(f"{path} is a Core ML {kind} model; the reference executor runs ML Programs "
                                 "only (convert with convert_to='mlprogram') - check it on macOS.")
    function_name = spec.description.defaultFunctionName or "main"
    function = spec.mlProgram.functions[function_name]
    block = function.block_specializations[function.opset]
    blobs = BlobFiles(weights_dir)
    images = _image_formats(spec.description)
    inputs = tuple(
        ProgramInput(named.name, named.type.tensorType.dataType, tensor_shape(named.type.tensorType),
                     images.get(named.name))
        for named in function.inputs
    )
    operations = tuple(_operation(op, blobs) for op in block.operations)
    return MilProgram(path, function.opset, int(spec.specificationVersion), inputs, operations,
                      tuple(block.outputs))
