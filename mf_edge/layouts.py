"""Checkpoint layouts: the official sail-sg/metaformer names and timm's ``metaformer.py`` names.

The official layout (``downsample_layers.N``, ``stages.N.M``, ``norm``, ``head``) is this package's
contract. timm 1.0's ``MetaFormer`` renames the same tensors (``stem``, ``stages.N.downsample``,
``stages.N.blocks.M``, ``head.norm``, ``head.fc``) and runs its convolutional stages channels-first,
so the channel MLP and the SepConv pointwise layers are 1x1 convolutions there (``[out, in, 1, 1]``)
where the official code has linear layers (``[out, in]``). Everything else keeps its shape: timm's
``Scale`` stores ``[C]`` and views it as ``[C, 1, 1]``; its ``GroupNorm1``/``LayerNorm2d`` norms store
``[C]`` weights like the official ``LayerNormGeneral``.

timm has no RandFormer: its frozen ``random_matrix`` takes the name timm's scheme gives any token
mixer parameter (``stages.N.blocks.M.token_mixer.random_matrix``).
"""

from __future__ import annotations

import re

import torch

from mf_edge.errors import UserError

StateDict = dict[str, torch.Tensor]

# Parameters of one block, relative to the block (identical in both layouts).
_BLOCK_PARAMS = "|".join((
    r"norm[12]\.weight",
    r"res_scale[12]\.scale",
    r"layer_scale[12]\.scale",
    r"mlp\.fc[12]\.weight",
    r"mlp\.act\.(?:scale|bias)",
    r"token_mixer\.(?:pwconv1|pwconv2|dwconv|qkv|proj)\.weight",
    r"token_mixer\.act1\.(?:scale|bias)",
    r"token_mixer\.random_matrix",
))
_FIELDS = {
    "d": r"[1-9]\d*",  # index of a stage with a downsampling layer in front (stage 0 has the stem)
    "s": r"\d+",
    "b": r"\d+",
    "p": r"weight|bias",
    "h": r"fc1|fc2|norm",
    "param": _BLOCK_PARAMS,
}
# (timm name, official name); ``{field}`` stands for the pattern of ``_FIELDS[field]``.
_RULES = (
    ("stem.conv.{p}", "downsample_layers.0.conv.{p}"),
    ("stem.norm.weight", "downsample_layers.0.post_norm.weight"),
    ("stages.{d}.downsample.conv.{p}", "downsample_layers.{d}.conv.{p}"),
    ("stages.{d}.downsample.norm.weight", "downsample_layers.{d}.pre_norm.weight"),
    ("stages.{s}.blocks.{b}.{param}", "stages.{s}.{b}.{param}"),
    ("head.norm.{p}", "norm.{p}"),
    ("head.fc.{h}.{p}", "head.{h}.{p}"),
    ("head.fc.{p}", "head.{p}"),
)
# Layers that are linear in the official code and 1x1 convolutions in timm's channels-first stages.
_POINTWISE = re.compile(r"^stages\.(\d+)\.\d+\.(?:mlp\.fc[12]|token_mixer\.pwconv[12])\.weight$")
_ALWAYS_CONV = re.compile(r"token_mixer\.pwconv[12]\.weight$")


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})" for i, part in enumerate(parts)
    )
    return re.compile(f"^{regex}$")


_TIMM_TO_OFFICIAL = tuple((_compile(timm), official) for timm, official in _RULES)
_OFFICIAL_TO_TIMM = tuple((_compile(official), timm) for timm, official in _RULES)


def _rename(state_dict: StateDict, rules: tuple[tuple[re.Pattern[str], str], ...], source: str) -> StateDict:
    renamed: StateDict = {}
    unknown = []
    for key, value in state_dict.items():
        for pattern, template in rules:
            match = pattern.match(key)
            if match:
                renamed[template.format(**match.groupdict())] = value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise UserError(
            f"{len(unknown)} key(s) of this {source}-layout checkpoint belong to no MetaFormer baseline: "
            f"{shown}. Pass a MetaFormer checkpoint (official sail-sg/metaformer or timm metaformer)."
        )
    return renamed


def detect_layout(state_dict: StateDict) -> str:
    """``"timm"`` if the keys follow timm's naming (``stem.*``, ``stages.N.blocks.*``), else ``"official"``.

    Anything that is not timm's is treated as official, so that loading names its foreign keys.
    """
    timm_key = re.compile(r"^(stem\.|stages\.\d+\.(blocks|downsample)\.|head\.fc\.)")
    return "timm" if any(timm_key.match(k) for k in state_dict) else "official"


def timm_to_official(state_dict: StateDict) -> StateDict:
    """Translate a timm-layout MetaFormer state dict to the official names and shapes.

    Raises ``UserError`` naming the keys that no MetaFormer baseline has.
    """
    renamed = _rename(state_dict, _TIMM_TO_OFFICIAL, "timm")
    for key, value in renamed.items():
        if _POINTWISE.match(key) and value.dim() == 4 and value.shape[2:] == (1, 1):
            renamed[key] = value.reshape(value.shape[:2])
    return renamed


def official_to_timm(state_dict: StateDict) -> StateDict:
    """Translate an official-layout state dict to timm's names and shapes.

    A stage is channels-first in timm unless its token mixer is attention (it has ``qkv`` weights);
    there the MLP stays linear, everywhere else it becomes 1x1 convolutions like SepConv's.
    """
    attention_stages = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"^stages\.(\d+)\.\d+\.token_mixer\.qkv\.", k))
    }
    reshaped: StateDict = {}
    for key, value in state_dict.items():
        match = _POINTWISE.match(key)
        channels_first = match and (_ALWAYS_CONV.search(key) or int(match.group(1)) not in attention_stages)
        reshaped[key] = value.reshape(*value.shape, 1, 1) if channels_first and value.dim() == 2 else value
    return _rename(reshaped, _OFFICIAL_TO_TIMM, "official")
