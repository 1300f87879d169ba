"""ONNX target: every family exports (opset 18, simplified, checked) and the ``.onnx`` computes what the
float model computes in onnxruntime (64 px, random weights, one conversion per family)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime  # noqa: F401  (required: parity runs in it)
import pytest
import torch

from mf_edge import convert
from mf_edge.converters.onnx.target import OPSET
from mf_edge.parity import compare, reference_logits
from mf_edge.pipeline import load_published, rebuild_float_model

from small_models import ONE_BLOCK

SIZE = 64
FAMILIES = tuple(ONE_BLOCK)  # identityformer_d1 ... caformer_d1 (tests/small_models.py)
OPTIONS = {"identityformer_d1": {"dynamic_batch": True}, "caformer_d1": {"dynamic_batch": True},
           "poolformerv2_d1": {"batch_size": 3}}


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    out = tmp_path_factory.mktemp(name) / "out"
    return convert(name, "onnx", weights="random", image_size=SIZE, output=out, **OPTIONS.get(name, {}))


def test_conversion_passes_fp32_parity(converted) -> None:
    assert converted.artifact == converted.output / "model.onnx"
    assert converted.manifest["target"] == "onnx" and converted.manifest["precision"] == "fp32"
    assert converted.parity["status"] == "pass" and converted.parity["runtime"] == "onnxruntime"
    metrics = converted.parity["references"]["float"]["metrics"]
    assert metrics["cosine"] >= 0.9999 and metrics["top1_agreement"] == 1.0
    assert metrics["top5_overlap"] == 1.0 and metrics["max_abs_error"] < 1e-3


def test_graph_is_checked_simplified_and_shaped_as_asked(converted) -> None:
    model = onnx.load(str(converted.artifact))
    onnx.checker.check_model(model, full_check=True)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == OPSET
    details = converted.manifest["details"]
    assert details["nodes"] == len(model.graph.node) <= details["nodes_before_simplify"]
    (image,), (logits,) = model.graph.input, model.graph.output
    assert (image.name, logits.name) == ("image", "logits")
    dims = image.type.tensor_type.shape.dim
    spec = converted.manifest["spec"]
    if spec["dynamic_batch"]:
        assert dims[0].dim_param and not dims[0].HasField("dim_value")
    else:
        assert dims[0].dim_value == spec["batch_size"]
    assert [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]


def test_artifact_matches_rebuilt_float_model_on_new_inputs(converted) -> None:
    manifest, spec, target = load_published(converted.output)
    model = rebuild_float_model(manifest)
    runtime = target.runtime(converted.output, spec)
    sizes = (1, 4) if spec.dynamic_batch else (spec.batch_size,)
    for size in sizes:
        batch = torch.randn(size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(size)).numpy()
        logits = runtime.run(batch)
        assert logits.shape == (size, 1000)
        metrics = compare(reference_logits(model, batch), logits)
        assert metrics["cosine"] >= 0.9999 and metrics["top1_agreement"] == 1.0


def test_fp16_conversion(tmp_path: Path) -> None:
    result = convert("convformer_d1", "onnx", precision="fp16", weights="random", image_size=SIZE,
                     output=tmp_path / "fp16")
    metrics = result.parity["references"]["float"]["metrics"]
    assert result.parity["status"] == "pass" and metrics["cosine"] >= 0.999
    model = onnx.load(str(result.artifact))
    initializer_types = {init.data_type for init in model.graph.initializer if len(init.dims) > 1}
    assert initializer_types == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 interface
    _, spec, target = load_published(result.output)
    logits = target.runtime(result.output, spec).run(np.zeros((1, 3, SIZE, SIZE), dtype=np.float32))
    assert logits.dtype == np.float32 and result.manifest["output"]["dtype"] == "float32"


@pytest.mark.slow
@pytest.mark.parametrize("name", ("convformer_s18", "caformer_s18"))
def test_full_size_conversion(name: str, tmp_path: Path) -> None:
    result = convert(name, "onnx", weights="random", output=tmp_path / name)
    metrics = result.parity["references"]["float"]["metrics"]
    assert result.manifest["spec"]["image_size"] == 224 and result.parity["status"] == "pass"
    assert metrics["cosine"] >= 0.9999 and metrics["top1_agreement"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", tuple(ONE_BLOCK.values()))
def test_zoo_size_of_each_family_converts(name: str, tmp_path: Path) -> None:
    """The zoo sizes the default run's one-block variants stand for (S12, S18) at 64 px."""
    result = convert(name, "onnx", weights="random", image_size=SIZE, output=tmp_path / name)
    metrics = result.parity["references"]["float"]["metrics"]
    assert result.parity["status"] == "pass" and metrics["cosine"] >= 0.9999
    assert metrics["top1_agreement"] == 1.0 and metrics["max_abs_error"] < 1e-3
