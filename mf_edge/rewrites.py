"""Deployment-time rewrites: the same function as the trained MetaFormer, with fewer and friendlier ops.

Applied to a copy of the model before quantization and export (``rewrite_for_deployment``); each
rewrite is exact up to float rounding and the tests check the rewritten model against the original
for every family.

Folds (every target):
- ``fold_norm_affine``: a LayerNorm's per-channel weight (and bias) multiplies the input columns of
  the linear or convolution that reads it: ``norm2 -> mlp.fc1``, ``norm1 -> pwconv1`` (ConvFormer) /
  ``qkv`` (attention), the downsampling ``pre_norm -> conv``, ``model.norm -> head`` and the MLP
  head's ``norm -> fc2``. ``norm1`` before an identity, pooling or random mixer feeds the residual
  branch directly and keeps its weight.
- ``fold_star_relu``: StarReLU ``s * relu(x)**2 + b`` followed by a linear becomes ``relu(x)**2``
  with ``s`` in the linear's weight and ``b * W.sum(1)`` in its bias; before the depthwise
  convolution of ``SepConv`` only ``s`` folds (zero padding makes ``b``'s contribution position
  dependent), leaving ``relu(x)**2 + b / s``.
- ``fold_attention_scale``: the ``head_dim ** -0.5`` scale moves into the query rows of ``qkv``.
- ``drop_unit_res_scale``: a ResScale that is exactly 1 is removed. Any other ResScale stays one
  multiply: it scales the residual stream, whose next reader is a LayerNorm, so no linear can take it.

Target-specific rewrites live in the target's folder and are listed by its ``Target.rewrites`` (the
ExecuTorch target's ``xnnpack_norms`` and ``split_depthwise``:
``converters/executorch/deployment_rewrites.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mf_edge.models.layers import (
    Attention,
    Downsampling,
    LayerNormGeneral,
    LayerNormWithoutBias,
    Mlp,
    MlpHead,
    Scale,
    SepConv,
    SquaredReLU,
    StarReLU,
)
from mf_edge.models.metaformer import MetaFormer, MetaFormerBlock


class AffineFreeLayerNorm(nn.Module):
    """What remains of a last-dim LayerNorm once its weight (and bias) moved into the next layer.

    ``xnnpack=True`` writes it with ops XNNPACK delegates (it has no LayerNorm): each mean over the
    channels is a batched matmul of the ``[1, tokens, C]`` view with a ``[1, C, 1]`` column of ``1 / C``
    (XNNPACK's GEMM), so the channels-last tensor is never transposed. A ``bmm`` rather than a
    ``linear`` (or a 2-D ``matmul``, which export turns into one) so that the int8 schemes, which
    quantize linears and convolutions, leave the statistics in float. Otherwise it is
    ``F.layer_norm`` (one LayerNormalization op in ONNX and Core ML).
    """

    def __init__(self, dim: int, eps: float, xnnpack: bool = False) -> None:
        super().__init__()
        self.dim, self.eps, self.xnnpack = dim, eps, xnnpack
        self.register_buffer("average", torch.full((1, dim, 1), 1.0 / dim), persistent=False)

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x.reshape(1, -1, self.dim), self.average).reshape(x.shape[:-1] + (1,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.xnnpack:
            return F.layer_norm(x, (self.dim,), eps=self.eps)
        centred = x - self._mean(x)
        return centred * torch.rsqrt(self._mean(centred * centred) + self.eps)


class AffineFreeGroupNorm(nn.Module):
    """The "modified LayerNorm" over ``(H, W, C)`` with its weight moved into the next layer.

    ``xnnpack=True`` averages a ``[B, 1, H*W, C]`` view over its two innermost dims (the only mean
    XNNPACK delegates).
    """

    def __init__(self, eps: float, normalized_dim: tuple[int, ...], xnnpack: bool = False) -> None:
        super().__init__()
        self.eps, self.normalized_dim, self.xnnpack = eps, tuple(normalized_dim), xnnpack

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.xnnpack and x.dim() == 4 and self.normalized_dim == (1, 2, 3):
            _, h, w, c = x.shape
            return x.reshape(-1, 1, h * w, c).mean((2, 3), keepdim=True)
        return x.mean(self.normalized_dim, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self._mean(x)
        return centred * torch.rsqrt(self._mean(centred * centred) + self.eps)


class ShiftedSquaredReLU(nn.Module):
    """``relu(x) ** 2 + bias``: StarReLU ``s * relu(x) ** 2 + b`` with ``s`` moved on, ``bias = b / s``."""

    def __init__(self, bias: float) -> None:
        super().__init__()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).pow(2) + self.bias


# ---------------------------------------------------------------- folding helpers


def _scale_inputs(layer: nn.Module, gain: torch.Tensor, shift: torch.Tensor | None = None) -> nn.Module:
    """``layer(gain * x + shift)`` as one layer of the same kind: ``gain`` scales the input channels.

    A shift is only exact for a linear (a padded convolution sees it only where it is not padding).
    """
    weight = layer.weight.detach().double()
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    new_weight = weight * gain.detach().double().reshape(shape)
    bias = layer.bias.detach().double() if layer.bias is not None else None
    if shift is not None and torch.any(shift != 0):
        per_input = weight if weight.dim() == 2 else weight.sum(tuple(range(2, weight.dim())))
        extra = per_input @ shift.detach().double()
        bias = extra if bias is None else bias + extra
    return _with_params(layer, new_weight, bias)


def _with_params(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A copy of ``layer`` with the given weight and bias (adding a bias parameter where it had none)."""
    dtype = layer.weight.dtype
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
    else:
        new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                        layer.padding, layer.dilation, layer.groups, bias=bias is not None)
    new.weight = nn.Parameter(weight.to(dtype), requires_grad=layer.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.to(dtype), requires_grad=layer.weight.requires_grad)
    return new.train(layer.training)


def _affine_free(norm: nn.Module) -> nn.Module:
    """The affine-free remainder of ``norm`` (same normalisation, no weight or bias)."""
    if isinstance(norm, LayerNormGeneral) and norm.normalized_dim != (-1,):
        return AffineFreeGroupNorm(norm.eps, norm.normalized_dim)
    return AffineFreeLayerNorm(norm.weight.numel(), norm.eps)


def _norm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` of a foldable LayerNorm; ``None`` if it has no affine part."""
    if isinstance(norm, (LayerNormGeneral, LayerNormWithoutBias)) and norm.weight is not None:
        return norm.weight, getattr(norm, "bias", None)
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        return norm.weight, norm.bias
    return None


def _fold_norm_into(owner: nn.Module, norm_attr: str, reader: nn.Module, reader_attr: str) -> int:
    """Fold ``owner.<norm_attr>``'s affine part into ``reader.<reader_attr>``; 1 if folded, else 0."""
    norm = getattr(owner, norm_attr)
    affine = _norm_affine(norm)
    if affine is None:
        return 0
    weight, bias = affine
    layer = getattr(reader, reader_attr)
    has_shift = bias is not None and bool(torch.any(bias != 0))
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or has_shift):
        return 0
    setattr(reader, reader_attr, _scale_inputs(getattr(reader, reader_attr), weight, bias))
    setattr(owner, norm_attr, _affine_free(norm))
    return 1


# ---------------------------------------------------------------- the rewrites


def fold_norm_affine(model: nn.Module) -> int:
    """Fold every LayerNorm weight/bias that a linear or convolution reads into it."""
    count = 0
    for block in _blocks(model):
        if isinstance(block.token_mixer, SepConv):
            count += _fold_norm_into(block, "norm1", block.token_mixer, "pwconv1")
        elif isinstance(block.token_mixer, Attention):
            count += _fold_norm_into(block, "norm1", block.token_mixer, "qkv")
        count += _fold_norm_into(block, "norm2", block.mlp, "fc1")
    for down in model.downsample_layers:
        if isinstance(down, Downsampling) and not isinstance(down.pre_norm, nn.Identity):
            count += _fold_norm_into(down, "pre_norm", down, "conv")
    if isinstance(model.head, MlpHead):
        count += _fold_norm_into(model, "norm", model.head, "fc1")
        count += _fold_norm_into(model.head, "norm", model.head, "fc2")
    else:
        count += _fold_norm_into(model, "norm", model, "head")
    return count


def fold_star_relu(model: nn.Module) -> int:
    """Fold StarReLU's scale (and, before a linear, its bias) into the next layer."""
    count = 0
    for block in _blocks(model):
        mlp = block.mlp
        if isinstance(mlp, Mlp) and isinstance(mlp.act, StarReLU):
            s, b = mlp.act.scale.detach().double(), mlp.act.bias.detach().double()
            weight = mlp.fc2.weight.detach().double()
            bias = b * weight.sum(1) + (mlp.fc2.bias.detach().double() if mlp.fc2.bias is not None else 0)
            mlp.fc2 = _with_params(mlp.fc2, weight * s, bias)
            mlp.act = SquaredReLU()
            count += 1
        mixer = block.token_mixer
        if isinstance(mixer, SepConv) and isinstance(mixer.act1, StarReLU) and float(mixer.act1.scale) != 0:
            s, b = float(mixer.act1.scale), float(mixer.act1.bias)
            mixer.dwconv = _with_params(mixer.dwconv, mixer.dwconv.weight.detach().double() * s,
                                        None if mixer.dwconv.bias is None else mixer.dwconv.bias.detach())
            mixer.act1 = SquaredReLU() if b == 0 else ShiftedSquaredReLU(b / s)
            count += 1
    return count


def fold_attention_scale(model: nn.Module) -> int:
    """Move attention's ``head_dim ** -0.5`` into the query rows of ``qkv``."""
    count = 0
    for block in _blocks(model):
        attn = block.token_mixer
        if isinstance(attn, Attention) and attn.scale != 1.0:
            weight = attn.qkv.weight.detach().double().clone()
            inner = weight.shape[0] // 3
            weight[:inner] *= attn.scale
            bias = attn.qkv.bias.detach().double().clone() if attn.qkv.bias is not None else None
            if bias is not None:
                bias[:inner] *= attn.scale
            attn.qkv = _with_params(attn.qkv, weight, bias)
            attn.scale = 1.0
            count += 1
    return count


def drop_unit_res_scale(model: nn.Module) -> int:
    """Replace every ResScale that is exactly 1 by ``nn.Identity``."""
    count = 0
    for block in _blocks(model):
        for attr in ("res_scale1", "res_scale2"):
            scale = getattr(block, attr)
            if isinstance(scale, Scale) and torch.all(scale.scale == 1):
                setattr(block, attr, nn.Identity())
                count += 1
    return count


def _blocks(model: nn.Module) -> list[MetaFormerBlock]:
    return [m for m in model.modules() if isinstance(m, MetaFormerBlock)]


Rewrite = Callable[[nn.Module], int]

FOLDS: dict[str, Rewrite] = {
    "fold_norm_affine": fold_norm_affine,
    "fold_star_relu": fold_star_relu,
    "fold_attention_scale": fold_attention_scale,
    "drop_unit_res_scale": drop_unit_res_scale,
}


def rewrite_for_deployment(model: nn.Module, rewrites: Iterable[Rewrite] = tuple(FOLDS.values())
                           ) -> nn.Module:
    """A copy of ``model`` with ``rewrites`` (a target's ``Target.rewrites``) applied; ``model`` is untouched.

    The copy computes the same function (float rounding aside) with ``rewrites`` applied in order,
    keeps ``mf_edge_info`` and ``mf_edge_weights``, and records in ``mf_edge_rewrites`` how many sites
    each rewrite changed (for the manifest). A model that is not a ``MetaFormer`` is returned as it
    is, with an empty record.
    """
    if not isinstance(model, MetaFormer):
        model.mf_edge_rewrites = {}  # type: ignore[attr-defined]
        return model
    rewritten = copy.deepcopy(model)
    applied = {}
    with torch.no_grad():
        for rewrite in rewrites:
            applied[rewrite.__name__] = rewrite(rewritten)
    rewritten.mf_edge_rewrites = applied  # type: ignore[attr-defined]
    return rewritten
