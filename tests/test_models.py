"""The zoo: registry, ``create_model`` behaviour, and sizes and MACs against the official tables."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torchvision.ops import StochasticDepth

from mf_edge import UserError, count_macs, count_params, create_model, get_model_info, list_models
from mf_edge.models import MetaFormer, ModelInfo, register_model
from mf_edge.models.factory import model_stats

from small_models import zoo_models

SMALLEST = ("identityformer_s12", "randformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18")
# Parameters (millions) from the sail-sg/metaformer README: (trainable, frozen random matrices); the
# README rounds ConvFormer/CAFormer to whole millions (ints here) and the others to 0.1 M.
OFFICIAL_PARAMS_M = {
    **{f"{family}_{size}": (params, 0.0) for family in ("identityformer", "poolformerv2")
       for size, params in (("s12", 11.9), ("s24", 21.3), ("s36", 30.8), ("m36", 56.1), ("m48", 73.3))},
    **{f"randformer_{size}": (params, frozen) for size, params, frozen in (
        ("s12", 11.9, 0.2), ("s24", 21.3, 0.5), ("s36", 30.8, 0.7), ("m36", 56.1, 0.7), ("m48", 73.3, 0.9))},
    **{f"caformer_{size}": (params, 0.0) for size, params in (("s18", 26), ("s36", 39), ("m36", 56),
                                                                ("b36", 99))},
    **{f"convformer_{size}": (params, 0.0) for size, params in (("s18", 27), ("s36", 40), ("m36", 57),
                                                                  ("b36", 100))},
}


def _assert_official_params(name: str, params: int, frozen_params: int) -> None:
    trainable, frozen = OFFICIAL_PARAMS_M[get_model_info(name).arch]
    rounding = 0.5 if isinstance(trainable, int) else 0.05
    assert (params - frozen_params) / 1e6 == pytest.approx(trainable, abs=rounding), name
    assert frozen_params / 1e6 == pytest.approx(frozen, abs=0.05), name


def test_registry_holds_every_official_checkpoint() -> None:
    names = zoo_models()
    assert len(names) == 55
    for family in ("identityformer", "randformer", "poolformerv2"):
        assert zoo_models(f"{family}_*") == [f"{family}_{s}" for s in ("m36", "m48", "s12", "s24", "s36")]
    for family in ("convformer", "caformer"):
        for size in ("s18", "s36", "m36", "b36"):
            assert list_models(f"{family}_{size}*") == sorted(
                f"{family}_{size}{suffix}" for suffix in ("", "_384", "_384_in21ft1k", "_in21ft1k", "_in21k"))
    in21k = get_model_info("caformer_b36_in21k")
    assert (in21k.num_classes, in21k.labels, in21k.top1) == (21841, "imagenet-21k", None)
    big = get_model_info("convformer_s18_384_in21ft1k")
    assert (big.image_size, big.num_classes, big.pretrain, big.top1) == (384, 1000, "in21ft1k", 85.0)
    assert get_model_info("randformer_s12").timm_hub_id is None  # timm has no RandFormer weights
    assert get_model_info("caformer_s18_384").timm_hub_id == "caformer_s18.sail_in1k_384"


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(UserError, match="unknown model 'convformer_s19'. Did you mean: convformer_s18"):
        get_model_info("convformer_s19")


def test_random_weights_are_seeded_and_eval_mode() -> None:
    first = create_model("identityformer_s12", image_size=64)
    again = create_model("identityformer_s12", image_size=64)
    other = create_model("identityformer_s12", image_size=64, seed=1)
    assert not first.training
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                  strict=True))
    assert not torch.equal(first.head.weight, other.head.weight)
    assert first.mf_edge_weights == {"source": "random", "path": None, "sha256": None, "layout": None,
                                     "seed": 0}
    assert first.mf_edge_info is get_model_info("identityformer_s12")


def test_randformer_matrices_follow_the_image_size() -> None:
    model = create_model("randformer_s12", image_size=64, num_classes=10)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("random_matrix")}
    assert shapes == {**{f"stages.2.{b}.token_mixer.random_matrix": (16, 16) for b in range(6)},
                      **{f"stages.3.{b}.token_mixer.random_matrix": (4, 4) for b in range(2)}}
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("random_matrix"))
    frozen = count_params(model) - count_params(model, trainable_only=True)
    assert frozen == 6 * 16 * 16 + 2 * 4 * 4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    with torch.device("meta"):
        shapes_only = MetaFormer(get_model_info("randformer_s12").config, num_classes=10, image_size=64)
    assert count_macs(model, 64) == count_macs(shapes_only, 64)  # a meta build counts the same MACs


def test_image_size_must_be_a_multiple_of_32() -> None:
    with pytest.raises(UserError, match="image size 100 is not a positive multiple of 32"):
        create_model("poolformerv2_s12", image_size=100)


def test_drop_path_and_head_dropout_reach_the_layers() -> None:
    with torch.device("meta"):
        model = MetaFormer(get_model_info("caformer_s18").config, drop_path_rate=0.2, head_dropout=0.3)
    rates = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(rates) == 2 * (18 - 1) and rates[-1] == pytest.approx(0.2)  # block 0 has rate 0: Identity
    assert model.head.head_dropout.p == 0.3


@pytest.mark.parametrize("name", SMALLEST)
def test_smallest_of_each_family_matches_the_official_table(name: str) -> None:
    """Parameters as in the official README; counted MACs within 5% of its MACs column."""
    stats = model_stats(name, macs=True)
    _assert_official_params(name, stats.params, stats.frozen_params)
    official = get_model_info(name).macs_g * 1e9
    assert abs(stats.macs - official) <= 0.05 * official, f"{name}: {stats.macs / 1e9:.2f} G counted"


@pytest.mark.slow
def test_every_architecture_matches_the_official_table() -> None:
    """All ImageNet-1k models at 224 and 384: README parameters, counted MACs within 5% of the table."""
    for name in zoo_models():
        info = get_model_info(name)
        if info.num_classes != 1000:
            continue
        stats = model_stats(name, macs=True)
        _assert_official_params(name, stats.params, stats.frozen_params)
        assert abs(stats.macs - info.macs_g * 1e9) <= 0.05 * info.macs_g * 1e9, (name, stats.macs)


@pytest.mark.slow
def test_every_registered_model_builds_and_runs() -> None:
    """Every registered model (384 and 21841-class ones included) at its native size: logits' shape."""
    for name in list_models():
        info = get_model_info(name)
        model = create_model(name)
        with torch.no_grad():
            out = model(torch.randn(1, 3, info.image_size, info.image_size))
        assert out.shape == (1, info.num_classes), name
        assert torch.isfinite(out).all(), name


def test_registered_model_round_trips_and_refuses_a_silent_replace() -> None:
    """Catches ``register_model`` overwriting a zoo entry without ``replace``, and a ``to_dict`` ->
    JSON -> ``from_dict`` trip (how bench workers learn a registered model) that loses the config's
    tuples (checked against ``from_dict`` without the tuple conversion: the config compared unequal)."""
    info = get_model_info("convformer_d1")  # registered by conftest (tests/small_models.py)
    assert info.config.depths == (1, 1, 1, 1)
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    with pytest.raises(TypeError, match="takes a ModelInfo, not dict"):
        register_model(info.to_dict())
    with pytest.raises(ValueError, match="already registered"):
        register_model(dataclasses.replace(info, name="convformer_s18"))
    assert get_model_info("convformer_s18").config.depths == (3, 3, 9, 3)
    model = create_model("convformer_d1", image_size=64)
    assert count_params(model) < count_params(create_model("convformer_s18", image_size=64)) / 2
