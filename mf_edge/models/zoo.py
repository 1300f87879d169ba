"""The model registry: every MetaFormer baseline of the official code base, with its metadata.

Each entry is a ``ModelInfo``: the architecture (``MetaFormerConfig``), the preprocessing the
official checkpoints were trained with, the official ImageNet numbers (top-1, MACs) and where the
weights are published (the official ``.pth`` and timm's safetensors on the Hugging Face Hub).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass, field

from mf_edge.errors import UserError
from mf_edge.models.config import MetaFormerConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_HUB_REPO = "sail/dl"
WEIGHTS_LICENSE = "Apache-2.0 (sail-sg/metaformer)"

S12, S24, S36, M36, M48 = (2, 2, 6, 2), (4, 4, 12, 4), (6, 6, 18, 6), (6, 6, 18, 6), (8, 8, 24, 8)
SMALL_DIMS, MEDIUM_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)

BASE_ARCHS: dict[str, MetaFormerConfig] = {}
for _family, _mixers in {
    "identityformer": ("identity",) * 4,
    "randformer": ("identity", "identity", "random", "random"),
    "poolformerv2": ("pooling",) * 4,
}.items():
    for _size, _depths, _dims in (
        ("s12", S12, SMALL_DIMS),
        ("s24", S24, SMALL_DIMS),
        ("s36", S36, SMALL_DIMS),
        ("m36", M36, MEDIUM_DIMS),
        ("m48", M48, MEDIUM_DIMS),
    ):
        BASE_ARCHS[f"{_family}_{_size}"] = MetaFormerConfig(_depths, _dims, _mixers, group_norm=True)
for _family, _mixers in {
    "convformer": ("sepconv",) * 4,
    "caformer": ("sepconv", "sepconv", "attention", "attention"),
}.items():
    for _size, _depths, _dims in (
        ("s18", (3, 3, 9, 3), SMALL_DIMS),
        ("s36", (3, 12, 18, 3), SMALL_DIMS),
        ("m36", (3, 12, 18, 3), (96, 192, 384, 576)),
        ("b36", (3, 12, 18, 3), (128, 256, 512, 768)),
    ):
        BASE_ARCHS[f"{_family}_{_size}"] = MetaFormerConfig(_depths, _dims, _mixers, mlp_head=True)


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of one registered model (one official checkpoint)."""

    name: str
    arch: str
    family: str
    config: MetaFormerConfig
    image_size: int = 224
    num_classes: int = 1000
    pretrain: str = "in1k"
    top1: float | None = None
    macs_g: float | None = None
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hub_file: str = ""
    timm_hub_id: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON data: what another process needs to register this model (``from_dict``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelInfo:
        """The ``ModelInfo`` that ``to_dict`` (through JSON: lists for tuples) described."""
        def tuples(fields: dict) -> dict:
            return {key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()}

        return cls(**{**tuples(data), "config": MetaFormerConfig(**tuples(data["config"]))})

    @property
    def hub_repo(self) -> str:
        return OFFICIAL_HUB_REPO

    @property
    def official_url(self) -> str:
        return f"https://huggingface.co/{OFFICIAL_HUB_REPO}/resolve/main/{self.hub_file}"

    @property
    def labels(self) -> str:
        """Which label set the classifier predicts: ``imagenet-1k`` or ``imagenet-21k``."""
        return "imagenet-21k" if self.num_classes == 21841 else "imagenet-1k"


# Official ImageNet-1k top-1 (%) and MACs (G) per model, from the sail-sg/metaformer README.
_BASIC = {
    "identityformer": {"s12": (74.6, 1.8), "s24": (78.2, 3.4), "s36": (79.3, 5.0), "m36": (80.0, 8.8),
                       "m48": (80.4, 11.5)},
    "randformer": {"s12": (76.6, 1.9), "s24": (78.2, 3.5), "s36": (79.5, 5.2), "m36": (81.2, 9.0),
                   "m48": (81.4, 11.9)},
    "poolformerv2": {"s12": (78.0, 1.8), "s24": (80.7, 3.4), "s36": (81.6, 5.0), "m36": (82.2, 8.8),
                     "m48": (82.6, 11.5)},
}
# name -> (top1 224 in1k, top1 384 in1k, top1 224 in21ft1k, top1 384 in21ft1k, MACs 224, MACs 384)
_COMMON = {
    "caformer_s18": (83.6, 85.0, 84.1, 85.4, 4.1, 13.4),
    "caformer_s36": (84.5, 85.7, 85.8, 86.9, 8.0, 26.0),
    "caformer_m36": (85.2, 86.2, 86.6, 87.5, 13.2, 42.0),
    "caformer_b36": (85.5, 86.4, 87.4, 88.1, 23.2, 72.2),
    "convformer_s18": (83.0, 84.4, 83.7, 85.0, 3.9, 11.6),
    "convformer_s36": (84.1, 85.4, 85.4, 86.4, 7.6, 22.4),
    "convformer_m36": (84.5, 85.6, 86.1, 86.9, 12.8, 37.7),
    "convformer_b36": (84.8, 85.7, 87.0, 87.6, 22.6, 66.5),
}


def _build_registry() -> dict[str, ModelInfo]:
    registry: dict[str, ModelInfo] = {}

    def add(name: str, arch: str, **kwargs) -> None:
        family = arch.split("_")[0]
        registry[name] = ModelInfo(
            name=name, arch=arch, family=family, config=BASE_ARCHS[arch],
            hub_file=f"{family}/{name}.pth", **kwargs,
        )

    for family, sizes in _BASIC.items():
        for size, (top1, macs) in sizes.items():
            arch = f"{family}_{size}"
            timm_id = f"{arch}.sail_in1k" if family == "poolformerv2" else None
            add(arch, arch, top1=top1, macs_g=macs, timm_hub_id=timm_id)
    for arch, (t224, t384, t21_224, t21_384, macs224, macs384) in _COMMON.items():
        add(arch, arch, top1=t224, macs_g=macs224, timm_hub_id=f"{arch}.sail_in1k")
        add(f"{arch}_384", arch, image_size=384, top1=t384, macs_g=macs384,
            timm_hub_id=f"{arch}.sail_in1k_384")
        add(f"{arch}_in21ft1k", arch, pretrain="in21ft1k", top1=t21_224, macs_g=macs224,
            timm_hub_id=f"{arch}.sail_in22k_ft_in1k")
        add(f"{arch}_384_in21ft1k", arch, image_size=384, pretrain="in21ft1k", top1=t21_384,
            macs_g=macs384, timm_hub_id=f"{arch}.sail_in22k_ft_in1k_384")
        add(f"{arch}_in21k", arch, pretrain="in21k", num_classes=21841, macs_g=macs224,
            timm_hub_id=f"{arch}.sail_in22k")
    return registry


REGISTRY: dict[str, ModelInfo] = _build_registry()


def register_model(info: ModelInfo, *, replace: bool = False) -> ModelInfo:
    """Add ``info`` to the registry, so that every command and API takes ``info.name`` like a zoo model.

    For an architecture of your own (``dataclasses.replace`` of a zoo entry with another ``config``,
    as the tests' one-block-per-stage variants are) or a fine-tuned head. An existing name is refused
    unless ``replace``. The registry is per process: register in each process that uses the name.
    """
    if not isinstance(info, ModelInfo):
        raise TypeError(f"register_model takes a ModelInfo, not {type(info).__name__}")
    if info.name in REGISTRY and not replace:
        raise ValueError(f"model {info.name!r} is already registered; pass replace=True to replace it")
    REGISTRY[info.name] = info
    return info


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a shell-style ``pattern`` (``"caformer_*"``)."""
    names = sorted(REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def get_model_info(name: str) -> ModelInfo:
    """The ``ModelInfo`` of ``name``; an unknown name raises ``UserError`` listing close matches."""
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, REGISTRY, n=4, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(f"unknown model {name!r}.{hint} Run `mf-edge models` for the full list.") from None
