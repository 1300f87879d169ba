"""The one interface every deployment target implements: ``Target``, with a default for every member.

A target is one folder under ``converters/`` exporting one ``Target`` object (``TARGET``), listed by
``mf_edge.converters.register_target`` (the built-in ones are found by name). The pipeline, parity,
the manifest, bench, sensitivity, training and the CLI only use the members below and never branch on a
target's name: what differs between targets is data or a method here. ``docs/architecture.md`` walks
through them and has the checklist for adding a target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import numpy as np
from torch import nn

from mf_edge.errors import UserError
from mf_edge.rewrites import FOLDS, Rewrite
from mf_edge.spec import ExportSpec

if TYPE_CHECKING:
    from mf_edge.calibration.schemes import Scheme


@dataclass
class ExportResult:
    """What ``export`` produced: the artifact files and facts for the manifest."""

    files: list[Path]
    details: dict = field(default_factory=dict)


@runtime_checkable
class Runtime(Protocol):
    """A loaded artifact: ``run`` takes a normalised ``[B, 3, H, W]`` float32 batch, returns logits."""

    name: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class BenchReference:
    """A runtime's own quantizer applied to one of the target's artifacts: a reference row in bench.

    ``mf-edge bench`` adds it when the target is benchmarked at ``precision``: it takes the target's
    ``source_precision`` artifact, ``build(artifact, calib_data, preprocessing, calib_size)`` writes
    the reference model (its path returned) and ``load(path, threads)`` runs it.
    """

    precision: str
    source_precision: str
    label: str
    note: str
    build: Callable[..., Path]
    load: Callable[[Path, int | None], Runtime]


@dataclass(frozen=True)
class BenchFacts:
    """What ``mf-edge bench`` needs to know about a target.

    ``precisions``: benchmarked when ``--precisions`` is not given (empty: the default precision);
    ``runtime_name``: the row's runtime column; ``runtime_module``: imported before the timed load;
    ``dynamic_batch``: artifacts built with a free batch; ``size_only``: why its runtime here is no
    speed measurement (the row then shows the size only); ``native_app``: the C++ app
    (``apps/executorch_cpp``) runs its artifacts; ``reference``: a runtime-quantized reference row.
    """

    precisions: tuple[str, ...] = ()
    runtime_name: str = ""
    runtime_module: str | None = None
    dynamic_batch: bool = False
    size_only: str | None = None
    native_app: bool = False
    reference: BenchReference | None = None


class Target:
    """A deployment target. Subclasses set the class attributes and implement ``export`` and ``runtime``.

    ``name``; ``precisions`` and ``default_precision``; ``artifact`` (the file it writes);
    ``next_step`` (what to do with an output folder, ``{output}`` standing for its path); ``options``
    (the ``ExportSpec.options`` it takes) and ``option_flags`` (their CLI flag where it is not
    ``--<name>``); ``rewrites`` (the exact deployment rewrites of ``mf_edge.rewrites`` applied before
    ``prepare``); ``schemes`` (its quantization scheme per quantized precision); ``runtime_words`` (how
    the CLI names a runtime of its parity report); ``has_fallback_runtime`` (``fallback_runtime`` checks
    the artifact where ``runtime`` cannot run here); ``bench`` (``BenchFacts``).
    """

    name: ClassVar[str]
    precisions: tuple[str, ...] = ("fp32",)
    default_precision: str = "fp32"
    artifact: str
    next_step: str = ""
    options: tuple[str, ...] = ()
    option_flags: ClassVar[dict[str, str]] = {}
    rewrites: tuple[Rewrite, ...] = tuple(FOLDS.values())
    schemes: ClassVar[dict[str, Scheme]] = {}
    runtime_words: ClassVar[dict[str, str]] = {}
    has_fallback_runtime: bool = False
    bench: BenchFacts = BenchFacts()

    def check_precision(self, precision: str | None) -> str:
        """``precision``, or the default when ``None``; one this target lacks is a ``UserError``."""
        precision = precision or self.default_precision
        if precision not in self.precisions:
            raise UserError(f"the {self.name} target supports {', '.join(self.precisions)}, not "
                            f"{precision!r}; pick one with --precision.")
        return precision

    def prepare(self, model: nn.Module, spec: ExportSpec) -> nn.Module:
        """The float model as this target exports it (after the deployment rewrites): as it is."""
        return model

    def output_label(self, spec: ExportSpec) -> str:
        """What a conversion holds, for its default folder name: the precision."""
        return spec.precision

    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> ExportResult:
        """Write the artifact for ``model`` into ``out_dir`` (a temporary folder the caller publishes)."""
        raise NotImplementedError

    def runtime(self, out_dir: Path, spec: ExportSpec) -> Runtime:
        """Load the artifact in ``out_dir`` in this target's own runtime.

        Raises ``mf_edge.errors.RuntimeUnavailable`` with the reason where this host cannot run it.
        """
        raise NotImplementedError

    def fallback_runtime(self, out_dir: Path, spec: ExportSpec) -> Runtime:
        """What checks the artifact where ``runtime`` is unavailable (TensorRT: its ONNX in onnxruntime);
        only called when ``has_fallback_runtime``. May raise ``RuntimeUnavailable`` like ``runtime``."""
        raise NotImplementedError

    def set_runtime_threads(self, threads: int) -> dict:
        """Size this runtime's own thread pool (beyond PyTorch's) for bench; what it reports back."""
        return {}
