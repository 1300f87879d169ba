"""coremltools' own MIL op tests, with their predictions run by mf-edge's Core ML reference executor.

coremltools ships its op tests in the wheel (``coremltools/converters/mil/mil/ops/tests/iOS14..iOS18``).
Each builds a MIL program, converts it to an ML Program and hands it to ``compare_backend``, which on
macOS predicts with Core ML and compares with the test's expected numbers (``np.testing.assert_allclose``,
the test's own tolerances, widened to atol 0.5 / rtol 0.05 for fp16 programs); elsewhere it stops before
predicting. Here ``compare_backend`` is told it runs on macOS (``_IS_MACOS``, ``_macos_version``) and
``MLModel.predict`` runs the saved package with ``mf_edge.coreml_reference``, so the comparison is
coremltools' own. The test classes are imported into this module and each test method is wrapped:

- a test whose program holds an op the executor does not claim (``UnsupportedOpError`` for an op missing
  from ``supported_ops()``) is skipped "not claimed";
- a test that reaches no prediction (type inference, builder-only, error-path tests) is skipped
  "no prediction": it proves nothing about the executor;
- a test whose program is a NeuralNetwork model (``assert_model_is_valid``'s default) is skipped
  "not an ML Program";
- a test feeding fp16-typed data to an fp32 program whose numbers miss the test's tolerance but meet
  ``FP16_DATA_TOLERANCE`` (about ten fp16 steps) is an expected failure (``FP16_DATA`` says why: its
  expectation ignores the fp16 rounding of the data the program stores); a larger miss fails;
- a test listed in ``KNOWN`` must fail (a behaviour only Core ML's runtime defines, with the reason);
  if it passes the listing is stale and the test fails.

Every other test must pass, including a claimed op that refuses a parameter. The default run takes the
``FAST`` classes with one value per parametrize argument besides the backend; ``-m slow`` runs all of it.
Regressions it catches: any kernel whose numbers leave coremltools' expectations (a planted ``+1`` on
``relu`` or ``+1e-3`` on fp32 ``conv`` fails the fast run), input-feeding bugs (batch splitting of
declared inputs), and a claimed op's parameter that is refused.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import inspect
import os
import random
import sys
import zlib
from typing import Any

import numpy as np
import pytest

# coremltools picks the backends its tests parametrize over from these at import: ML Programs only
# (the executor does not run neural networks), fp16 and fp32.
os.environ["PYMIL_TEST_TARGETS"] = "mlprogram"
os.environ["INCLUDE_MIL_FP32_UNIT_TESTS"] = "1"

ct = importlib.import_module("coremltools")  # a required dependency: never behind a skip
ct_testing_utils = importlib.import_module("coremltools.converters.mil.testing_utils")
ops_testing_utils = importlib.import_module("coremltools.converters.mil.mil.ops.tests.testing_utils")

from mf_edge.coreml_reference import UnsupportedOpError, load_reference, supported_ops  # noqa: E402

OPS_TESTS = "coremltools.converters.mil.mil.ops.tests"

#: The shipped op test files (``iOS*/test_*.py``) run here; their ops decide claimed/not claimed.
FILES = [
    "iOS14.test_activation", "iOS14.test_conv", "iOS14.test_elementwise_binary",
    "iOS14.test_elementwise_unary", "iOS14.test_linear", "iOS14.test_normalization", "iOS14.test_pool",
    "iOS14.test_reduction", "iOS14.test_scatter_gather", "iOS14.test_tensor_operation",
    "iOS14.test_tensor_transformation", "iOS14.test_image_resizing",
    "iOS15.test_elementwise_unary", "iOS15.test_tensor_transformation", "iOS15.test_image_resizing",
    "iOS16.test_constexpr_ops", "iOS16.test_conv", "iOS16.test_scatter_gather", "iOS16.test_tensor_operation",
    "iOS16.test_tensor_transformation",
    "iOS17.test_activation", "iOS17.test_conv", "iOS17.test_elementwise_unary", "iOS17.test_linear",
    "iOS17.test_normalization", "iOS17.test_quantization", "iOS17.test_reduction",
    "iOS17.test_scatter_gather", "iOS17.test_tensor_operation", "iOS17.test_tensor_transformation",
    "iOS18.test_compression", "iOS18.test_tensor_transformation", "iOS18.test_transformers",
]

#: The default run: these methods, one parametrization value per argument besides the backend (conv
#: with its weight as an input: the inputs' first dimensions differ).
FAST = {
    "iOS14.test_activation": {"TestReLU": ["test_builder_to_backend_smoke"],
                              "TestSoftmax": ["test_buidler_to_backend_smoke"],
                              "TestThresholdedReLU": ["test_builder_to_backend_smoke"]},
    "iOS14.test_elementwise_binary": {"TestElementwiseBinary": ["test_builder_to_backend_smoke"]},
    "iOS14.test_linear": {"TestMatMul": ["test_builder_to_backend_smoke"]},
    "iOS14.test_normalization": {"TestNormalizationLayerNorm": ["test_builder_to_backend_smoke"]},
    "iOS14.test_pool": {"TestAvgPool": ["test_builder_to_backend_smoke"]},
    "iOS14.test_reduction": {"TestReduction": ["test_builder_to_backend_smoke"]},
    "iOS14.test_tensor_transformation": {"TestReshape": ["test_builder_to_backend_smoke"]},
    "iOS14.test_conv": {"TestConv": ["test_builder_to_backend_stress_weights_input"],
                        "TestConvTranspose": ["test_builder_to_backend_stress"]},
    "iOS16.test_scatter_gather": {"TestGather": ["test_builder_to_backend_smoke"]},  # batch_dims
    "iOS17.test_reduction": {"TestReduction": ["test_reduce_arg_ios17_output_dtype"]},
    "iOS17.test_tensor_transformation": {"TestReshape": ["test_reshape_with_zero_different_len_iOS17"]},
    "iOS18.test_compression": {"TestConstexprBlockwiseDequantize": ["test_builder_to_backend_stress"]},
}

#: Node-id patterns (``fnmatch``) of tests that must fail here, with the reason.
KNOWN: dict[str, str] = {
    "Test_iOS1[47]_normalization_TestNormalizationLocalResponseNorm::test_builder_to_backend_smoke*-backend1]":
        "hard-coded expectation of Core ML's runtime for a rank-3 input [1, 3, 2]: each value divided by its "
        "own square only, as if the channel axis were -3 (size 1 here, the NeuralNetwork layer's [C, H, W]); "
        "the MIL spec says x is [n, C, *D], so the executor sums over axis 1 (as torch's LocalResponseNorm, "
        "which the stress tests compare with and pass). fp32 only: the fp16 backend's widened tolerance "
        "(atol 0.5) hides the difference",
}

#: Why a test feeding fp16 data to an fp32 program may miss its tolerance (see ``_rounded_data``).
FP16_DATA = ("fp16 data in an fp32 program: the test computes its expected values at another precision "
             "than the program (from the fp32 tensors before rounding them to the fp16 the program stores, "
             "or in numpy fp16 arithmetic); a tensor's MIL dtype is what Core ML holds, so the executor "
             "computes on the stored fp16 values in fp32 (the program's precision) and rounds only outputs "
             "declared fp16: within about ten fp16 steps of the expectation (FP16_DATA_TOLERANCE, checked), "
             "not within atol 1e-4")

#: The widened comparison a test with fp16 data in an fp32 program must still meet to be an expected
#: failure: about ten fp16 steps (2 ** -10 each) relative to the values, absolute below 1 (a conv sums
#: many products of rounded weights, whose errors add up), a twentieth of coremltools' fp16 tolerance.
FP16_DATA_TOLERANCE = {"atol": 1e-2, "rtol": 1e-2}

_predictions = 0
_fp16_data = False  # the running test gives an fp32 program fp16 data (set by ``_routed``)


class Fp16DataMiss(AssertionError):
    """Missed the test's fp32 tolerance, met ``FP16_DATA_TOLERANCE``."""


def _compare_backend(original: Any) -> Any:
    """coremltools' ``compare_backend``; for fp16 data in an fp32 program a miss of the test's own
    tolerance is checked again at ``FP16_DATA_TOLERANCE`` (its own failure if it misses that too)."""

    @functools.wraps(original)
    def compare(**kwargs: Any) -> Any:
        try:
            return original(**kwargs)
        except AssertionError as exc:
            if not _fp16_data:
                raise
            original(**{**kwargs, **FP16_DATA_TOLERANCE})
            raise Fp16DataMiss(str(exc)) from None

    return compare


def _feed(value: Any) -> np.ndarray:
    """A caller value as the executor takes it (PIL images become uint8 pixel arrays)."""
    return np.asarray(value)


def _reference_predict(self: Any, data: dict, state: Any = None) -> dict[str, np.ndarray]:
    """``MLModel.predict`` on the reference executor (counts the predictions a test reaches)."""
    global _predictions
    if state is not None:
        raise UnsupportedOpError("state", "stateful prediction")
    if self.package_path is None:  # assert_model_is_valid's default backend: a NeuralNetwork model
        pytest.skip("not an ML Program: the executor runs ML Programs only")
    program = load_reference(self.package_path)
    outputs = program.run({name: _feed(value) for name, value in data.items()})
    _predictions += 1
    return outputs


@pytest.fixture(autouse=True)
def _seeded(request: pytest.FixtureRequest) -> None:
    """coremltools' tests draw unseeded random data: seed it from the test's id, so a run repeats."""
    seed = zlib.crc32(request.node.nodeid.encode())
    np.random.seed(seed)
    random.seed(seed)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


@pytest.fixture(autouse=True)
def _predict_with_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ct_testing_utils, "_IS_MACOS", True)
    monkeypatch.setattr(ct.models.utils, "_macos_version", lambda: (15, 0))
    monkeypatch.setattr(ct.models.MLModel, "predict", _reference_predict)
    compare = _compare_backend(ct_testing_utils.compare_backend)
    monkeypatch.setattr(ops_testing_utils, "compare_backend", compare)


def _not_claimed(exc: UnsupportedOpError) -> bool:
    return exc.op_type not in supported_ops() and (not exc.detail or "nested blocks" in exc.detail)


def _known_reason() -> str | None:
    node = os.environ.get("PYTEST_CURRENT_TEST", "").split(" (")[0].split("::", 1)[-1]
    return next((reason for pattern, reason in KNOWN.items() if fnmatch.fnmatchcase(node, pattern)), None)


def _rounded_data(kwargs: dict) -> bool:
    """An fp32 program (``backend.precision``) given fp16 data by a dtype parameter of the test."""
    backend = kwargs.get("backend")
    if getattr(backend, "precision", None) != "fp32":
        return False
    values = [v for value in kwargs.values() for v in (value if isinstance(value, tuple) else (value,))]
    return any(v is np.float16 for v in values)


def _routed(method: Any) -> Any:
    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> None:
        global _predictions, _fp16_data
        _predictions = 0
        _fp16_data = _rounded_data(kwargs)
        reason = _known_reason()
        try:
            method(*args, **kwargs)
        except UnsupportedOpError as exc:
            if _not_claimed(exc):
                pytest.skip(f"not claimed: {exc.op_type}")
            if reason:
                pytest.xfail(reason)
            raise
        except Fp16DataMiss:
            pytest.xfail(reason or FP16_DATA)
        except AssertionError:
            if reason:
                pytest.xfail(reason)
            raise
        except Exception:
            if reason:
                pytest.xfail(reason)
            raise
        if _predictions == 0:
            pytest.skip("no prediction: the test never reaches MLModel.predict")
        if reason:
            pytest.fail(f"listed in KNOWN ({reason}) but passes: remove it from the list")

    return run


def _trimmed(marks: list, fast: bool) -> list:
    """The fast variant keeps every backend and the first value of each other parametrize argument."""
    if not fast:
        return [*marks, pytest.mark.slow]
    out = []
    for mark in marks:
        if mark.name == "parametrize" and "backend" not in str(mark.args[0]):
            mark = pytest.mark.parametrize(mark.args[0], list(mark.args[1])[:1], **mark.kwargs).mark
        elif mark.name == "parametrize":
            names = [n.strip() for n in mark.args[0].split(",")] if isinstance(mark.args[0], str) \
                else list(mark.args[0])
            values = list(mark.args[1])
            if len(names) > 1:  # the backend product with other arguments: one combination per backend
                at = names.index("backend")
                seen, kept = set(), []
                for value in values:
                    if value[at] not in seen:
                        seen.add(value[at])
                        kept.append(value)
                values = kept
            mark = pytest.mark.parametrize(mark.args[0], values, **mark.kwargs).mark
        out.append(mark)
    return out


def _materialized(marks: list) -> list:
    """The marks with parametrize values as lists (coremltools passes iterators, used up once read)."""
    return [pytest.mark.parametrize(m.args[0], list(m.args[1]), **m.kwargs).mark
            if m.name == "parametrize" and not isinstance(m.args[1], (list, tuple)) else m for m in marks]


def _suite_class(cls: type, fast: list[str] | None = None) -> type:
    """``cls`` with its tests routed; ``fast`` names the methods of a trimmed default-run variant."""
    members: dict[str, Any] = {}
    for name in dir(cls):
        if not name.startswith("test"):
            continue
        if fast is not None and name not in fast:
            members[name] = None  # not collected in the fast variant
            continue
        method = getattr(cls, name)
        marks = _materialized(list(getattr(method, "pytestmark", [])))
        if hasattr(method, "pytestmark"):
            method.pytestmark = marks  # shared by the fast and the full variant
        wrapped = _routed(method)
        wrapped.pytestmark = _trimmed(marks, fast is not None)
        static = isinstance(inspect.getattr_static(cls, name), staticmethod)  # called without ``self``
        members[name] = staticmethod(wrapped) if static else wrapped
    members["pytestmark"] = [mark for mark in getattr(cls, "pytestmark", [])]
    return type(cls.__name__, (cls,), members)


def _collect() -> dict[str, type]:
    classes = {}
    for file in FILES:
        module = importlib.import_module(f"{OPS_TESTS}.{file}")
        prefix = file.replace(".test_", "_")
        for name, cls in vars(module).items():
            if name.startswith("Test") and isinstance(cls, type) and cls.__module__ == module.__name__:
                classes[f"Test_{prefix}_{name}"] = _suite_class(cls)
                if name in FAST.get(file, {}):
                    classes[f"TestFast_{prefix}_{name}"] = _suite_class(cls, FAST[file][name])
    return classes


globals().update(_collect())
