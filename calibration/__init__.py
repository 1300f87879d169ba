"""Post-training quantization: calibration images, observers, per-target schemes, calibration files.

The pipeline's entry point is ``quantize_for_export(model, spec, options) -> QuantizedModel``;
``mf-edge calibrate`` writes a calibration file (``CalibrationRecord``) that ``convert --calibration``
reuses for every target.
"""

from mf_edge.calibration.data import CalibrationSet, load_calibration_set
from mf_edge.calibration.observers import DEFAULT_OBSERVER, OBSERVERS
from mf_edge.calibration.quantize import (
    QuantizedModel,
    QuantizeOptions,
    load_calibration,
    quantize_for_export,
)
from mf_edge.calibration.schemes import Scheme, all_schemes, build_quantizer, scheme_for
from mf_edge.calibration.store import CalibrationRecord

__all__ = [
    "DEFAULT_OBSERVER",
    "OBSERVERS",
    "CalibrationRecord",
    "CalibrationSet",
    "QuantizeOptions",
    "QuantizedModel",
    "Scheme",
    "all_schemes",
    "build_quantizer",
    "load_calibration",
    "load_calibration_set",
    "quantize_for_export",
    "scheme_for",
]
