"""Training data: ImageFolder ``train/`` + ``val/`` (or a seeded split of one folder), transforms, loaders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets
from torchvision.transforms import v2

from mf_edge.data import eval_transform
from mf_edge.errors import UserError
from mf_edge.spec import Preprocessing

TRAIN_DIR = "train"
VAL_DIRS = ("val", "test")


@dataclass
class ImageData:
    """The two splits of a training run and their class names (shared by both)."""

    train: Dataset
    val: Dataset
    classes: list[str]
    source: str
    train_eval: Dataset  # the training images under the eval transform (calibration)

    def calibration_images(self, count: int, seed: int) -> torch.Tensor:
        """A seeded sample of ``count`` training images under the eval transform, as one batch."""
        order = torch.randperm(len(self.train_eval), generator=torch.Generator().manual_seed(seed))
        return torch.stack([self.train_eval[int(i)][0] for i in order[:count]])


def train_transform(prep: Preprocessing, min_crop_scale: float) -> Callable:
    """RandomResizedCrop + horizontal flip at ``prep.image_size``, then the model's normalisation."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(prep.image_size, scale=(min_crop_scale, 1.0), interpolation=_interpolation(prep),
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(prep.mean, prep.std),
    ])


def _interpolation(prep: Preprocessing) -> v2.InterpolationMode:
    return v2.InterpolationMode(prep.interpolation)


def _image_folder(root: Path, transform: Callable) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as exc:
        raise UserError(
            f"{root} is not an image folder ({str(exc).splitlines()[0]}); it needs one sub-folder of images "
            "per class, e.g. train/cat/1.jpg."
        ) from None


def _check_same_classes(train: datasets.ImageFolder, val: datasets.ImageFolder, val_dir: Path) -> None:
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    raise UserError(
        f"the classes of {val_dir} differ from those of train/ (only in train: {only_train or 'none'}; "
        f"only in {val_dir.name}: {only_val or 'none'}); give both splits the same class sub-folders."
    )


def load_image_data(
    root: Path, prep: Preprocessing, min_crop_scale: float, val_fraction: float, seed: int
) -> ImageData:
    """``root/train`` + ``root/val`` (or ``root/test``), else ``root`` itself split with ``val_fraction``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass --data DIR with train/ and val/ inside.")
    train_tf, val_tf = train_transform(prep, min_crop_scale), eval_transform(prep)
    if (root / TRAIN_DIR).is_dir():
        val_dir = next((root / name for name in VAL_DIRS if (root / name).is_dir()), None)
        train = _image_folder(root / TRAIN_DIR, train_tf)
        if val_dir is not None:
            val = _image_folder(val_dir, val_tf)
            _check_same_classes(train, val, val_dir)
            return ImageData(train, val, train.classes, f"{root}/{{train,{val_dir.name}}}",
                             _image_folder(root / TRAIN_DIR, val_tf))
        return _split(root / TRAIN_DIR, train_tf, val_tf, val_fraction, seed)
    return _split(root, train_tf, val_tf, val_fraction, seed)


def _split(root: Path, train_tf: Callable, val_tf: Callable, val_fraction: float, seed: int) -> ImageData:
    """One ImageFolder cut into a seeded train / val split (the same files, each with its transform)."""
    train_view, val_view = _image_folder(root, train_tf), _image_folder(root, val_tf)
    count = len(train_view)
    val_count = max(1, round(count * val_fraction))
    if count - val_count < 1:
        raise UserError(f"{root} has only {count} image(s); add images or provide train/ and val/ folders.")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    train, val = Subset(train_view, sorted(order[val_count:])), Subset(val_view, sorted(order[:val_count]))
    return ImageData(train, val, train_view.classes, f"{root} (seeded {val_fraction:.0%} validation split)",
                     Subset(val_view, train.indices))


class SeededAugmentation(Dataset):
    """``dataset`` whose random augmentation of image ``index`` in epoch ``epoch`` is drawn from a generator
    seeded with ``(seed, epoch, index)`` alone: an image gets the same crop and flip whichever process
    or loader worker reads it, so the run does not depend on the number of processes or workers."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from torch's CPU generator
            seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
            torch.manual_seed(int(seed))
            return self.dataset[index]


def train_loader(
    dataset: Dataset, batch_size: int, workers: int, rank: int, world_size: int, seed: int
) -> DataLoader:
    """A shuffling loader over this rank's shard; ``seed_epoch`` sets the epoch before each epoch.

    The global order is one seeded permutation per epoch, whatever the world size: ``DistributedSampler``
    deals it out round-robin, so step ``s`` of ``world_size`` processes with ``batch_size`` each reads
    exactly the images of step ``s`` of one process with ``world_size * batch_size``; with the seeded
    augmentation, the same images augmented the same way (DDP's gradient mean is then the one process's).
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    drop_last = len(sampler) >= batch_size
    return DataLoader(SeededAugmentation(dataset, seed), batch_size=batch_size, sampler=sampler,
                      num_workers=workers, drop_last=drop_last, generator=torch.Generator(),
                      pin_memory=torch.cuda.is_available())


def val_loader(dataset: Dataset, batch_size: int, workers: int, rank: int, world_size: int) -> DataLoader:
    """This rank's strided share of the validation set (no padding, so counts add up across ranks)."""
    shard = Subset(dataset, list(range(rank, len(dataset), world_size)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def seed_epoch(loader: DataLoader, seed: int, epoch: int, rank: int) -> None:
    """Make the epoch's shuffle and augmentation a function of ``(seed, epoch)``, and the worker seeds one
    of ``(seed, epoch, rank)``."""
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    loader.generator.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
