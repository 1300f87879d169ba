"""Turning caller inputs into the program's input tensors, as Core ML does before it runs a program.

An image input takes 8-bit RGB pixels ``[B, H, W, 3]`` or ``[H, W, 3]`` (grayscale: ``[B, H, W]``),
laid out as the ``[1, C, H, W]`` float tensor Core ML hands the program (channels reversed for a BGR
model; the ImageType scale and bias are ops at the top of the program, so they run there). Other
inputs are arrays cast to the declared dtype (fp16 ones are rounded by the interpreter). Inputs of the
declared shapes run as given (their first dimensions may differ: a mask, a weight, an index); a batch
of B samples for a program whose every input's batch is fixed at 1 gets one feed per sample, as Core
ML's batch prediction does.
"""

from __future__ import annotations

import numpy as np

from mf_edge.coreml_reference.loader import ImageFormat, ProgramInput
from mf_edge.coreml_reference.values import numpy_dtype
from mf_edge.errors import UserError


def image_tensor(pixels: np.ndarray, image: ImageFormat, name: str) -> np.ndarray:
    """uint8 pixels -> ``[B, C, H, W]`` float32 in the model's channel order."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise UserError(f"image input {name!r} takes uint8 pixels, got {pixels.dtype}; pass the 8-bit image "
                        "(e.g. np.asarray(PIL.Image.open(path).convert('RGB'))).")
    gray = image.color_space.startswith("GRAYSCALE")
    if gray and pixels.ndim >= 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    base_rank = 2 if gray else 3
    if pixels.ndim == base_rank:
        pixels = pixels[None]
    expected = "[B, H, W]" if gray else "[B, H, W, 3]"
    if pixels.ndim != base_rank + 1 or (not gray and pixels.shape[-1] != 3):
        raise UserError(f"image input {name!r} takes {expected} pixels, got shape {list(pixels.shape)}; "
                        "pass RGB images as height x width x 3.")
    height, width = pixels.shape[1:3]
    if (image.height and height != image.height) or (image.width and width != image.width):
        raise UserError(f"image input {name!r} takes {image.height}x{image.width} images, got "
                        f"{height}x{width}; resize and centre-crop to the model's size first.")
    planes = pixels[:, None] if gray else pixels.transpose(0, 3, 1, 2)
    if image.color_space == "BGR":
        planes = planes[:, ::-1]
    return np.ascontiguousarray(planes, dtype=np.float32)


def _checked(value: np.ndarray, spec: ProgramInput) -> np.ndarray:
    if value.ndim != len(spec.shape):
        raise UserError(f"input {spec.name!r} has rank {value.ndim}, the model expects {len(spec.shape)} "
                        f"(shape {_shape_text(spec.shape)}).")
    for got, want in zip(value.shape[1:], spec.shape[1:], strict=True):
        if want is not None and got != want:
            raise UserError(f"input {spec.name!r} has shape {list(value.shape)}, the model expects "
                            f"{_shape_text(spec.shape)}; reshape or resize it.")
    return value


def _fits(shape: tuple[int, ...], declared: tuple[int | None, ...]) -> bool:
    return len(shape) == len(declared) and all(want is None or got == want
                                               for got, want in zip(shape, declared, strict=True))


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


def program_feeds(specs: tuple[ProgramInput, ...],
                  inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The feeds to run: one for the whole batch, or one per sample when the batch is fixed at 1."""
    names = [spec.name for spec in specs]
    missing = [name for name in names if name not in inputs]
    unknown = [name for name in inputs if name not in names]
    if missing or unknown:
        raise UserError(f"the model takes inputs {names}; missing {missing}, unknown {unknown}.")
    tensors: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.image is not None:
            value = image_tensor(inputs[spec.name], spec.image, spec.name)
        else:
            value = np.asarray(inputs[spec.name])
            if value.ndim == len(spec.shape) - 1:
                value = value[None]
        dtype = numpy_dtype(spec.data_type, spec.name)
        # fp16 inputs stay float32 here: the interpreter rounds them and reports what the rounding lost.
        tensors[spec.name] = value.astype(np.float32 if dtype == np.float16 else dtype, copy=False)
    if all(_fits(tensors[spec.name].shape, spec.shape) for spec in specs):
        return [tensors]  # the shapes the program declares: one run, whatever the first dimensions
    for spec in specs:
        _checked(tensors[spec.name], spec)
    batches = {value.shape[0] for value in tensors.values() if value.ndim}
    if len(batches) == 1 and all(spec.shape and spec.shape[0] == 1 for spec in specs):
        batch = batches.pop()
        return [{name: value[i:i + 1] for name, value in tensors.items()} for i in range(batch)]
    spec = next(spec for spec in specs if not _fits(tensors[spec.name].shape, spec.shape))
    raise UserError(f"input {spec.name!r} has shape {list(tensors[spec.name].shape)}, the model expects "
                    f"{_shape_text(spec.shape)}; pass the declared shape (a batch of B samples where every "
                    "input's batch is fixed at 1).")
