"""Channels-first convolutional stages for XNNPACK: no layout changes around ConvFormer's convolutions.

The reference MetaFormer is channels-last (``[B, H, W, C]``) and runs each convolution channels-first
between two permutes. XNNPACK computes convolutions on NHWC data and tracks which tensors it holds as
NHWC (``ChannelsLastTaggedReshapePass``), so each permute to ``[B, C, H, W]`` became a transpose plus a
conversion back to NHWC: four transposes of the expanded hidden tensor around every depthwise
convolution, about 17% of ConvFormer-S18's int8 program (ETDump, README Benchmarks).

Written channels-first, a leading run of ``SepConv`` stages (all of ConvFormer, CAFormer's first two)
computes the same function with no layout change inside: the pointwise linears become 1x1
convolutions, a channel LayerNorm's two means become 1x1 convolutions to one channel (their weight is a
buffer, not a parameter, so the int8 schemes leave these statistics float), ResScale multiplies by a
``[1, C, 1, 1]`` tensor, and the final token mean is a global average pool. XNNPACK then holds every
tensor of these stages as NHWC, from the stem to the last convolutional stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mf_edge.models.layers import (
    Downsampling,
    LayerNormGeneral,
    LayerNormWithoutBias,
    Mlp,
    Scale,
    SepConv,
)
from mf_edge.models.metaformer import MetaFormerBlock
from mf_edge.rewrites import AffineFreeLayerNorm, ShiftedSquaredReLU


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of ``[B, C, H, W]``, with an optional per-channel affine part.

    Each mean is a 1x1 convolution with a ``1 / C`` buffer as its weight (XNNPACK averages only over
    H and W); the int8 schemes quantize convolutions with trained weights only, so it stays float.
    ``eps`` is the variance convolution's bias: no add, and no constant for XNNPACK to convert to NHWC.
    """

    def __init__(self, dim: int, eps: float, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("average", torch.full((1, dim, 1, 1), 1.0 / dim), persistent=False)
        self.register_buffer("eps", torch.tensor([eps]), persistent=False)
        self.weight = None if weight is None else _per_channel(weight)
        self.bias = None if bias is None else _per_channel(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - F.conv2d(x, self.average)
        x = centred * torch.rsqrt(F.conv2d(centred * centred, self.average, self.eps))
        if self.weight is not None:
            x = x * self.weight
        return x + self.bias if self.bias is not None else x


class ChannelsFirstScale(nn.Module):
    """ResScale on ``[B, C, H, W]``: ``x * scale`` with the scale stored as ``[1, C, 1, 1]``."""

    def __init__(self, source: Scale) -> None:
        super().__init__()
        self.scale = _per_channel(source.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class FourDimShift(nn.Module):
    """``ShiftedSquaredReLU`` with its shift as a ``[1, 1, 1, 1]`` buffer.

    XNNPACK keeps an elementwise op in NHWC only when every operand is 4-D; a scalar constant makes it
    convert its input back to NCHW and the result to NHWC again (two transposes per block).
    """

    def __init__(self, source: ShiftedSquaredReLU) -> None:
        super().__init__()
        self.register_buffer("bias", torch.full((1, 1, 1, 1), float(source.bias)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).pow(2) + self.bias


class ChannelsFirstSepConv(nn.Module):
    """``SepConv`` on ``[B, C, H, W]``: 1x1 convolution, activation, depthwise, 1x1 convolution."""

    def __init__(self, source: SepConv) -> None:
        super().__init__()
        act = source.act1
        self.pwconv1 = pointwise_conv(source.pwconv1)
        self.act1 = FourDimShift(act) if isinstance(act, ShiftedSquaredReLU) else act
        self.dwconv, self.pwconv2 = source.dwconv, pointwise_conv(source.pwconv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pwconv2(self.dwconv(self.act1(self.pwconv1(x))))


class LayoutDownsampling(nn.Module):
    """``Downsampling`` between stages of either layout: permutes only where the layout changes."""

    def __init__(self, source: Downsampling, channels_first_in: bool, channels_first_out: bool) -> None:
        super().__init__()
        self.pre_norm = channels_first_norm(source.pre_norm) if channels_first_in else source.pre_norm
        self.conv = source.conv
        self.post_norm = channels_first_norm(source.post_norm) if channels_first_out else source.post_norm
        self.permute_in = source.channels_last_input and not channels_first_in
        self.permute_out = not channels_first_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        x = self.conv(x.permute(0, 3, 1, 2) if self.permute_in else x)
        return self.post_norm(x.permute(0, 2, 3, 1) if self.permute_out else x)


def _per_channel(values: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(values.detach().reshape(1, -1, 1, 1).clone(), requires_grad=values.requires_grad)


def pointwise_conv(linear: nn.Linear) -> nn.Conv2d:
    """``linear`` as the 1x1 convolution computing it on ``[B, C, H, W]``."""
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
    requires_grad = linear.weight.requires_grad
    conv.weight = nn.Parameter(linear.weight.detach()[:, :, None, None].clone(), requires_grad=requires_grad)
    if linear.bias is not None:
        conv.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=requires_grad)
    return conv.to(linear.weight.dtype)


def channels_first_norm(norm: nn.Module) -> nn.Module | None:
    """The channels-first form of a norm over the channels (``None`` for any other norm)."""
    if isinstance(norm, nn.Identity):
        return norm
    if isinstance(norm, AffineFreeLayerNorm):
        return ChannelsFirstLayerNorm(norm.dim, norm.eps)
    if isinstance(norm, LayerNormWithoutBias):
        return ChannelsFirstLayerNorm(norm.weight.numel(), norm.eps, norm.weight)
    if isinstance(norm, LayerNormGeneral) and norm.normalized_dim in ((-1,), (3,)):
        return ChannelsFirstLayerNorm(norm.weight.numel(), norm.eps, norm.weight, norm.bias)
    return None


def _convertible(block: nn.Module) -> bool:
    return (isinstance(block, MetaFormerBlock) and isinstance(block.token_mixer, SepConv)
            and isinstance(block.mlp, Mlp)
            and all(isinstance(layer, nn.Linear) for layer in (block.mlp.fc1, block.mlp.fc2))
            and all(isinstance(getattr(block, f"res_scale{i}"), (Scale, nn.Identity)) for i in (1, 2))
            and all(channels_first_norm(getattr(block, f"norm{i}")) is not None for i in (1, 2)))


def _convert_block(block: MetaFormerBlock) -> None:
    block.norm1, block.norm2 = channels_first_norm(block.norm1), channels_first_norm(block.norm2)
    block.token_mixer = ChannelsFirstSepConv(block.token_mixer)
    block.mlp.fc1, block.mlp.fc2 = pointwise_conv(block.mlp.fc1), pointwise_conv(block.mlp.fc2)
    for attr in ("res_scale1", "res_scale2"):
        if isinstance(getattr(block, attr), Scale):
            setattr(block, attr, ChannelsFirstScale(getattr(block, attr)))


def channels_first_stages(model: nn.Module) -> int:
    """Rewrite ``model``'s leading ``SepConv`` stages channels-first in place; how many were rewritten.

    ``model`` is a MetaFormer (``downsample_layers`` and ``stages``); its forward must then take the
    returned count into account (``GlobalPoolMetaFormer``): after ``n`` stages the tensor is
    ``[B, C, H, W]``. Each downsampling layer gets the layouts of the stages on either side.
    """
    count = 0
    for stage in model.stages:
        if len(stage) == 0 or not all(_convertible(block) for block in stage):
            break
        count += 1
    if not all(isinstance(down, Downsampling) and channels_first_norm(down.pre_norm) is not None
               and channels_first_norm(down.post_norm) is not None
               for down in model.downsample_layers[:count + 1]):
        return 0
    for stage in model.stages[:count]:
        for block in stage:
            _convert_block(block)
    if count:
        downs = model.downsample_layers
        for i in range(min(count + 1, len(downs))):
            downs[i] = LayoutDownsampling(downs[i], channels_first_in=i == 0 or i <= count,
                                          channels_first_out=i < count)
    return count
