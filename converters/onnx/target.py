"""ONNX target: ``torch.onnx.export(dynamo=True)`` -> onnxsim -> ``onnx.checker`` -> ``model.onnx``.

The graph has one input ``image`` (normalised float32 NCHW, static batch unless ``dynamic_batch``)
and one output ``logits``; ``runtime`` runs it in onnxruntime on the CPU.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from torch import nn

from mf_edge.calibration.schemes import GEMM_OPS, Scheme
from mf_edge.console import step
from mf_edge.converters.base import BenchFacts, BenchReference, ExportResult, Target
from mf_edge.converters.onnx.reference import (
    REFERENCE_NOTE,
    REFERENCE_PRECISION,
    build_reference,
    load_reference,
)
from mf_edge.converters.program import Float16Model, example_batch, export_program
from mf_edge.errors import RuntimeUnavailable, UserError
from mf_edge.spec import ExportSpec

ARTIFACT = "model.onnx"
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def simplify(model, spec: ExportSpec):
    """onnxsim's constant folding and shape simplification, checked on a test shape of the spec."""
    import onnxsim

    shape = list(example_batch(spec).shape)
    simplified, ok = onnxsim.simplify(model, test_input_shapes={INPUT_NAME: shape})
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified graph against the original")
    return simplified


def optimized_graph(path: Path, output: Path):
    """The graph onnxruntime runs for ``path`` on the CPU: its extended optimizations (QDQ fusions into
    ``QLinearConv``/``QLinearMatMul``/``QGemm``, ...) written with ``optimized_model_filepath``."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(output)
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(output))


FLOAT_GEMMS = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm")


def float_gemms_on_int8_weights(graph) -> list[str]:
    """Names of float GEMM nodes whose weight is a dequantized int8 initializer (int8 weights computed
    in float: a Q/DQ placement onnxruntime could not fuse)."""
    producers = {name: node for node in graph.node for name in node.output}
    constants = {tensor.name for tensor in graph.initializer}

    def int8_weight(name: str) -> bool:
        dequantize = producers.get(name)
        return (dequantize is not None and dequantize.op_type == "DequantizeLinear"
                and dequantize.input[0] in constants)

    return [node.name for node in graph.node
            if node.op_type in FLOAT_GEMMS and len(node.input) > 1 and int8_weight(node.input[1])]


class OnnxRuntime:
    """A ``.onnx`` model in an onnxruntime CPU session."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise RuntimeUnavailable(f"onnxruntime is not installed ({exc}); "
                                     "pip install onnxruntime.") from None
        if not path.is_file():
            raise UserError(f"{path} does not exist; convert the model to ONNX first.")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads:  # intra-op pool size (bench sets it explicitly); default: onnxruntime's choice
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.threads = threads
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class OnnxTarget(Target):
    """``onnx``: ``model.onnx`` (opset 18), checked in onnxruntime; takes the float model as it is."""

    name = "onnx"
    precisions = ("fp32", "fp16", "int8", "w8")
    default_precision = "fp32"
    artifact = ARTIFACT
    next_step = ("next: python apps/classify/classify.py {output} image.jpg (needs only numpy, pillow and "
                 "onnxruntime)")
    # int8: symmetric Q/DQ on GEMM inputs and outputs (onnxruntime fuses DQ -> op -> Q into QLinear ops)
    schemes = {"int8": Scheme("qdq-w8a8", "qdq", GEMM_OPS, "symmetric", outputs=True, bias_grid=True),
               "w8": Scheme("qdq-weight-only-w8", "qdq", ("conv2d", "linear"), None)}
    bench = BenchFacts(precisions=("fp32", "int8"), runtime_name="onnxruntime", runtime_module="onnxruntime",
                       dynamic_batch=True,
                       reference=BenchReference("int8", "fp32", REFERENCE_PRECISION, REFERENCE_NOTE,
                                                build_reference, load_reference))

    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> ExportResult:
        import onnx
        import torch

        module = Float16Model(model) if spec.precision == "fp16" else model
        with step("torch.export"):
            program = export_program(module, spec)
        with step(f"ONNX opset {OPSET}"):
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=OPSET,
                                             input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                             optimize=True, verbose=False)
            exported = onnx_program.model_proto
        with step("onnxsim"):
            simplified = simplify(exported, spec)
            onnx.checker.check_model(simplified, full_check=True)
        path = out_dir / ARTIFACT
        onnx.save(simplified, str(path))
        ops = Counter(node.op_type for node in simplified.graph.node)
        return ExportResult([path], {
            "opset": OPSET, "ir_version": simplified.ir_version, "nodes": len(simplified.graph.node),
            "nodes_before_simplify": len(exported.graph.node), "op_types": dict(sorted(ops.items())),
            "input": INPUT_NAME, "output": OUTPUT_NAME,
        })

    def runtime(self, out_dir: Path, spec: ExportSpec) -> OnnxRuntime:
        return OnnxRuntime(Path(out_dir) / ARTIFACT, threads=spec.options.get("threads"))


TARGET = OnnxTarget()
