"""The exact deployment rewrites only the ExecuTorch target takes (its ``Target.rewrites``, after the folds).

- ``xnnpack_norms``: the affine-free norms left by the folds are written with ops XNNPACK delegates
  (it has no LayerNorm, and averages only over the two innermost dims of a 4-D tensor). The norms
  that keep their weight are left to the ExecuTorch target's own ``prepare``
  (``xnnpack_rewrites.py``), which also rewrites RandFormer's mixing, attention and pooling.
- ``split_depthwise``: XNNPACK's depthwise kernels take at most 25 taps; a 7x7 depthwise
  convolution (ConvFormer's ``SepConv``) falls back to a grouped IGEMM about 20x slower (fp32; worse
  in int8). It becomes the sum of depthwise convolutions of 7x3, 7x2 (dilation 4) and 7x2
  (dilation 6) taps.
"""

from __future__ import annotations

import torch
from torch import nn

from mf_edge.models.layers import SepConv
from mf_edge.rewrites import AffineFreeGroupNorm, AffineFreeLayerNorm


class SplitDepthwiseConv(nn.Module):
    """A ``k x k`` depthwise convolution as a sum of depthwise convolutions of at most ``max_taps`` taps.

    The centre columns form one convolution; each remaining pair of columns at offsets ``+-d`` is a
    two-column convolution with dilation ``2d``. All use symmetric padding, so the output is the same.
    Its ``parts`` count as one layer (``counts_as_one_layer``: int8 sensitivity ranks the whole split).
    """

    counts_as_one_layer = True

    def __init__(self, conv: nn.Conv2d, max_taps: int = 25) -> None:
        super().__init__()
        kh, kw = conv.kernel_size
        ph, pw = conv.padding
        half = kw // 2
        centre = max(c for c in range(1, kw + 1, 2) if kh * c <= max_taps)
        weight = conv.weight.detach()
        pieces = [(weight[..., half - centre // 2: half + centre // 2 + 1], (ph, pw - half + centre // 2), 1)]
        for d in range(centre // 2 + 1, half + 1):
            pieces.append((weight[..., [half - d, half + d]], (ph, pw - half + d), 2 * d))
        self.parts = nn.ModuleList()
        for i, (w, padding, dilation) in enumerate(pieces):
            bias = conv.bias is not None and i == 0
            part = nn.Conv2d(conv.in_channels, conv.out_channels, tuple(w.shape[-2:]), padding=padding,
                             dilation=(1, dilation), groups=conv.groups, bias=bias)
            part.weight = nn.Parameter(w.clone(), requires_grad=conv.weight.requires_grad)
            if part.bias is not None:
                part.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.weight.requires_grad)
            self.parts.append(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.parts[0](x)
        for part in self.parts[1:]:
            out = out + part(x)
        return out


def xnnpack_norms(model: nn.Module) -> int:
    """Write the affine-free norms the folds left with ops XNNPACK delegates (``xnnpack=True``)."""
    norms = [m for m in model.modules() if isinstance(m, (AffineFreeLayerNorm, AffineFreeGroupNorm))]
    for norm in norms:
        norm.xnnpack = True
    return len(norms)


def split_depthwise(model: nn.Module, max_taps: int = 25) -> int:
    """Split every depthwise convolution of more than ``max_taps`` taps (``SplitDepthwiseConv``)."""
    count = 0
    for mixer in [m for m in model.modules() if isinstance(m, SepConv)]:
        conv = mixer.dwconv
        kh, kw = conv.kernel_size
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        symmetric = conv.padding == (kh // 2, kw // 2) and conv.stride == (1, 1) and conv.dilation == (1, 1)
        if depthwise and symmetric and kh * kw > max_taps and kw % 2 and kh * 2 <= max_taps:
            mixer.dwconv = SplitDepthwiseConv(conv, max_taps)
            count += 1
    return count
