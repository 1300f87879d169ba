"""``MetaFormerConfig``: the architecture of one MetaFormer baseline, in plain data (no PyTorch)."""

from __future__ import annotations

from dataclasses import dataclass, field

MIXERS = ("identity", "random", "pooling", "sepconv", "attention")


@dataclass(frozen=True)
class MetaFormerConfig:
    """Architecture of one MetaFormer baseline.

    ``mixers`` names the token mixer of each stage (one of ``MIXERS``); ``group_norm`` selects the
    "modified LayerNorm" over ``(H, W, C)`` (IdentityFormer, RandFormer, PoolFormerV2) instead of a
    LayerNorm over ``C``; ``mlp_head`` selects ``MlpHead`` instead of a single Linear.
    """

    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    mixers: tuple[str, str, str, str]
    group_norm: bool = False
    mlp_head: bool = False
    res_scale: tuple[float | None, ...] = field(default=(None, None, 1.0, 1.0))
