"""Calibration images: a deterministic, class-balanced sample, preprocessed once and cached.

A source is an ImageFolder tree (``root/<class>/<image>``), a flat folder of images, or a text file
listing image paths (one a line, relative to the text file's folder; ``#`` starts a comment). The
sample is ``calib_size`` images taken round-robin over the classes from per-class seeded shuffles,
so the same source always gives the same images. Files that are not images (by suffix) or that
cannot be decoded are skipped and counted in a note. A source with fewer usable images than
``calib_size`` is used whole, with a note saying so (calibration does not need an exact count; a
few dozen images already give stable ranges).

The preprocessed tensors are cached (``<cache>/calibration/<key>.safetensors``, key: the listing's
paths, sizes and mtimes, the preprocessing, ``calib_size`` and the seed), so a second target or a
second run does not decode the images again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mf_edge.console import note, track
from mf_edge.data import IMAGE_SUFFIXES, eval_transform, load_image
from mf_edge.errors import UserError
from mf_edge.paths import not_a_file
from mf_edge.spec import Preprocessing

DEFAULT_CALIB_SIZE = 256
CACHE_VERSION = 1


@dataclass
class CalibrationSet:
    """The preprocessed calibration images and where they came from."""

    images: torch.Tensor
    files: list[str]
    sha256: str
    source: str
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.files)

    def describe(self) -> dict:
        """Manifest facts: source, image count, sha256 of the file list (paths and contents)."""
        return {"source": self.source, "count": self.count, "sha256": self.sha256,
                "classes": len(self.classes) if self.classes else None}


@dataclass
class _Listing:
    root: Path
    candidates: dict[str | None, list[Path]]
    not_images: int


def cache_root() -> Path:
    """``$MF_EDGE_CACHE/calibration``, else ``$XDG_CACHE_HOME/mf-edge/calibration`` (``~/.cache``)."""
    base = os.environ.get("MF_EDGE_CACHE")
    if base:
        return Path(base) / "calibration"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mf-edge" / "calibration"


def _list_source(source: Path) -> _Listing:
    """Candidate images per class (``None``: unlabelled) and the count of non-image files."""
    if source.is_file():
        return _list_text_file(source)
    if not source.is_dir():
        problem = not_a_file(source) or "is not a folder"
        raise UserError(f"calibration source {source} {problem}; pass an image folder or a text file "
                        "of image paths to --calib-data.")
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {source}; pass a folder with images "
                        "(flat or one sub-folder per class) to --calib-data.")
    by_class: dict[str | None, list[Path]] = defaultdict(list)
    image_folder = all(p.parent != source for p in images)
    for path in images:
        by_class[path.relative_to(source).parts[0] if image_folder else None].append(path)
    return _Listing(source, dict(sorted(by_class.items())), len(files) - len(images))


def _list_text_file(source: Path) -> _Listing:
    try:
        lines = source.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the calibration list {source} ({exc}); pass a text file with one image "
                        "path per line.") from None
    paths, not_images = [], 0
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        path = Path(entry) if Path(entry).is_absolute() else source.parent / entry
        problem = not_a_file(path)
        if problem:
            raise UserError(f"{source}:{number}: {entry} {problem}; fix the path or remove the line.")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(path)
        else:
            not_images += 1
    if not paths:
        raise UserError(f"the calibration list {source} names no image files; list one image path per line.")
    return _Listing(source.parent, {None: paths}, not_images)


def _sample_order(listing: _Listing, seed: int) -> list[tuple[Path, str | None]]:
    """Every candidate in sampling order: round-robin over the classes of per-class seeded shuffles."""
    rng = random.Random(seed)
    queues = []
    for label, paths in listing.candidates.items():
        shuffled = list(paths)
        rng.shuffle(shuffled)
        queues.append([(path, label) for path in shuffled])
    order = []
    for rank in range(max(len(q) for q in queues)):
        order.extend(q[rank] for q in queues if rank < len(q))
    return order


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _cache_key(listing: _Listing, prep: Preprocessing, calib_size: int, seed: int) -> str:
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(prep), calib_size, seed]).encode())
    for paths in listing.candidates.values():
        for path in paths:
            stat = path.stat()
            digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _files_sha256(paths: list[Path], root: Path) -> str:
    """sha256 over the selected files' relative paths and contents, in sampling order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{_relative(path, root)}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def _read_cache(path: Path, source: str) -> CalibrationSet | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as cached:
            meta = cached.metadata()
            tensors = {key: cached.get_tensor(key) for key in cached.keys()}
        info = json.loads(meta["info"])
    except Exception:  # a corrupt or foreign cache entry is rebuilt, never trusted
        return None
    return CalibrationSet(tensors["images"], info["files"], info["sha256"], source, tensors.get("labels"),
                          info["classes"], info["notes"])


def _write_cache(path: Path, calib: CalibrationSet) -> None:
    from safetensors.torch import save_file

    tensors = {"images": calib.images.contiguous()}
    if calib.labels is not None:
        tensors["labels"] = calib.labels
    info = {"files": calib.files, "sha256": calib.sha256, "classes": calib.classes, "notes": calib.notes}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(partial), metadata={"info": json.dumps(info)})
    os.replace(partial, path)


def load_calibration_set(source: str | Path, prep: Preprocessing, calib_size: int = DEFAULT_CALIB_SIZE,
                         seed: int = 0, cache_dir: str | Path | None = None,
                         use_cache: bool = True) -> CalibrationSet:
    """``calib_size`` images of ``source`` preprocessed with ``prep`` (cached; see the module docstring)."""
    if calib_size < 1:
        raise UserError(f"--calib-size must be at least 1, got {calib_size}.")
    source = Path(source).expanduser()
    listing = _list_source(source)
    key = _cache_key(listing, prep, calib_size, seed)
    cache_file = Path(cache_dir or cache_root()) / f"{key}.safetensors"
    if use_cache and cache_file.is_file():
        cached = _read_cache(cache_file, str(source))
        if cached is not None:
            note(f"calibration images: {cached.count} from the cache ({cache_file.name[:12]})")
            for line in cached.notes:
                note(line)
            return cached
    calib = _load_sample(listing, str(source), prep, calib_size, seed)
    if use_cache:
        _write_cache(cache_file, calib)
    return calib


def _load_sample(listing: _Listing, source: str, prep: Preprocessing, calib_size: int,
                 seed: int) -> CalibrationSet:
    transform = eval_transform(prep)
    order = _sample_order(listing, seed)
    remaining = iter(order)
    tensors, chosen, labels, unreadable = [], [], [], 0
    for _ in track(range(min(calib_size, len(order))), "preprocessing calibration images"):
        for path, label in remaining:
            try:
                tensors.append(transform(load_image(path)))
            except UserError:
                unreadable += 1
                continue
            chosen.append(path)
            labels.append(label)
            break
        else:
            break
    if not chosen:
        raise UserError(f"none of the {len(order)} image files of {source} could be decoded; pass readable "
                        "JPEG/PNG images to --calib-data.")
    notes = []
    if listing.not_images or unreadable:
        notes.append(f"calibration: skipped {listing.not_images} non-image file(s) and {unreadable} "
                     f"unreadable image(s) in {source}")
    if len(chosen) < calib_size:
        notes.append(f"calibration: {source} has {len(chosen)} usable images, fewer than --calib-size "
                     f"{calib_size}; calibrating on all {len(chosen)}")
    for line in notes:
        note(line)
    classes, label_tensor = None, None
    if None not in listing.candidates:
        classes = list(listing.candidates)
        label_tensor = torch.tensor([classes.index(label) for label in labels], dtype=torch.int64)
    return CalibrationSet(torch.stack(tensors), [_relative(p, listing.root) for p in chosen],
                          _files_sha256(chosen, listing.root), source, label_tensor, classes, notes)
