"""Building blocks of the MetaFormer baselines (channels-last: tensors are ``[B, H, W, C]``).

Parameter and buffer names follow the official ``sail-sg/metaformer`` checkpoints, which are the
contract for loading weights: renaming an attribute here breaks ``strict=True`` loading.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Scale(nn.Module):
    """Per-channel scale (ResScale / LayerScale): ``x * scale``."""

    def __init__(self, dim: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class StarReLU(nn.Module):
    """StarReLU: ``s * relu(x) ** 2 + b`` with scalar learnable ``s`` and ``b``."""

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale_value * torch.ones(1))
        self.bias = nn.Parameter(bias_value * torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x) ** 2 + self.bias


class SquaredReLU(nn.Module):
    """Squared ReLU: ``relu(x) ** 2`` (used in the MLP head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(F.relu(x))


class LayerNormGeneral(nn.Module):
    """LayerNorm over ``normalized_dim`` with a per-channel affine ``weight`` and optional ``bias``.

    With ``normalized_dim=(1, 2, 3)`` on ``[B, H, W, C]`` this is the "modified LayerNorm"
    (GroupNorm with one group) of IdentityFormer, RandFormer and PoolFormerV2.
    """

    def __init__(
        self,
        affine_shape: int,
        normalized_dim: Sequence[int] = (-1,),
        bias: bool = True,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.normalized_dim = tuple(normalized_dim)
        self.weight = nn.Parameter(torch.ones(affine_shape))
        self.bias = nn.Parameter(torch.zeros(affine_shape)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(self.normalized_dim, keepdim=True)
        var = centred.pow(2).mean(self.normalized_dim, keepdim=True)
        x = centred / torch.sqrt(var + self.eps) * self.weight
        if self.bias is not None:
            x = x + self.bias
        return x


class LayerNormWithoutBias(nn.Module):
    """Last-dimension LayerNorm with a scale and no bias (ConvFormer, CAFormer)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, weight=self.weight, bias=None, eps=self.eps)


class Downsampling(nn.Module):
    """Strided convolution between stages, with optional LayerNorm before or after.

    Input and output are channels-last; the convolution itself runs channels-first.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        pre_norm: bool = False,
        post_norm: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.pre_norm = LayerNormGeneral(in_channels, bias=False, eps=eps) if pre_norm else nn.Identity()
        self.channels_last_input = pre_norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.post_norm = LayerNormGeneral(out_channels, bias=False, eps=eps) if post_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)
        x = self.conv(x).permute(0, 2, 3, 1)
        return self.post_norm(x)


class IdentityMixer(nn.Identity):
    """IdentityFormer's token mixer: no mixing at all."""


class RandomMixing(nn.Module):
    """RandFormer's token mixer: a frozen, row-softmaxed random ``[N, N]`` matrix over the tokens."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        matrix = torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1)
        self.random_matrix = nn.Parameter(matrix, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = torch.matmul(self.random_matrix, x.reshape(b, h * w, c))
        return x.reshape(b, h, w, c)


class Pooling(nn.Module):
    """PoolFormer's token mixer: ``avgpool(x) - x`` (3x3, stride 1, padding not counted)."""

    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return y - x


class SepConv(nn.Module):
    """ConvFormer's token mixer: inverted separable convolution (MobileNetV2 style), no biases."""

    def __init__(self, dim: int, expansion_ratio: int = 2, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = int(expansion_ratio * dim)
        self.pwconv1 = nn.Linear(dim, hidden, bias=False)
        self.act1 = StarReLU()
        self.dwconv = nn.Conv2d(
            hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False
        )
        self.pwconv2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.pwconv1(x))
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.pwconv2(x)


class Attention(nn.Module):
    """Multi-head self-attention over all ``H * W`` tokens (CAFormer stages 3-4), no biases."""

    def __init__(self, dim: int, head_dim: int = 32) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = max(dim // head_dim, 1)
        self.scale = head_dim**-0.5
        inner = self.num_heads * head_dim
        self.qkv = nn.Linear(dim, inner * 3, bias=False)
        self.proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, h, w, self.num_heads * self.head_dim))


class Mlp(nn.Module):
    """Channel MLP of every block: Linear -> StarReLU -> Linear, no biases."""

    def __init__(self, dim: int, mlp_ratio: int = 4, drop: float = 0.0) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = StarReLU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class MlpHead(nn.Module):
    """ConvFormer/CAFormer classifier: Linear -> SquaredReLU -> LayerNorm -> Dropout -> Linear."""

    def __init__(self, dim: int, num_classes: int, mlp_ratio: int = 4, head_dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = SquaredReLU()
        self.norm = nn.LayerNorm(hidden)
        self.head_dropout = nn.Dropout(head_dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.head_dropout(self.norm(self.act(self.fc1(x)))))
