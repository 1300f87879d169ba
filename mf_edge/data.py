"""Images in, normalised batches out: the eval transform of a model and the inputs parity runs on.

The eval transform is the one the official checkpoints were evaluated with: shorter-side resize to
``image_size / crop_pct`` (the model's interpolation), centre crop to ``image_size``, scale to
``[0, 1]``, normalise by mean/std. Resize and crop act on PIL images, so a program with only PIL and
numpy (``apps/classify``) reproduces it exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from mf_edge.errors import UserError
from mf_edge.paths import not_a_file
from mf_edge.spec import ExportSpec, Preprocessing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
DEFAULT_NOISE_IMAGES = 6
MAX_PARITY_IMAGES = 64


def eval_transform(prep: Preprocessing) -> v2.Compose:
    """PIL image -> normalised float32 ``[3, H, W]`` tensor, as the model was evaluated."""
    return v2.Compose([
        v2.Resize(prep.resize_size, interpolation=InterpolationMode(prep.interpolation)),
        v2.CenterCrop(prep.image_size),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(prep.mean), list(prep.std)),
    ])


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image; an unreadable file raises ``UserError``.

    16-bit images (``I;16`` PNG/TIFF) are scaled to 8 bits, not clipped to white. An image over
    Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``, a decompression-bomb guard) is refused before
    it is decoded.
    """
    path = Path(path)
    problem = not_a_file(path)
    if problem:
        raise UserError(f"image {path} {problem}; pass an existing image file.")
    try:
        with Image.open(path) as image:
            return to_rgb8(image)
    except Image.DecompressionBombError as exc:
        raise UserError(f"image {path} is refused as a possible decompression bomb ({exc}); pass a "
                        "smaller image.") from None
    except Exception as exc:  # a damaged file can fail in any way (OSError, ValueError, SyntaxError...)
        raise UserError(f"cannot read image {path} ({type(exc).__name__}: {str(exc)[:120]}); pass a JPEG or "
                        "PNG file.") from None


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit grey levels (``I;16*``, and ``I`` from a PNG, whose only 32-bit
    integer mode comes from 16-bit data in older Pillows) are scaled by 255/65535, where
    ``convert("RGB")`` would clip everything above 255 to white."""
    if image.mode in SIXTEEN_BIT or (image.mode == "I" and image.format == "PNG"):
        levels = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(levels * (255 / 65535)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def find_images(root: str | Path) -> list[tuple[Path, str | None]]:
    """Image files under ``root`` with their label: the class folder name (ImageFolder) or ``None``."""
    root = Path(root)
    if not root.is_dir():
        problem = not_a_file(root) or "is a file, not a folder"
        raise UserError(f"image folder {root} {problem}; pass a folder of images to --images.")
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            label = path.parent.name if path.parent != root else None
            found.append((path, label))
    if not found:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}; pass a folder with images.")
    return found


def sample_images() -> list[tuple[str, Image.Image]]:
    """The photographs that ship with scikit-learn (``load_sample_images``), no download needed."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return [(f"sklearn:{Path(name).name}", Image.fromarray(array))
            for name, array in zip(bunch.filenames, bunch.images, strict=True)]


def noise_images(count: int, size: int, seed: int = 0) -> list[tuple[str, Image.Image]]:
    """``count`` seeded uniform-noise RGB images of ``size`` x ``size`` uint8 pixels."""
    rng = np.random.default_rng(seed)
    return [(f"noise:{seed}:{i}", Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
            for i in range(count)]


def preprocess(images: list[Image.Image], prep: Preprocessing) -> np.ndarray:
    """A normalised float32 ``[N, 3, H, W]`` batch from PIL images."""
    transform = eval_transform(prep)
    return torch.stack([transform(image) for image in images]).numpy()


@dataclass
class ParityInputs:
    """The images parity runs on: the batch, a name per image and labels when the images carry them."""

    batch: np.ndarray
    names: list[str]
    labels: list[str] | None
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.batch).tobytes()).hexdigest()

    def describe(self) -> dict:
        return {"count": len(self.names), "source": self.source, "names": self.names, "sha256": self.sha256}


def parity_inputs(spec: ExportSpec, images_dir: str | Path | None = None, noise: int = DEFAULT_NOISE_IMAGES,
                  seed: int = 0, limit: int = MAX_PARITY_IMAGES) -> ParityInputs:
    """The batch parity compares on.

    With ``images_dir``: its images (at most ``limit``, labelled by class folder where there is
    one). Without: scikit-learn's sample photographs plus ``noise`` seeded noise images.
    """
    prep = spec.preprocessing
    if images_dir is not None:
        found = find_images(images_dir)[:limit]
        batch = preprocess([load_image(path) for path, _ in found], prep)
        labels = [label for _, label in found]
        return ParityInputs(batch, [str(path) for path, _ in found],
                            labels if all(label is not None for label in labels) else None, str(images_dir))
    named = sample_images() + noise_images(noise, prep.resize_size, seed)
    return ParityInputs(preprocess([image for _, image in named], prep), [name for name, _ in named], None,
                        f"scikit-learn sample images + {noise} seeded noise images (seed {seed})")
