"""One-block-per-stage variants of the zoo's families, registered for the default test run.

``convformer_d1`` is ConvFormer-S18 with depths (1, 1, 1, 1): the same mixers, norms, downsamplings,
head and preprocessing, so every op pattern a target lowers is there, in a graph a third the size
(ExecuTorch int8 lowering 25 s instead of about 58 s). The S18/S12 sizes run in ``-m slow``.
Registered by ``conftest.py`` in every test process; a spawned process calls ``register`` itself.
"""

from __future__ import annotations

import dataclasses

from mf_edge.models import get_model_info, list_models, register_model
from mf_edge.models.zoo import REGISTRY

ONE_BLOCK = {  # variant -> the zoo model it shrinks
    "identityformer_d1": "identityformer_s12",
    "randformer_d1": "randformer_s12",
    "poolformerv2_d1": "poolformerv2_s12",
    "convformer_d1": "convformer_s18",
    "caformer_d1": "caformer_s18",
}


def one_block(name: str, base: str):
    """``base`` with one block per stage, under ``name``; no published weights or ImageNet numbers."""
    info = get_model_info(base)
    config = dataclasses.replace(info.config, depths=(1, 1, 1, 1))
    return dataclasses.replace(info, name=name, config=config, top1=None, macs_g=None, hub_file="",
                               timm_hub_id=None)


def register() -> None:
    """Register every variant in this process (idempotent)."""
    for name, base in ONE_BLOCK.items():
        if name not in REGISTRY:
            register_model(one_block(name, base))


def init_spawned_process() -> None:
    """A spawned conversion process's initializer: the variants registered, the console quiet."""
    from mf_edge.console import set_quiet

    register()
    set_quiet(True)


def zoo_models(pattern: str | None = None) -> list[str]:
    """``list_models(pattern)`` without the variants: the official checkpoints only."""
    return [name for name in list_models(pattern) if name not in ONE_BLOCK]
