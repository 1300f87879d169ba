"""The MetaFormer network: four stages of ``x = res_scale(x) + mixer(norm(x))`` blocks."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from mf_edge.models.config import MIXERS, MetaFormerConfig
from mf_edge.models.layers import (
    Attention,
    Downsampling,
    IdentityMixer,
    LayerNormGeneral,
    LayerNormWithoutBias,
    Mlp,
    MlpHead,
    Pooling,
    RandomMixing,
    Scale,
    SepConv,
)


class MetaFormerBlock(nn.Module):
    """One block: token mixing then channel MLP, each with a residual ResScale."""

    def __init__(
        self,
        dim: int,
        token_mixer: nn.Module,
        norm_layer: type[nn.Module] | partial,
        drop_path: float = 0.0,
        res_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = token_mixer
        self.drop_path1 = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.res_scale1 = Scale(dim, res_scale_init) if res_scale_init else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim)
        self.drop_path2 = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.res_scale2 = Scale(dim, res_scale_init) if res_scale_init else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_scale1(x) + self.drop_path1(self.token_mixer(self.norm1(x)))
        x = self.res_scale2(x) + self.drop_path2(self.mlp(self.norm2(x)))
        return x


def _make_mixer(kind: str, dim: int, num_tokens: int) -> nn.Module:
    if kind == "identity":
        return IdentityMixer()
    if kind == "random":
        return RandomMixing(num_tokens)
    if kind == "pooling":
        return Pooling()
    if kind == "sepconv":
        return SepConv(dim)
    if kind == "attention":
        return Attention(dim)
    raise ValueError(f"unknown token mixer {kind!r}; expected one of {MIXERS}")


class MetaFormer(nn.Module):
    """A 4-stage MetaFormer classifier taking ``[B, 3, H, W]`` images (``H, W`` multiples of 32)."""

    def __init__(
        self,
        config: MetaFormerConfig,
        num_classes: int = 1000,
        image_size: int = 224,
        drop_path_rate: float = 0.0,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        dims = config.dims
        norm_layer = (
            partial(LayerNormGeneral, normalized_dim=(1, 2, 3), bias=False, eps=1e-6)
            if config.group_norm
            else partial(LayerNormWithoutBias, eps=1e-6)
        )
        self.downsample_layers = nn.ModuleList(
            [Downsampling(3, dims[0], kernel_size=7, stride=4, padding=2, post_norm=True)]
            + [
                Downsampling(dims[i - 1], dims[i], kernel_size=3, stride=2, padding=1, pre_norm=True)
                for i in range(1, 4)
            ]
        )
        rates = torch.linspace(0, drop_path_rate, sum(config.depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        cursor = 0
        for i, (depth, dim) in enumerate(zip(config.depths, dims, strict=True)):
            tokens = (image_size // (4 * 2**i)) ** 2
            blocks = [
                MetaFormerBlock(
                    dim,
                    _make_mixer(config.mixers[i], dim, tokens),
                    norm_layer,
                    drop_path=rates[cursor + j],
                    res_scale_init=config.res_scale[i],
                )
                for j in range(depth)
            ]
            self.stages.append(nn.Sequential(*blocks))
            cursor += depth
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        if config.mlp_head:
            self.head: nn.Module = MlpHead(dims[-1], num_classes, head_dropout=head_dropout)
        else:
            self.head = nn.Linear(dims[-1], num_classes)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features ``[B, C]``."""
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
        return self.norm(x.mean((1, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last classifier layer with a freshly initialised one of ``num_classes``."""
        self.num_classes = num_classes
        if isinstance(self.head, MlpHead):
            old = self.head.fc2
            self.head.fc2 = nn.Linear(old.in_features, num_classes)
            _init_weights(self.head.fc2)
        else:
            self.head = nn.Linear(self.head.in_features, num_classes)
            _init_weights(self.head)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
