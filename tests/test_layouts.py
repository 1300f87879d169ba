"""Agreement with timm 1.0.31's ``MetaFormer``: exact timm <-> official mapping, equal outputs and sizes.

timm registers PoolFormerV2, ConvFormer and CAFormer; IdentityFormer and RandFormer are built from
timm's ``MetaFormer`` class with the official constructor arguments (``nn.Identity`` mixers,
``GroupNorm1NoBias`` norms, linear head). timm has no random-mixing token mixer, so RandFormer's
stages 3-4 get ``ChannelsFirstRandomMixing`` below: the official ``RandomMixing`` (a frozen,
row-softmaxed ``[N, N]`` matrix applied over the tokens) written for timm's channels-first stages.
Everything else in those networks (stem, norms, MLPs, downsampling, head) is timm's code.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.metaformer import GroupNorm1NoBias
from timm.models.metaformer import MetaFormer as TimmMetaFormer
from torch import nn

from mf_edge.errors import UserError
from mf_edge.layouts import detect_layout, official_to_timm, timm_to_official
from mf_edge.models import MetaFormer, count_params, create_model, get_model_info, list_models
from mf_edge.weights import save_state_dict

IMAGE_SIZE = 64
SMALLEST = ("identityformer_s12", "randformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18")
# Families whose weights also go through files: file suffix of the official and of the timm layout.
ROUND_TRIP = {"randformer_s12": (".safetensors", ".pth"), "caformer_s18": (".pth", ".safetensors")}


class ChannelsFirstRandomMixing(nn.Module):
    """The official ``RandomMixing`` for ``[B, C, H, W]`` tensors; ``num_tokens`` is set per subclass."""

    num_tokens = 0

    def __init__(self, dim: int, **kwargs) -> None:
        super().__init__()
        matrix = torch.softmax(torch.rand(self.num_tokens, self.num_tokens), dim=-1)
        self.random_matrix = nn.Parameter(matrix, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return (x.flatten(2) @ self.random_matrix.T).reshape(b, c, h, w)


def timm_reference(name: str, image_size: int) -> nn.Module:
    """timm's network for the registered ``name`` (random init, eval mode)."""
    info = get_model_info(name)
    config = info.config
    if info.family in ("identityformer", "randformer"):
        mixers: list[type[nn.Module]] = [nn.Identity] * 4
        if info.family == "randformer":
            # timm's stages must be classes (it checks issubclass), one per token count.
            for stage in (2, 3):
                tokens = (image_size // 2 ** (stage + 2)) ** 2
                mixers[stage] = type(f"RandomMixing{tokens}", (ChannelsFirstRandomMixing,),
                                     {"num_tokens": tokens})
        model = TimmMetaFormer(depths=config.depths, dims=config.dims, token_mixers=mixers,
                               norm_layers=GroupNorm1NoBias, use_mlp_head=False,
                               num_classes=info.num_classes)
    else:
        model = timm.create_model(info.arch, pretrained=False, num_classes=info.num_classes)
        if config.mlp_head:
            # The official MlpHead uses nn.LayerNorm's default eps (1e-5); timm's uses 1e-6. Without this
            # line the logits differ by ~1e-4 relative, from that eps alone.
            model.head.fc.norm.eps = 1e-5
    return model.eval()


@pytest.mark.parametrize("name", SMALLEST)
def test_timm_weights_give_timm_outputs_and_round_trip(name: str, tmp_path) -> None:
    """timm's random weights, mapped to the official layout, give timm's logits in our network;
    saving ours in either layout and reloading through ``create_model`` is bit-exact (two families:
    RandFormer's frozen matrices, CAFormer's SepConv and attention stages)."""
    torch.manual_seed(0)
    reference = timm_reference(name, IMAGE_SIZE)
    timm_state = reference.state_dict()
    assert detect_layout(timm_state) == "timm"

    official = timm_to_official(timm_state)
    with torch.device("meta"):
        ours = MetaFormer(get_model_info(name).config, image_size=IMAGE_SIZE)
    expected = ours.state_dict()
    shapes = {k: tuple(v.shape) for k, v in official.items()}
    assert shapes == {k: tuple(v.shape) for k, v in expected.items()}  # every key, every shape
    assert detect_layout(official) == "official"
    back = official_to_timm(official)  # the mapping is a bijection: names, shapes and values come back
    assert list(back) == list(timm_state)
    assert all(torch.equal(back[k], timm_state[k]) for k in timm_state)

    ours.load_state_dict(official, strict=True, assign=True)
    ours.eval()
    assert count_params(ours) == count_params(reference)
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = reference(x), ours(x)
    assert got.shape == want.shape == (1, 1000)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()

    for layout, suffix in zip(("official", "timm"), ROUND_TRIP.get(name, ()), strict=False):
        path = save_state_dict(ours, tmp_path / f"{name}-{layout}{suffix}", layout=layout)
        reloaded = create_model(name, weights=path, image_size=IMAGE_SIZE)
        assert reloaded.mf_edge_weights["layout"] == layout
        with torch.no_grad():
            assert torch.equal(reloaded(x), got), f"{layout}{suffix} round trip changed the outputs"


def _assert_param_counts_equal_timm(name: str) -> None:
    with torch.device("meta"):
        reference = timm_reference(name, 224)
        info = get_model_info(name)
        ours = MetaFormer(info.config, num_classes=info.num_classes, image_size=224)
    assert count_params(ours) == count_params(reference)
    assert count_params(ours, trainable_only=True) == count_params(reference, trainable_only=True)


@pytest.mark.parametrize("name", [*SMALLEST, "caformer_s18_in21k"])
def test_param_counts_equal_timm(name: str) -> None:
    """The smallest model of each family (and a 21841-class head) has exactly timm's parameter count."""
    _assert_param_counts_equal_timm(name)


@pytest.mark.slow
def test_param_counts_equal_timm_for_every_architecture() -> None:
    """Every architecture at 224, and every 21841-class head, has exactly timm's parameter count."""
    for name in list_models():
        info = get_model_info(name)
        if info.image_size == 224 and info.pretrain != "in21ft1k":  # the rest repeat an architecture
            _assert_param_counts_equal_timm(name)


def test_detect_layout_recognises_both() -> None:
    official = {"downsample_layers.0.conv.weight": torch.zeros(1), "stages.0.0.norm1.weight": torch.zeros(1)}
    timm_keys = {"stem.conv.weight": torch.zeros(1), "stages.0.blocks.0.norm1.weight": torch.zeros(1)}
    assert detect_layout(official) == "official"
    assert detect_layout(timm_keys) == "timm"
    assert detect_layout({"fc.weight": torch.zeros(1)}) == "official"  # foreign: reported when loading


def test_attention_stages_keep_linear_mlps_in_timm_layout() -> None:
    """timm runs CAFormer's attention stages channels-last: their MLPs stay linear, the rest become 1x1."""
    with torch.device("meta"):
        ours = MetaFormer(get_model_info("caformer_s18").config)
    timm_state = official_to_timm(ours.state_dict())
    assert timm_state["stages.0.blocks.0.mlp.fc1.weight"].shape == (256, 64, 1, 1)
    assert timm_state["stages.0.blocks.0.token_mixer.pwconv1.weight"].shape == (128, 64, 1, 1)
    assert timm_state["stages.2.blocks.0.mlp.fc1.weight"].shape == (1280, 320)
    assert timm_state["stages.2.blocks.0.token_mixer.qkv.weight"].shape == (960, 320)


@pytest.mark.parametrize(
    ("convert", "foreign"),
    [(timm_to_official, "stages.0.blocks.0.norm1.bias"), (timm_to_official, "stem.proj.weight"),
     (official_to_timm, "downsample_layers.0.pre_norm.weight"), (official_to_timm, "stages.1.0.attn.weight")],
)
def test_unknown_keys_are_named(convert, foreign: str) -> None:
    state = {"stem.conv.weight": torch.zeros(8, 3, 7, 7)} if convert is timm_to_official else {
        "downsample_layers.0.conv.weight": torch.zeros(8, 3, 7, 7)}
    state[foreign] = torch.zeros(8)
    with pytest.raises(UserError, match=foreign.replace(".", r"\.")) as error:
        convert(state)
    assert "\n" not in str(error.value)
