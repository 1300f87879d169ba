"""The runtime's own int8: onnxruntime's ``quantize_static`` on mf-edge's fp32 ONNX, as a reference.

Not an mf-edge format: it is what a user gets by handing mf-edge's fp32 ``model.onnx`` to
onnxruntime's quantizer (``onnxruntime.quantization.quantize_static``: QDQ format, per-channel int8
weights, uint8 activations (U8S8), MinMax calibration) with the same calibration images mf-edge's
int8 uses, so a bench table shows mf-edge's int8 next to the runtime's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mf_edge.errors import RuntimeUnavailable

REFERENCE_PRECISION = "int8 (onnxruntime quantize_static)"
REFERENCE_NOTE = "reference, not an mf-edge format: onnxruntime's own quantize_static on mf-edge's fp32 ONNX"


class ImageReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over ``[N, 3, H, W]`` float images, one a call."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self.input_name = input_name
        self._images = iter(np.ascontiguousarray(images, dtype=np.float32))

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._images, None)
        return None if image is None else {self.input_name: image[None]}


def ort_quantize_static(fp32_onnx: Path, output: Path, images: np.ndarray) -> Path:
    """``quantize_static`` of ``fp32_onnx`` calibrated on ``images`` into ``output`` (written atomically)."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        raise RuntimeUnavailable(f"onnxruntime's quantizer is not installed ({exc}); "
                                 "pip install onnxruntime.") from None
    input_name = onnx.load(str(fp32_onnx), load_external_data=False).graph.input[0].name
    reader = ImageReader(input_name, images)
    CalibrationDataReader.register(ImageReader)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.partial")
    quantize_static(str(fp32_onnx), str(staging), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    staging.replace(output)
    return output


def reference_folder(fp32_artifact: Path) -> Path:
    """Where the reference model goes: beside mf-edge's fp32 ONNX folder (``...-onnx-int8-ort-reference``)."""
    folder = fp32_artifact.parent
    return folder.with_name(folder.name.removesuffix("-fp32") + "-int8-ort-reference")


def build_reference(fp32_artifact: Path, calib_data: Path | None, preprocessing, calib_size: int) -> Path:
    """``quantize_static`` of mf-edge's fp32 ONNX on the calibration images mf-edge's int8 uses
    (``load_calibration_set`` with the same source, size and seed); the quantized ``model.onnx``."""
    from mf_edge.calibration.data import load_calibration_set
    from mf_edge.errors import UserError

    if calib_data is None:
        raise UserError("the onnxruntime quantize_static reference needs calibration images; pass "
                        "--calib-data or --images.")
    calib = load_calibration_set(calib_data, preprocessing, calib_size, seed=0)
    return ort_quantize_static(fp32_artifact, reference_folder(fp32_artifact) / "model.onnx",
                               calib.images.numpy())


def load_reference(path: Path, threads: int | None):
    """The reference ``model.onnx`` in onnxruntime (batch dynamic), with ``threads`` intra-op threads."""
    from mf_edge.converters.onnx.target import OnnxRuntime

    return OnnxRuntime(path, threads=threads)
