"""ExecuTorch target: ``torch.export`` -> XNNPACK-lowered edge program -> ``model.pte``.

``prepare`` rewrites the model so XNNPACK takes every op (``xnnpack_rewrites``); ``export`` lowers
with ``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`` and records the
delegation coverage; ``runtime`` loads the program with ``executorch.runtime.Runtime``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from torch import nn

from mf_edge.calibration.schemes import Scheme
from mf_edge.console import native_log_filtered, step
from mf_edge.converters.base import BenchFacts, ExportResult, Target
from mf_edge.converters.executorch.deployment_rewrites import split_depthwise, xnnpack_norms
from mf_edge.converters.executorch.quantizer import xnnpack_quantizer
from mf_edge.converters.executorch.xnnpack_rewrites import infer_symbolic_view_dims, rewrite_for_xnnpack
from mf_edge.converters.program import Float16Model, export_program
from mf_edge.errors import RuntimeUnavailable, UserError
from mf_edge.rewrites import FOLDS
from mf_edge.spec import ExportSpec

ARTIFACT = "model.pte"
# Graph nodes that are bookkeeping, not operators: tuple access of a delegate's outputs.
NOT_OPERATORS = ("getitem", "executorch_call_delegate")


def delegation_coverage(graph_module: nn.Module) -> dict:
    """Operators inside XNNPACK delegates vs outside, from the lowered edge graph."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    delegated: Counter[str] = Counter()
    outside: Counter[str] = Counter()
    subgraphs = 0
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and isinstance(getattr(graph_module, node.target), LoweredBackendModule):
            subgraphs += 1
            lowered = getattr(graph_module, node.target)
            delegated.update(_op_name(n) for n in lowered.original_module.graph.nodes
                             if n.op == "call_function" and _op_name(n) not in NOT_OPERATORS)
        elif node.op == "call_function" and _op_name(node) not in NOT_OPERATORS:
            outside[_op_name(node)] += 1
    total = sum(delegated.values()) + sum(outside.values())
    return {
        "backend": "XnnpackBackend",
        "delegated_subgraphs": subgraphs,
        "delegated_ops": sum(delegated.values()),
        "non_delegated_ops": sum(outside.values()),
        "coverage": sum(delegated.values()) / total if total else 1.0,
        "non_delegated": dict(sorted(outside.items())),
    }


def _op_name(node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def max_batch(program) -> int:
    """The batch upper bound the lowered program was planned for.

    Edge lowering can narrow the exported range (1..MAX_DYNAMIC_BATCH): for ConvFormer it becomes
    2..15, and the runtime then refuses larger batches; the manifest records what the ``.pte`` holds.
    """
    return min(int(r.upper) for r in program.range_constraints.values())


class ExecuTorchRuntime:
    """A ``.pte`` program loaded in the ExecuTorch runtime (XNNPACK kernels registered)."""

    name = "executorch"

    def __init__(self, path: Path) -> None:
        try:
            from executorch.runtime import Runtime
        except ImportError as exc:
            raise RuntimeUnavailable(f"the ExecuTorch runtime is not installed ({exc}); "
                                     "pip install executorch.") from None
        if not path.is_file():
            raise UserError(f"{path} does not exist; convert the model to ExecuTorch first.")
        with native_log_filtered():  # XNNPACK's first load logs its cpuinfo probe straight to stderr
            self._method = Runtime.get().load_program(path).load_method("forward")

    @property
    def max_batch(self) -> int:
        """The largest batch the program's memory plan holds (its input's upper-bound shape)."""
        return int(self._method.metadata.input_tensor_meta(0).sizes()[0])

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        outputs = self._method.execute([torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))])
        return outputs[0].numpy()


class ExecuTorchTarget(Target):
    """``executorch``: an XNNPACK-delegated ``model.pte``, run by the ExecuTorch runtime."""

    name = "executorch"
    precisions = ("fp32", "fp16", "int8", "w8")
    default_precision = "fp32"
    artifact = ARTIFACT
    next_step = ("next: run it natively with build/mf-classify {output} image.jpg (build it: "
                 "cmake -S apps/executorch_cpp -B build && cmake --build build); on Android: "
                 "docs/deploy/android.md")
    rewrites = (*FOLDS.values(), xnnpack_norms, split_depthwise)
    # int8: XNNPACK's int8 kernels on convolutions and linears, depthwise convolutions float (slower in
    # int8 there); w8: dynamic int8 linears (see calibration/schemes.py)
    schemes = {
        "int8": Scheme("xnnpack-w8a8", "xnnpack", ("conv2d", "linear"), "affine", depthwise=False,
                       build=xnnpack_quantizer),
        "w8": Scheme("xnnpack-dynamic-w8", "xnnpack", ("linear",), "dynamic", build=xnnpack_quantizer),
    }
    bench = BenchFacts(precisions=("fp32", "int8", "w8"), runtime_name="executorch",
                       runtime_module="executorch.runtime", dynamic_batch=True, native_app=True)

    def prepare(self, model: nn.Module, spec: ExportSpec) -> nn.Module:
        """A copy of the float model whose every op XNNPACK delegates (before quantization).

        Its convolutional stages run channels-first, except for ``w8``, whose dynamic quantization
        covers linears only (as 1x1 convolutions, the pointwise layers would stay float).
        """
        return rewrite_for_xnnpack(model, channels_first=spec.precision != "w8")

    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> ExportResult:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        module = Float16Model(model) if spec.precision == "fp16" else model
        with step("torch.export"):
            program = export_program(module, spec)
        with step("lowering to XNNPACK"):
            passes = [infer_symbolic_view_dims] if spec.dynamic_batch else None
            edge = to_edge_transform_and_lower(program, transform_passes=passes,
                                               partitioner=[XnnpackPartitioner()])
            coverage = delegation_coverage(edge.exported_program().graph_module)
            executorch_program = edge.to_executorch()
        path = out_dir / ARTIFACT
        path.write_bytes(executorch_program.buffer)
        details = {"delegation": coverage, "method": "forward"}
        if spec.dynamic_batch:
            details["max_batch"] = max_batch(edge.exported_program())
        return ExportResult([path], details)

    def runtime(self, out_dir: Path, spec: ExportSpec) -> ExecuTorchRuntime:
        return ExecuTorchRuntime(Path(out_dir) / ARTIFACT)

    def set_runtime_threads(self, threads: int) -> dict:
        """Resize the ExecuTorch runtime's own thread pool (XNNPACK's kernels run on it)."""
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)
        return {"executorch_threadpool": int(portable_lib._threadpool_get_thread_count())}


TARGET = ExecuTorchTarget()
