"""``create_model``: registry name + weights -> eval-mode ``MetaFormer``; parameter and MAC counts."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mf_edge.console import note
from mf_edge.errors import UserError
from mf_edge.models.layers import MlpHead
from mf_edge.models.metaformer import MetaFormer
from mf_edge.models.stats import ModelStats
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
    token count (the official checkpoints fix it to 224). A checkpoint written by ``mf-edge train``
    gives the defaults of ``image_size`` (the size it was trained at) and of the class names
    (``mf_edge.checkpoint_facts``).

    The returned model carries ``mf_edge_info`` (its ``ModelInfo``), ``mf_edge_image_size`` (the size
    it was built for) and ``mf_edge_weights`` (``source``, ``path``, ``sha256``, ``layout``, ``seed``,
    and ``trained``, the training checkpoint's facts, with ``classes`` when the head is the trained one).
    """
    from mf_edge.checkpoint_facts import read_trained_facts, trained_defaults
    from mf_edge.weights import checkpoint_num_classes, load_checkpoint, load_into, sha256_file

    info = get_model_info(name)
    image_size, _ = trained_defaults(info.name, weights, image_size, None)
    size = check_image_size(info.image_size if image_size is None else image_size)
    options = {"image_size": size, "drop_path_rate": drop_path_rate, "head_dropout": head_dropout}
    record: dict = {"source": "random", "path": None, "sha256": None, "layout": None, "seed": seed}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if str(weights) == "random":
            model = MetaFormer(info.config, num_classes=num_classes or info.num_classes, **options)
        else:
            checkpoint = load_checkpoint(info, weights)
            head_classes = checkpoint_num_classes(checkpoint.state_dict) or info.num_classes
            with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
                model = MetaFormer(info.config, num_classes=head_classes, **options)
            load_into(model, checkpoint.state_dict, str(checkpoint.path))
            record.update(source="imagenet" if str(weights) == "imagenet" else "path",
                          path=str(checkpoint.path), sha256=sha256_file(checkpoint.path),
                          layout=checkpoint.layout, seed=None)
            if num_classes is not None and num_classes != head_classes:
                note(f"re-initialising the classifier for {num_classes} classes "
                     f"(the checkpoint has {head_classes})")
                model.reset_classifier(num_classes)
                record["seed"] = seed
            trained = read_trained_facts(weights)
            if trained is not None:
                record["trained"] = trained.to_dict()
                if model.num_classes != len(trained.classes):  # a new head: the names no longer apply
                    record["trained"].pop("classes")
    model.mf_edge_weights = record  # type: ignore[attr-defined]
    model.mf_edge_info = info  # type: ignore[attr-defined]
    model.mf_edge_image_size = size  # type: ignore[attr-defined]
    return model.eval()


def check_image_size(size: int, batch_size: int = 1) -> int:
    """``size`` when it is a positive multiple of 32 whose input batch fits in this machine's memory.

    Checked before anything is allocated: the float32 input alone (``batch * 3 * size**2 * 4`` bytes)
    must fit in the physical memory; the activations need several times more.
    """
    if size <= 0 or size % 32:
        raise UserError(f"image size {size} is not a positive multiple of 32 (MetaFormer downsamples by 32); "
                        "pass e.g. --image-size 224.")
    needed, memory = batch_size * 3 * size * size * 4, physical_memory()
    if memory is not None and needed > memory:
        raise UserError(f"image size {size} (batch {batch_size}) needs {needed / 2**30:.1f} GiB for the "
                        f"input alone, more than this machine's {memory / 2**30:.1f} GiB of memory (the "
                        "limit); pass a smaller --image-size, e.g. 224.")
    return size


def physical_memory() -> int | None:
    """Bytes of physical memory, or ``None`` where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (frozen ones, e.g. RandFormer's mixing matrices, included unless
    ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: torch.nn.Module, image_size: int = 224) -> int:
    """Multiply-accumulates of one forward pass at ``image_size``, from ``FlopCounterMode``.

    Like the official table (fvcore), this counts convolutions and matrix products; norms,
    activations and pooling are not counted. Works on ``meta``-device models too.
    """
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def _meta_build(arch: str, num_classes: int, image_size: int) -> MetaFormer:
    with torch.device("meta"):  # shapes only: no memory, no init
        return MetaFormer(get_model_info(arch).config, num_classes=num_classes, image_size=image_size)


@cache
def _arch_params(arch: str, image_size: int) -> tuple[int, int, int]:
    """Total and frozen parameters of ``arch`` with 1000 classes, and its classifier's input width."""
    model = _meta_build(arch, 1000, image_size)
    classifier = model.head.fc2 if isinstance(model.head, MlpHead) else model.head
    total = count_params(model)
    return total, total - count_params(model, trainable_only=True), classifier.in_features


def model_stats(name: str, macs: bool = False) -> ModelStats:
    """Parameter counts (and, with ``macs``, counted MACs) of ``name``, from a ``meta``-device build.

    Parameter counts are cached per architecture (another class count only changes the classifier's
    rows), so listing the zoo is quick.
    """
    info = get_model_info(name)
    sized_by_tokens = "random" in info.config.mixers  # RandFormer's frozen matrices depend on the size
    total, frozen, width = _arch_params(info.arch, info.image_size if sized_by_tokens else 224)
    total += (info.num_classes - 1000) * (width + 1)
    if not macs:
        return ModelStats(total, frozen, None)
    counted = count_macs(_meta_build(info.arch, info.num_classes, info.image_size), info.image_size)
    return ModelStats(total, frozen, counted)
