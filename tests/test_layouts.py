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
from mf_edge.models import MetaFormer, count_params, create_model, get_model_info
from mf_edge.weights import save_state_dict

from small_models import zoo_models

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
    for name in zoo_models():
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


# ---------------------------------------------------------------- every tensor distinct, both directions
# timm's default init makes the norms 1/0, ResScale 1 and StarReLU 1/0, so a mapping that swaps two
# same-shaped tensors (norm1 and norm2, res_scale1 and res_scale2) gives the same logits there.

SEEDED_SIZE = 32


def distinct_values(model: nn.Module, seed: int) -> nn.Module:
    """Every floating parameter and buffer moved off its init by its own seeded noise (constants
    such as norm weights 1 and biases 0 by 0.2 * N(0, 1), random weights by 10% of their spread)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted([*model.named_parameters(), *model.named_buffers()]):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            spread = tensor.std().item() if tensor.numel() > 1 else 0.0
            tensor.add_(noise * (0.1 * spread if spread > 1e-6 else 0.2))
    return model


def all_distinct(state: dict[str, torch.Tensor]) -> bool:
    """No two same-shaped floating tensors are equal (so a swap of two of them would show)."""
    seen: dict[tuple, list[torch.Tensor]] = {}
    for value in state.values():
        if value.is_floating_point():
            same = seen.setdefault(tuple(value.shape), [])
            if any(torch.equal(value, other) for other in same):
                return False
            same.append(value)
    return True


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("name", SMALLEST)
def test_distinct_timm_weights_give_timm_logits_in_both_directions(name: str) -> None:
    """timm -> official: timm's network with distinct values, mapped, gives timm's logits in ours;
    official -> timm: ours with distinct values, mapped, gives our logits in timm's. Catches a
    mapping that swaps same-shaped tensors (planted: ``norm1``/``norm2`` exchanged in
    ``layouts._rename``, both directions, so the round trip still holds: every family fails)."""
    torch.manual_seed(0)
    reference = distinct_values(timm_reference(name, SEEDED_SIZE), seed=1)
    assert all_distinct(reference.state_dict())
    x = torch.randn(2, 3, SEEDED_SIZE, SEEDED_SIZE, generator=torch.Generator().manual_seed(2))

    ours = MetaFormer(get_model_info(name).config, image_size=SEEDED_SIZE).eval()
    ours.load_state_dict(timm_to_official(reference.state_dict()), strict=True)
    with torch.no_grad():
        want, got = reference(x), ours(x)
    assert close(got, want), (got - want).abs().max().item()

    mine = distinct_values(create_model(name, image_size=SEEDED_SIZE), seed=3)
    assert all_distinct(mine.state_dict())
    theirs = timm_reference(name, SEEDED_SIZE)
    theirs.load_state_dict(official_to_timm(mine.state_dict()), strict=True)
    with torch.no_grad():
        want, got = mine(x), theirs(x)
    assert close(got, want), (got - want).abs().max().item()
