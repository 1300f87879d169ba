"""Class names: ImageNet-1k names from torchvision's weight metadata (offline); other heads print indices."""

from __future__ import annotations

from functools import cache

IMAGENET_1K = "imagenet-1k"


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order (shipped with torchvision, no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def labels_for(num_classes: int) -> tuple[str, ...] | None:
    """Class names of a ``num_classes`` head: ImageNet-1k for 1000 classes, else ``None`` (indices)."""
    return imagenet_labels() if num_classes == 1000 else None


def label_name(index: int, labels: tuple[str, ...] | list[str] | None) -> str:
    """``"name"`` when names are known, else ``"class <index>"`` (ImageNet-21k and custom heads)."""
    return labels[index] if labels is not None and 0 <= index < len(labels) else f"class {index}"
