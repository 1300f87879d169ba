"""Checkpoint layouts: the official sail-sg/metaformer names and timm's ``metaformer.py`` names."""

from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]


def detect_layout(state_dict: StateDict) -> str:
    """``"timm"`` if the keys follow timm's naming (``stem.*``, ``stages.N.blocks.*``), else ``"official"``."""
    if any(k.startswith("stem.") for k in state_dict) or any(".blocks." in k for k in state_dict):
        return "timm"
    return "official"


def timm_to_official(state_dict: StateDict) -> StateDict:
    """Translate a timm-layout MetaFormer state dict to the official names and shapes."""
    raise NotImplementedError("timm layout mapping: in progress")


def official_to_timm(state_dict: StateDict) -> StateDict:
    """Translate an official-layout state dict to timm's names and shapes."""
    raise NotImplementedError("timm layout mapping: in progress")
