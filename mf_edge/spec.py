"""``ExportSpec``: what the user asked for, carried from the CLI to the target and into the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from mf_edge.errors import UserError
from mf_edge.models.factory import check_image_size
from mf_edge.models.zoo import ModelInfo

PRECISIONS = ("fp32", "fp16", "int8", "w8")


@dataclass(frozen=True)
class Preprocessing:
    """The eval transform an input image goes through before the network."""

    image_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def resize_size(self) -> int:
        """Shorter-side resize before the centre crop (``image_size / crop_pct``)."""
        return int(round(self.image_size / self.crop_pct))


@dataclass(frozen=True)
class ExportSpec:
    """One export request: model, input shape, precision and preprocessing."""

    model: str
    image_size: int
    num_classes: int
    preprocessing: Preprocessing
    batch_size: int = 1
    dynamic_batch: bool = False
    precision: str = "fp32"
    options: dict = field(default_factory=dict)

    @classmethod
    def for_model(
        cls,
        info: ModelInfo,
        image_size: int | None = None,
        batch_size: int = 1,
        dynamic_batch: bool = False,
        precision: str = "fp32",
        num_classes: int | None = None,
        **options,
    ) -> ExportSpec:
        if batch_size <= 0:
            raise UserError(f"batch size must be at least 1, got {batch_size}.")
        size = check_image_size(info.image_size if image_size is None else image_size, batch_size)
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
        prep = Preprocessing(size, info.crop_pct, info.interpolation, info.mean, info.std)
        return cls(info.name, size, num_classes or info.num_classes, prep, batch_size, dynamic_batch,
                   precision, dict(options))

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 3, self.image_size, self.image_size)

    def example_input(self, seed: int = 0) -> torch.Tensor:
        """A seeded, normalised-range example batch of ``input_shape``."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(self.input_shape, generator=generator)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input"] = {"name": "image", "shape": list(self.input_shape), "dtype": "float32",
                         "layout": "NCHW", "dynamic_batch": self.dynamic_batch,
                         "normalised": "(pixel / 255 - mean) / std"}
        return data
