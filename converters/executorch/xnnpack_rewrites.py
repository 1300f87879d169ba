"""Export-time rewrites that let XNNPACK take the whole MetaFormer graph.

XNNPACK's partitioner leaves some ops of the reference model outside its delegates (see
``executorch/backends/xnnpack/partition/config``):

- ``native_layer_norm`` has no XNNPACK config at all (every LayerNorm of ConvFormer/CAFormer, the
  final norm and the head norm);
- ``mean.dim`` is only taken over dims ``(2, 3)`` of a 4D tensor with ``keepdim=True`` (the
  "modified LayerNorm" over ``(H, W, C)`` and the final ``mean((1, 2))`` pooling are not);
- ``expand_copy`` and ``squeeze_copy`` have no config (``matmul`` broadcasting in RandFormer's
  mixing and CAFormer's attention, ``unbind`` of the stacked q/k/v);
- a ``view_copy`` with a symbolic size is refused (dynamic batch).

``rewrite_for_xnnpack`` returns a copy of the model computing the same function from the same
parameters with only delegable ops; parity against the original float model covers it. For a
dynamic batch, ``infer_symbolic_view_dims`` is an edge-graph pass that writes the one symbolic size of
a reshape as ``-1`` (XNNPACK's static reshape infers one dimension).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from mf_edge.converters.executorch.xnnpack_layout import channels_first_stages
from mf_edge.models.layers import Attention, LayerNormGeneral, LayerNormWithoutBias, RandomMixing


def mean_trailing(x: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Mean over the last ``num_dims`` dims (keepdim) as a global average pool over a 4D view."""
    reduced = math.prod(x.shape[-num_dims:])
    rows = math.prod(x.shape[1:-num_dims]) if x.dim() > num_dims + 1 else 1
    pooled = x.reshape(-1, rows, reduced, 1).mean((2, 3), keepdim=True)
    keepdim_shape = (*x.shape[:-num_dims], *([1] * num_dims))
    # always reshape: the pooled output carries XNNPACK's channels-last tag, and a dynamically quantized
    # linear reading it directly gets a transpose of int8 data that XNNPACK refuses (w8 fails to load)
    return pooled.reshape((-1, *keepdim_shape[1:]))


class DecomposedLayerNorm(nn.Module):
    """LayerNorm over the last ``num_dims`` dims from sub/mul/rsqrt and means over a 4D view.

    Each mean is XNNPACK's global average pool over the two innermost dims of a 4D view (no linear:
    int8 schemes quantize linears, and the statistics stay float; no matmul: fp16 decomposes it
    into ``expand`` + ``bmm``). ``weight`` and ``bias`` (either may be ``None``) are shared with the
    module it replaces and broadcast over the last dim, as in the reference modules. ``eps`` is a
    buffer, so it follows the model's dtype (a Python float becomes an fp32 constant and a cast).
    """

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, eps: float,
                 num_dims: int) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.num_dims = num_dims
        self.register_buffer("eps", torch.tensor(eps), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - mean_trailing(x, self.num_dims)
        x = centred * torch.rsqrt(mean_trailing(centred * centred, self.num_dims) + self.eps)
        if self.weight is not None:
            x = x * self.weight
        return x + self.bias if self.bias is not None else x


class LinearRandomMixing(nn.Module):
    """RandFormer's mixing ``M @ x`` written as ``linear(x^T, M)^T``: no broadcast ``expand``."""

    def __init__(self, source: RandomMixing) -> None:
        super().__init__()
        self.random_matrix = source.random_matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, c = x.shape
        tokens = x.reshape(-1, h * w, c).transpose(1, 2)
        mixed = F.linear(tokens, self.random_matrix).transpose(1, 2)
        return mixed.reshape(-1, h, w, c)


class BmmAttention(nn.Module):
    """CAFormer's attention with separate q/k/v projections (rows of the qkv weight) and 3D ``bmm``s."""

    def __init__(self, source: Attention) -> None:
        super().__init__()
        self.num_heads, self.head_dim = source.num_heads, source.head_dim
        self.register_buffer("scale", torch.tensor(source.scale), persistent=False)
        inner = self.num_heads * self.head_dim
        for i, name in enumerate(("q", "k", "v")):
            linear = nn.Linear(source.qkv.in_features, inner, bias=False)
            linear.weight = nn.Parameter(source.qkv.weight.detach()[i * inner:(i + 1) * inner].clone())
            setattr(self, name, linear)
        self.proj = source.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        n, heads, head_dim = h * w, self.num_heads, self.head_dim
        q = self.q(x).reshape(-1, n, heads, head_dim).permute(0, 2, 1, 3).reshape(-1, n, head_dim)
        k = self.k(x).reshape(-1, n, heads, head_dim).permute(0, 2, 3, 1).reshape(-1, head_dim, n)
        v = self.v(x).reshape(-1, n, heads, head_dim).permute(0, 2, 1, 3).reshape(-1, n, head_dim)
        attn = torch.softmax(torch.bmm(q, k) * self.scale, dim=-1)
        out = torch.bmm(attn, v).reshape(-1, heads, n, head_dim).permute(0, 2, 1, 3)
        return self.proj(out.reshape(-1, h, w, heads * head_dim))


class GlobalPoolMetaFormer(nn.Module):
    """The MetaFormer forward with the final token mean as a channels-first global average pool.

    Holds the source model's submodules under the same names, so parameter names are unchanged.
    ``channels_first_stages`` leading stages run channels-first (``xnnpack_layout``).
    """

    def __init__(self, source: nn.Module, channels_first_stages: int = 0) -> None:
        super().__init__()
        self.downsample_layers, self.stages = source.downsample_layers, source.stages
        self.channels_first_out = channels_first_stages == len(source.stages)
        self.norm, self.head = source.norm, source.head
        for attr in ("mf_edge_info", "mf_edge_weights", "mf_edge_rewrites", "num_classes"):
            if hasattr(source, attr):
                setattr(self, attr, getattr(source, attr))
        if channels_first_stages:
            self.mf_edge_rewrites = {**getattr(source, "mf_edge_rewrites", {}),
                                     "channels_first_stages": channels_first_stages}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
        channels_first = x if self.channels_first_out else x.permute(0, 3, 1, 2)
        pooled = channels_first.mean((2, 3), keepdim=True).flatten(1)
        return self.head(self.norm(pooled))


def _replacement(module: nn.Module) -> nn.Module | None:
    if isinstance(module, LayerNormGeneral):
        dims = sorted(d % 4 for d in module.normalized_dim)
        trailing = dims == list(range(4 - len(dims), 4))
        return DecomposedLayerNorm(module.weight, module.bias, module.eps, len(dims)) if trailing else None
    if isinstance(module, LayerNormWithoutBias):
        return DecomposedLayerNorm(module.weight, None, module.eps, 1)
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return DecomposedLayerNorm(module.weight, module.bias, module.eps, 1)
    if isinstance(module, RandomMixing):
        return LinearRandomMixing(module)
    if isinstance(module, Attention):
        return BmmAttention(module)
    return None


def rewrite_for_xnnpack(model: nn.Module, channels_first: bool = True) -> nn.Module:
    """A copy of ``model`` whose every op XNNPACK delegates; ``model`` itself is left untouched.

    ``channels_first`` also rewrites a MetaFormer's leading ``SepConv`` stages channels-first
    (``xnnpack_layout.channels_first_stages``), so XNNPACK runs them without layout changes.
    """
    rewritten = copy.deepcopy(model)
    is_metaformer = hasattr(rewritten, "forward_features") and hasattr(rewritten, "downsample_layers")
    stages = channels_first_stages(rewritten) if channels_first and is_metaformer else 0
    for name, module in list(rewritten.named_modules()):
        replacement = _replacement(module)
        if replacement is not None and name:
            parent_name, _, child = name.rpartition(".")
            setattr(rewritten.get_submodule(parent_name), child, replacement)
    if is_metaformer:
        rewritten = GlobalPoolMetaFormer(rewritten, stages)
    return rewritten.eval()


def infer_symbolic_view_dims(graph_module: GraphModule) -> PassResult:
    """Edge pass: a ``view_copy`` whose size has exactly one symbolic entry gets ``-1`` there instead.

    Exact: the other sizes are static, so ``-1`` infers the same value; the symbolic arithmetic that
    computed it becomes dead and is removed. XNNPACK then takes the reshape (it refuses symbolic sizes).
    """
    changed = False
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or "view_copy" not in str(node.target) or len(node.args) < 2:
            continue
        shape = list(node.args[1])
        symbolic = [i for i, size in enumerate(shape) if not isinstance(size, int)]
        if len(symbolic) == 1 and -1 not in shape:
            shape[symbolic[0]] = -1
            node.args = (node.args[0], shape, *node.args[2:])
            changed = True
    if changed:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
    return PassResult(graph_module, changed)
