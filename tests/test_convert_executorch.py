"""ExecuTorch target: every family lowers entirely to XNNPACK and the ``.pte`` computes what the float
model computes, run in the ExecuTorch runtime (64 px, random weights, one conversion per family: its
one-block-per-stage variant, ``small_models``; the zoo sizes under ``-m slow``)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import executorch.runtime  # noqa: F401  (required: parity runs in it)
import numpy as np
import pytest
import torch

from mf_edge import convert
from mf_edge.converters import get_target
from mf_edge.converters.executorch.xnnpack_rewrites import rewrite_for_xnnpack
from mf_edge.parity import compare, reference_logits
from mf_edge.pipeline import Conversion, load_published, rebuild_float_model

import small_models
from small_models import ONE_BLOCK

SIZE = 64
FAMILIES = tuple(ONE_BLOCK)  # identityformer_d1 ... caformer_d1
# Options ride along with the family conversions, so each path is covered without extra lowering.
OPTIONS = {"identityformer_d1": {"dynamic_batch": True}, "poolformerv2_d1": {"batch_size": 2}}


@pytest.fixture(scope="module")
def conversions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Conversion]:
    """Every family converted once, two at a time in spawned processes (lowering is single-threaded)."""
    root = tmp_path_factory.mktemp("executorch")
    workers = min(2, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=small_models.init_spawned_process) as pool:
        futures = {name: pool.submit(convert, name, "executorch", weights="random", image_size=SIZE,
                                     output=root / name, **OPTIONS.get(name, {}))
                   for name in reversed(FAMILIES)}  # the largest graphs first
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(params=FAMILIES)
def converted(request: pytest.FixtureRequest, conversions: dict[str, Conversion]) -> Conversion:
    return conversions[request.param]


@pytest.fixture(scope="module")
def float_models(conversions: dict[str, Conversion]) -> dict[str, torch.nn.Module]:
    """The float model of each conversion, rebuilt from its manifest."""
    return {name: rebuild_float_model(result.manifest) for name, result in conversions.items()}


def test_conversion_passes_fp32_parity(converted) -> None:
    manifest = converted.manifest
    assert converted.artifact == converted.output / "model.pte" and converted.artifact.stat().st_size > 0
    assert manifest["target"] == "executorch" and manifest["precision"] == "fp32"
    assert converted.parity["status"] == "pass" and converted.parity["runtime"] == "executorch"
    metrics = converted.parity["references"]["float"]["metrics"]
    assert metrics["cosine"] >= 0.9999 and metrics["top1_agreement"] == 1.0
    assert metrics["top5_overlap"] == 1.0 and metrics["max_abs_error"] < 1e-3
    assert manifest["files"]["model.pte"]["bytes"] == converted.artifact.stat().st_size


def test_xnnpack_takes_every_operator(converted) -> None:
    delegation = converted.manifest["details"]["delegation"]
    assert delegation["non_delegated"] == {} and delegation["non_delegated_ops"] == 0
    assert delegation["coverage"] == 1.0 and delegation["delegated_subgraphs"] == 1
    assert delegation["delegated_ops"] > 100


def xnnpack_events(pte: Path, tmp_path: Path) -> list[str]:
    """The names of the XNNPACK operators one run of ``pte`` executes (its ETDump)."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    program = portable_lib._load_for_executorch(str(pte), enable_etdump=True)
    program.forward((torch.randn(1, 3, SIZE, SIZE),))
    program.write_etdump_result_to_file(str(tmp_path / "run.etdp"))
    events = Inspector(etdump_path=str(tmp_path / "run.etdp")).to_dataframe()["event_name"]
    return [e.split(" #")[0] for e in events if " #" in e]


def test_convformer_runs_without_layout_changes(conversions: dict[str, Conversion], tmp_path: Path) -> None:
    """Channels-first stages: no transposes inside the network (channels-last: 4 per block, 16 here).

    The three left: the input image to NHWC, the stem norm's 4-D weight (a constant operand of a
    multiply is converted at each run) and the pooled ``[1, C, 1, 1]`` features before the head.
    """
    result = conversions["convformer_d1"]
    assert result.manifest["rewrites"]["channels_first_stages"] == 4
    events = xnnpack_events(result.artifact, tmp_path)
    assert events.count("Convolution (NHWC, F32) DWConv") == 3 * 4  # the split 7x7 of every block
    assert events.count("Transpose (ND, X32)") == 3 and len(events) > 100


def test_artifact_matches_rebuilt_float_model_on_new_inputs(converted, float_models) -> None:
    _, spec, target = load_published(converted.output)
    model = float_models[spec.model]
    runtime = target.runtime(converted.output, spec)
    batch = torch.randn(spec.batch_size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7)).numpy()
    metrics = compare(reference_logits(model, batch), runtime.run(batch))
    assert metrics["cosine"] >= 0.9999 and metrics["top1_agreement"] == 1.0


def test_batch_shapes(converted, float_models) -> None:
    manifest, spec, target = load_published(converted.output)
    runtime = target.runtime(converted.output, spec)
    model = float_models[spec.model]
    sizes = (1, 3) if spec.dynamic_batch else (spec.batch_size,)
    assert manifest["input"]["dynamic_batch"] == spec.dynamic_batch
    if spec.dynamic_batch:  # the memory plan holds the exported upper bound; one more image is refused
        assert runtime.max_batch == manifest["details"]["max_batch"] == 256
        with pytest.raises(RuntimeError):
            runtime.run(np.zeros((257, 3, SIZE, SIZE), np.float32))
    for size in sizes:
        batch = torch.randn(size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(size)).numpy()
        logits = runtime.run(batch)
        assert logits.shape == (size, 1000)
        np.testing.assert_allclose(logits, reference_logits(model, batch), atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_rewrite_computes_the_same_function(name: str, float_models: dict[str, torch.nn.Module]) -> None:
    model = float_models[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rewritten = rewrite_for_xnnpack(model)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), model(x), atol=2e-5, rtol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # source untouched
    assert type(rewritten).__name__ == "GlobalPoolMetaFormer"


def test_classify_demo_runs_the_pte(conversions: dict[str, Conversion], tmp_path: Path) -> None:
    """apps/classify on a static batch-2 ``.pte``: the answer of ``mf-edge predict``."""
    from mf_edge.data import sample_images
    from mf_edge.pipeline import predict

    folder = conversions["poolformerv2_d1"].output
    photos = []
    for name, image in sample_images():
        photos.append(tmp_path / name.removeprefix("sklearn:"))
        image.save(photos[-1])
    photos.append(photos[0])  # three images: the second batch is padded
    demo = Path(__file__).resolve().parents[1] / "apps" / "classify" / "classify.py"
    completed = subprocess.run([sys.executable, str(demo), str(folder), *map(str, photos), "--json"],
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads(completed.stdout)
    for entry, expected in zip(results, predict(folder, photos), strict=True):
        assert [c["label"] for c in entry["top"]] == [name for name, _, _ in expected]
        logits = [logit for _, _, logit in expected]
        assert [c["logit"] for c in entry["top"]] == pytest.approx(logits, abs=1e-4)


@pytest.mark.slow
def test_fp16_conversion(tmp_path: Path) -> None:
    result = convert("identityformer_s12", "executorch", precision="fp16", weights="random", image_size=SIZE,
                     output=tmp_path / "fp16")
    metrics = result.parity["references"]["float"]["metrics"]
    assert result.parity["status"] == "pass" and metrics["cosine"] >= 0.999
    assert metrics["max_abs_error"] > 1e-6  # really half precision, not the fp32 graph
    delegation = result.manifest["details"]["delegation"]
    # XNNPACK takes no dtype casts: only casts (the fp32 interface's at least) stay outside the one delegate
    assert delegation["delegated_subgraphs"] == 1 and delegation["non_delegated_ops"] >= 2
    assert all("_to_dim_order_copy" in op for op in delegation["non_delegated"])


def test_missing_artifact_is_a_user_error(tmp_path: Path) -> None:
    from mf_edge.errors import UserError
    from mf_edge.models.zoo import get_model_info
    from mf_edge.spec import ExportSpec

    spec = ExportSpec.for_model(get_model_info("identityformer_s12"), image_size=SIZE)
    with pytest.raises(UserError, match="does not exist"):
        get_target("executorch").runtime(tmp_path, spec)


@pytest.mark.slow
@pytest.mark.parametrize("name", ("convformer_s18", "caformer_s18"))
def test_full_size_conversion(name: str, tmp_path: Path) -> None:
    result = convert(name, "executorch", weights="random", output=tmp_path / name)
    metrics = result.parity["references"]["float"]["metrics"]
    assert result.manifest["spec"]["image_size"] == 224
    assert result.parity["status"] == "pass"
    assert metrics["cosine"] >= 0.9999 and metrics["top1_agreement"] == 1.0
    assert result.manifest["details"]["delegation"]["coverage"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", tuple(ONE_BLOCK.values()))
def test_zoo_size_of_each_family_converts(name: str, tmp_path: Path) -> None:
    """The zoo sizes the default run's one-block variants stand for (S12, S18) at 64 px."""
    result = convert(name, "executorch", weights="random", image_size=SIZE, output=tmp_path / name)
    metrics = result.parity["references"]["float"]["metrics"]
    assert result.parity["status"] == "pass" and metrics["cosine"] >= 0.9999
    delegation = result.manifest["details"]["delegation"]
    assert delegation["coverage"] == 1.0 and delegation["delegated_subgraphs"] == 1
