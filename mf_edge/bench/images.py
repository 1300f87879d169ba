"""The images fidelity is measured on: a class-balanced sample of a folder, or the parity defaults."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np

from mf_edge.data import find_images, load_image, parity_inputs, preprocess
from mf_edge.spec import ExportSpec


@dataclass
class BenchImages:
    """A normalised ``[N, 3, H, W]`` batch, image names, and class indices when the folder has classes.

    ``labels`` follow torchvision's ImageFolder convention (sorted class folder names -> 0..K-1).
    """

    batch: np.ndarray
    names: list[str]
    source: str
    labels: np.ndarray | None = None
    classes: list[str] | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.batch).tobytes()).hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "count": len(self.names), "sha256": self.sha256,
                "labelled": self.labels is not None, "classes": len(self.classes) if self.classes else None}


def balanced(found: list[tuple[Path, str | None]], count: int) -> list[tuple[Path, str | None]]:
    """Up to ``count`` images taking one per class in turn (sorted order within a class)."""
    by_class: dict[str | None, list[tuple[Path, str | None]]] = {}
    for item in found:
        by_class.setdefault(item[1], []).append(item)
    interleaved = [item for row in zip_longest(*by_class.values()) for item in row if item is not None]
    return interleaved[:count]


def bench_images(spec: ExportSpec, images_dir: str | Path | None, count: int) -> BenchImages:
    """``count`` images of ``images_dir`` balanced over its class folders, preprocessed for ``spec``.

    Without a folder: the parity check's default images (scikit-learn's photos + seeded noise).
    """
    if images_dir is None:
        inputs = parity_inputs(spec)
        return BenchImages(inputs.batch[:count], inputs.names[:count], inputs.source)
    found = find_images(images_dir)
    classes = sorted({label for _, label in found if label is not None})
    chosen = balanced(found, count)
    batch = preprocess([load_image(path) for path, _ in chosen], spec.preprocessing)
    labels = None
    if classes and all(label is not None for _, label in chosen):
        index = {name: i for i, name in enumerate(classes)}
        labels = np.asarray([index[label] for _, label in chosen], dtype=np.int64)
    return BenchImages(batch, [str(path) for path, _ in chosen], str(images_dir), labels,
                       classes if labels is not None else None)
