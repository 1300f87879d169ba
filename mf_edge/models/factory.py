"""``create_model``: registry name + weights -> eval-mode ``MetaFormer``; parameter and MAC counts."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mf_edge.console import note
from mf_edge.models.metaformer import MetaFormer
from mf_edge.models.zoo import get_model_info

DEFAULT_SEED = 0


def create_model(
    name: str,
    weights: str | Path = "random",
    num_classes: int | None = None,
    image_size: int | None = None,
    seed: int = DEFAULT_SEED,
    drop_path_rate: float = 0.0,
    head_dropout: float = 0.0,
) -> MetaFormer:
    """Build the registered model ``name`` in eval mode.

    ``weights`` is ``"random"`` (seeded by ``seed``, reproducible), ``"imagenet"`` (the official
    checkpoint from the Hugging Face Hub, cached) or a path to an official- or timm-layout
    checkpoint. ``num_classes`` different from the checkpoint's re-initialises the classifier.
    ``image_size`` only matters for RandFormer, whose frozen mixing matrices are sized by the
    token count (the official checkpoints fix it to 224).
    """
    from mf_edge.weights import checkpoint_num_classes, load_checkpoint, load_into, sha256_file

    info = get_model_info(name)
    size = image_size or info.image_size
    state_dict, source = None, None
    if str(weights) != "random":
        state_dict, source = load_checkpoint(info, weights)
    head_classes = (checkpoint_num_classes(state_dict) if state_dict else None) or info.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MetaFormer(
            info.config,
            num_classes=head_classes,
            image_size=size,
            drop_path_rate=drop_path_rate,
            head_dropout=head_dropout,
        )
        if state_dict is not None:
            load_into(model, state_dict, str(source))
        if num_classes is not None and num_classes != model.num_classes:
            if state_dict is not None:
                note(f"re-initialising the classifier for {num_classes} classes "
                     f"(the checkpoint has {model.num_classes})")
            model.reset_classifier(num_classes)
    model.mf_edge_weights = {  # type: ignore[attr-defined]
        "source": "random" if source is None else ("imagenet" if str(weights) == "imagenet" else "path"),
        "path": None if source is None else str(source),
        "sha256": None if source is None else sha256_file(source),
        "seed": seed if source is None else None,
    }
    model.mf_edge_info = info  # type: ignore[attr-defined]
    return model.eval()


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (frozen ones included unless ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: torch.nn.Module, image_size: int = 224) -> int:
    """Multiply-accumulates of one forward pass at ``image_size``, from ``FlopCounterMode``."""
    x = torch.zeros(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2
