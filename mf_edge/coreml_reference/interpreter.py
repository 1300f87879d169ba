"""The interpreter loop: run a ``MilProgram`` op by op with the registry's kernels.

At load every op is matched to a kernel (an unknown op raises ``UnsupportedOpError`` before anything
runs) and the compile-time ops (``const``, ``constexpr_*``) are evaluated once. A run feeds the
inputs, executes the remaining ops in program order, casts each result to the dtype the program
declares (fp16 results are rounded, and the rounding is checked: see ``fp16``), checks it has the
declared shape, and frees every value after its last use.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mf_edge.coreml_reference import fp16
from mf_edge.coreml_reference.inputs import program_feeds
from mf_edge.coreml_reference.loader import MilProgram, Operation, OutputSpec, Ref, load_program
from mf_edge.coreml_reference.registry import Kernel, get_kernel
from mf_edge.coreml_reference.values import DataType, numpy_dtype

COMPILE_TIME_PREFIX = "constexpr_"


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, Ref):
        yield value.name
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


class ReferenceProgram:
    """A loaded ML Program that ``run`` executes with numpy, following the MIL op specification.

    ``report`` accumulates fp16 range findings (overflow, inf/nan, underflow) over all runs; it is
    the same object for the program's lifetime (``report.clear()`` empties it).
    """

    def __init__(self, program: MilProgram,
                 underflow_fraction: float = fp16.DEFAULT_UNDERFLOW_FRACTION) -> None:
        self.program = program
        self.underflow_fraction = underflow_fraction
        self.report = fp16.Report()
        kernels = [get_kernel(op.type, op.params) for op in program.operations]  # unknown ops fail here
        self._constants: dict[str, Any] = {}
        self._steps: list[tuple[Operation, Kernel]] = []
        for op, fn in zip(program.operations, kernels, strict=True):
            refs = list(_refs(list(op.params.values())))
            if op.type == "const" or (op.type.startswith(COMPILE_TIME_PREFIX)
                                      and all(name in self._constants for name in refs)):
                self._execute(op, fn, self._constants, set())
            else:
                self._steps.append((op, fn))
        self._last_use = self._last_uses()

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.program.inputs]

    @property
    def output_names(self) -> list[str]:
        return list(self.program.outputs)

    @property
    def op_types(self) -> list[str]:
        """The distinct op types of the program, in first-use order."""
        return list(dict.fromkeys(op.type for op in self.program.operations))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for ``inputs`` by name.

        An image input takes uint8 RGB ``[B, H, W, 3]`` or ``[H, W, 3]``; other inputs float arrays.
        """
        results = [self._run_feed(feed) for feed in program_feeds(self.program.inputs, inputs)]
        if len(results) == 1:
            return results[0]
        return {name: np.concatenate([np.atleast_1d(r[name]) for r in results]) for name in results[0]}

    # -- internals ----------------------------------------------------------------------------------

    def _last_uses(self) -> dict[int, list[str]]:
        last: dict[str, int] = {}
        for index, (op, _) in enumerate(self._steps):
            for name in _refs(list(op.params.values())):
                last[name] = index
        keep = set(self.program.outputs) | set(self._constants)
        by_step: dict[int, list[str]] = {}
        for name, index in last.items():
            if name not in keep:
                by_step.setdefault(index, []).append(name)
        return by_step

    def _run_feed(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = dict(self._constants)
        non_finite: set[str] = set()
        for spec in self.program.inputs:
            value = feed[spec.name]
            if spec.data_type == DataType.FLOAT16:
                value, findings = fp16.round_to_fp16(value, spec.name, "input", True, self.underflow_fraction)
                for finding in findings:
                    self.report.add(finding)
            env[spec.name] = value
        for index, (op, fn) in enumerate(self._steps):
            self._execute(op, fn, env, non_finite)
            for name in self._last_use.get(index, ()):
                env.pop(name, None)
        return {name: env[name] for name in self.program.outputs}

    def _resolve(self, value: Any, env: dict[str, Any]) -> Any:
        if isinstance(value, Ref):
            value = env[value.name]
        elif isinstance(value, list):
            return [self._resolve(item, env) for item in value]
        if isinstance(value, np.ndarray) and value.dtype == np.float16:
            return value.astype(np.float32)  # fp16 values are computed on in float32
        return value

    def _execute(self, op: Operation, fn: Kernel, env: dict[str, Any], non_finite: set[str]) -> None:
        args = {key: self._resolve(value, env) for key, value in op.params.items()}
        inputs_finite = not any(name in non_finite for name in _refs(list(op.params.values())))
        with np.errstate(all="ignore"):  # inf/nan become findings in the report, not warnings
            result = fn(**args)
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != len(op.outputs):
            raise RuntimeError(f"reference kernel {op.type} returned {len(results)} values for {op.name}, "
                               f"the program declares {len(op.outputs)}")
        for spec, value in zip(op.outputs, results, strict=True):
            value = self._declared(value, spec, op, inputs_finite)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
                non_finite.add(spec.name)
            env[spec.name] = value

    def _declared(self, value: Any, spec: OutputSpec, op: Operation, inputs_finite: bool) -> Any:
        """``value`` in the declared dtype (fp16: rounded and checked), shape checked."""
        if spec.data_type is None or spec.data_type == DataType.STRING:
            return value
        dtype = np.dtype(numpy_dtype(spec.data_type, op.type))
        if op.type == "const":  # stored as declared: only inf/nan (weights beyond fp16's range) matter
            value = np.asarray(value).astype(dtype, copy=False)
            found = fp16.non_finite(value, op.name, op.type) if dtype.kind == "f" else None
            findings = [found] if found else []
        elif dtype == np.float16:
            value, findings = fp16.round_to_fp16(value, op.name, op.type, inputs_finite,
                                                 self.underflow_fraction)
        else:
            value = np.asarray(value).astype(dtype, copy=False)
            found = fp16.non_finite(value, op.name, op.type) if dtype.kind == "f" and inputs_finite else None
            findings = [found] if found else []
        for finding in findings:
            self.report.add(finding)
        if spec.shape is not None:
            declared = spec.shape
            if len(declared) != value.ndim or any(d is not None and d != s for d, s in
                                                  zip(declared, value.shape, strict=False)):
                raise RuntimeError(f"reference kernel {op.type} gave {op.name} shape {list(value.shape)}, "
                                   f"the program declares {list(declared)}")
        return value


def load_reference(path: str | Path,
                   underflow_fraction: float = fp16.DEFAULT_UNDERFLOW_FRACTION) -> ReferenceProgram:
    """Load the ``.mlpackage`` at ``path`` for reference execution.

    Raises ``UnsupportedOpError`` naming the first op the executor does not implement, and
    ``mf_edge.errors.UserError`` for a missing or unreadable package.
    """
    return ReferenceProgram(load_program(path), underflow_fraction)
