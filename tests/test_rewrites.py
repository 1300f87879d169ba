"""Deployment rewrites: same outputs as the original model for every family, fewer ops, faster kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mf_edge import create_model
from mf_edge.calibration.schemes import build_quantizer, scheme_for
from mf_edge.converters import get_target
from mf_edge.converters.executorch.deployment_rewrites import SplitDepthwiseConv
from mf_edge.converters.executorch.xnnpack_layout import (
    ChannelsFirstLayerNorm,
    ChannelsFirstSepConv,
    LayoutDownsampling,
)
from mf_edge.models.layers import LayerNormGeneral, LayerNormWithoutBias, Scale, StarReLU
from mf_edge.rewrites import (
    FOLDS,
    AffineFreeGroupNorm,
    AffineFreeLayerNorm,
    ShiftedSquaredReLU,
    rewrite_for_deployment,
)
from mf_edge.spec import ExportSpec

FAMILIES = ("identityformer_s12", "randformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18")
SIZE = 64


def trained_like(name: str) -> nn.Module:
    """A small model whose norm weights/biases, StarReLU and ResScale parameters are not their init values.

    At initialisation they are 1 and 0, which would make every fold trivially exact.
    """
    model = create_model(name, image_size=SIZE)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (LayerNormGeneral, LayerNormWithoutBias, nn.LayerNorm, Scale, StarReLU)):
                for param in module.parameters(recurse=False):
                    param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def for_target(model: nn.Module, target: str) -> nn.Module:
    """``model`` with the deployment rewrites ``target`` declares (``Target.rewrites``)."""
    return rewrite_for_deployment(model, get_target(target).rewrites)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request) -> nn.Module:
    return trained_like(request.param)


def test_targets_share_the_folds() -> None:
    rewrites = {name: get_target(name).rewrites for name in ("coreml", "tensorrt", "onnx", "executorch")}
    assert rewrites["coreml"] == rewrites["tensorrt"] == rewrites["onnx"] == tuple(FOLDS.values())
    assert set(rewrites["onnx"]) < set(rewrites["executorch"])


@pytest.mark.parametrize("target", ["onnx", "executorch"])
def test_rewritten_model_equals_original(family_model: nn.Module, target: str) -> None:
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in family_model.state_dict().items()}
    rewritten = for_target(family_model, target)
    with torch.no_grad():
        expected, actual = family_model(x), rewritten(x)
    relative = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert relative < 1e-5, f"{family_model.mf_edge_info.name} ({target}): relative error {relative:.2e}"
    assert rewritten.mf_edge_info == family_model.mf_edge_info
    applied = rewritten.mf_edge_rewrites
    assert applied["fold_norm_affine"] > 0 and applied["fold_star_relu"] > 0
    after = family_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the original model was modified"


def test_executorch_prepare_after_the_rewrites_computes_the_same(family_model: nn.Module) -> None:
    """The pipeline's order: these rewrites, then the ExecuTorch target's own ``prepare``."""
    from mf_edge.converters import get_target
    from mf_edge.spec import ExportSpec

    spec = ExportSpec.for_model(family_model.mf_edge_info, image_size=SIZE)
    prepared = get_target("executorch").prepare(for_target(family_model, "executorch"), spec)
    assert not any(isinstance(m, (nn.LayerNorm, LayerNormWithoutBias)) for m in prepared.modules())
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = family_model(x), prepared(x)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_folds_remove_the_affine_parameters() -> None:
    model = trained_like("caformer_s18")
    rewritten = for_target(model, "onnx")
    modules = list(rewritten.modules())
    # every block norm, the downsampling pre-norms and both head norms read a linear or conv: all folded
    assert not any(isinstance(m, LayerNormWithoutBias) for m in modules)
    assert sum(isinstance(m, AffineFreeLayerNorm) for m in modules) == 2 * 18 + 3 + 2
    # StarReLU: MLP ones fold completely, SepConv ones keep b / s ahead of the depthwise conv
    assert not any(isinstance(m, StarReLU) for m in modules)
    assert sum(isinstance(m, ShiftedSquaredReLU) for m in modules) == 6
    assert all(block.token_mixer.scale == 1.0 for block in rewritten.stages[2])
    assert rewritten.mf_edge_rewrites == {"fold_norm_affine": 41, "fold_star_relu": 24,
                                          "fold_attention_scale": 12, "drop_unit_res_scale": 0}
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(rewritten) < params(model)


def test_group_norm_families_fold_only_what_a_linear_reads() -> None:
    rewritten = for_target(trained_like("poolformerv2_s12"), "executorch")
    block = rewritten.stages[0][0]
    assert isinstance(block.norm2, AffineFreeGroupNorm) and block.norm2.xnnpack
    assert isinstance(block.norm1, LayerNormGeneral) and block.norm1.weight is not None  # feeds the pooling
    assert rewritten.mf_edge_rewrites["split_depthwise"] == 0


def test_unit_res_scale_is_dropped() -> None:
    model = create_model("convformer_s18", image_size=SIZE)  # ResScale init 1 in stages 3-4
    rewritten = for_target(model, "onnx")
    assert rewritten.mf_edge_rewrites["drop_unit_res_scale"] == 2 * (9 + 3)
    assert not any(isinstance(m, Scale) for m in rewritten.modules())


def test_split_depthwise_equals_the_7x7_convolution() -> None:
    conv = nn.Conv2d(24, 24, 7, padding=3, groups=24, bias=True)
    split = SplitDepthwiseConv(conv)
    taps = [part.kernel_size[0] * part.kernel_size[1] for part in split.parts]
    assert len(split.parts) == 3 and max(taps) <= 25 and sum(taps) == 49
    x = torch.randn(2, 24, 13, 11)
    with torch.no_grad():
        torch.testing.assert_close(split(x), conv(x), rtol=1e-5, atol=1e-5)


def test_only_executorch_splits_the_depthwise_convolution() -> None:
    model = create_model("convformer_s18", image_size=SIZE)
    assert for_target(model, "executorch").mf_edge_rewrites["split_depthwise"] == 18
    assert "split_depthwise" not in for_target(model, "onnx").mf_edge_rewrites


def test_other_modules_pass_through() -> None:
    module = nn.Linear(3, 4)
    assert for_target(module, "executorch") is module


def test_xnnpack_runs_the_split_convolution_with_depthwise_kernels(tmp_path) -> None:
    """XNNPACK's own profile: the 7x7 runs as a grouped IGEMM, the split parts as DWConv kernels."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools import Inspector
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings import portable_lib

    conv = nn.Conv2d(16, 16, 7, padding=3, groups=16, bias=False).eval()
    x = torch.randn(1, 16, 12, 12)
    kernels = {}
    for name, module in (("full", conv), ("split", SplitDepthwiseConv(conv).eval())):
        program = to_edge_transform_and_lower(torch.export.export(module, (x,)),
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
        path = tmp_path / f"{name}.pte"
        path.write_bytes(program.buffer)
        loaded = portable_lib._load_for_executorch(str(path), enable_etdump=True)
        loaded.forward((x,))
        loaded.write_etdump_result_to_file(str(tmp_path / f"{name}.etdp"))
        events = Inspector(etdump_path=str(tmp_path / f"{name}.etdp")).to_dataframe()["event_name"]
        kernels[name] = {e.split(" #")[0] for e in events if e.startswith("Convolution")}
    assert kernels["full"] == {"Convolution (NHWC, F32) IGEMM"}
    assert kernels["split"] == {"Convolution (NHWC, F32) DWConv"}


def test_xnnpack_norms_keep_their_statistics_out_of_int8_schemes() -> None:
    """The int8 schemes quantize linears and convolutions: a norm's means must be neither."""
    x = torch.randn(2, 4, 4, 16)
    pairs = ((AffineFreeLayerNorm(16, 1e-6, xnnpack=True), AffineFreeLayerNorm(16, 1e-6)),
             (AffineFreeGroupNorm(1e-6, (1, 2, 3), xnnpack=True), AffineFreeGroupNorm(1e-6, (1, 2, 3))))
    for norm, reference in pairs:
        torch.testing.assert_close(norm(x), reference(x), rtol=1e-5, atol=1e-5)
        ops = {str(n.target) for n in torch.export.export(norm, (x,)).graph.nodes if n.op == "call_function"}
        assert not {op for op in ops if "linear" in op or "conv" in op}, ops


# ---------------------------------------------------------------- channels-first stages (ExecuTorch)


def prepared(name: str, precision: str = "fp32") -> nn.Module:
    model = trained_like(name)
    spec = ExportSpec.for_model(model.mf_edge_info, image_size=SIZE, precision=precision)
    return get_target("executorch").prepare(for_target(model, "executorch"), spec)


@pytest.mark.parametrize(("name", "stages"), [("convformer_s18", 4), ("caformer_s18", 2),
                                              ("poolformerv2_s12", 0), ("identityformer_s12", 0)])
def test_leading_sepconv_stages_run_channels_first(name: str, stages: int) -> None:
    model = prepared(name)
    assert model.mf_edge_rewrites.get("channels_first_stages", 0) == stages
    mixers = [type(stage[0].token_mixer) for stage in model.stages]
    assert mixers[:stages] == [ChannelsFirstSepConv] * stages
    assert ChannelsFirstSepConv not in mixers[stages:]
    if stages:
        fc1 = model.stages[0][0].mlp.fc1
        assert isinstance(fc1, nn.Conv2d) and fc1.kernel_size == (1, 1)
        assert isinstance(model.stages[0][0].norm1, ChannelsFirstLayerNorm)
        downs = list(model.downsample_layers)
        assert all(isinstance(d, LayoutDownsampling) for d in downs[:stages + 1])
        # the one layout change: into channels-last after the last convolutional stage, if any follows
        assert [d.permute_out for d in downs[:stages + 1]] == [False] * stages + [True] * (stages < 4)
        assert not any(d.permute_in for d in downs[:stages + 1])


def test_w8_keeps_the_channels_last_stages() -> None:
    """w8's dynamic quantization covers linears only: its pointwise layers must stay linears."""
    model = prepared("convformer_s18", precision="w8")
    assert "channels_first_stages" not in model.mf_edge_rewrites
    assert isinstance(model.stages[0][0].mlp.fc1, nn.Linear)


def test_int8_scheme_keeps_the_channel_statistics_float() -> None:
    """The norm's two means are 1x1 convolutions with a buffer weight: no observers on them."""
    model = nn.Sequential(ChannelsFirstLayerNorm(16, 1e-6), nn.Conv2d(16, 8, 1, bias=False)).eval()
    x = torch.randn(1, 16, 6, 6)
    graph = torch.export.export(model, (x,)).module()
    quantizer = build_quantizer(scheme_for("executorch", "int8"), "minmax")
    graph = quantizer.annotate(quantizer.transform_for_annotation(graph))
    convs = [n for n in graph.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    annotated = ["quantization_annotation" in n.meta for n in convs]
    assert annotated == [False, False, True]  # mean, variance, the trained 1x1 convolution
    torch.testing.assert_close(model[0](x), nn.functional.layer_norm(x.permute(0, 2, 3, 1), (16,), eps=1e-6)
                               .permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)
