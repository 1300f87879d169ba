"""The calibration-image cache: what must miss it (a changed or touched image, another --calib-size or
preprocessing), what must be rebuilt (a garbage entry), and that tests never write the user's cache."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mf_edge.calibration import data as calib_data
from mf_edge.calibration.data import load_calibration_set
from mf_edge.spec import Preprocessing

PREP = Preprocessing(32, 1.0, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
COUNT = 6


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An ImageFolder of 6 random 40x40 PNGs in two classes."""
    rng = np.random.default_rng(0)
    for i in range(COUNT):
        path = tmp_path / "images" / "ab"[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return tmp_path / "images"


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.safetensors"))


def test_changed_image_misses_the_cache(folder: Path, tmp_path: Path) -> None:
    """An image rewritten with other pixels gives the new pixels, not the cached ones, and a new
    entry. Catches a key that ignores the files (planted: the per-file loop of ``_cache_key``
    removed: the stale images come back)."""
    cache = tmp_path / "cache"
    first = load_calibration_set(folder, PREP, COUNT, cache_dir=cache)
    changed = folder / "a" / "0.png"
    Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8)).save(changed)
    second = load_calibration_set(folder, PREP, COUNT, cache_dir=cache)
    fresh = load_calibration_set(folder, PREP, COUNT, use_cache=False)
    assert torch.equal(second.images, fresh.images) and second.sha256 == fresh.sha256
    assert not torch.equal(second.images, first.images) and second.sha256 != first.sha256
    assert len(entries(cache)) == 2


def test_touched_image_misses_the_cache(folder: Path, tmp_path: Path) -> None:
    """Only the modification time changes (an image replaced by one of the same size): a new key.
    Catches a key built from names and sizes only (planted: ``st_mtime_ns`` dropped from
    ``_cache_key``: one entry)."""
    cache = tmp_path / "cache"
    load_calibration_set(folder, PREP, COUNT, cache_dir=cache)
    touched = folder / "b" / "1.png"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_calibration_set(folder, PREP, COUNT, cache_dir=cache)
    assert len(entries(cache)) == 2


def test_garbage_entry_is_rebuilt(folder: Path, tmp_path: Path) -> None:
    """A corrupt entry is never trusted: the load decodes the images again and rewrites the entry,
    which the next load then reads. Catches a reader that raises or returns the garbage (planted:
    the ``except`` in ``_read_cache`` re-raising: the load fails)."""
    cache = tmp_path / "cache"
    first = load_calibration_set(folder, PREP, COUNT, cache_dir=cache)
    [entry] = entries(cache)
    entry.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage")
    rebuilt = load_calibration_set(folder, PREP, COUNT, cache_dir=cache)
    assert torch.equal(rebuilt.images, first.images) and rebuilt.sha256 == first.sha256
    assert entries(cache) == [entry] and calib_data._read_cache(entry, str(folder)) is not None


@pytest.mark.parametrize("change", [{"calib_size": COUNT - 2},
                                    {"prep": dataclasses.replace(PREP, image_size=64)},
                                    {"prep": dataclasses.replace(PREP, mean=(0.4, 0.5, 0.5))},
                                    {"prep": dataclasses.replace(PREP, interpolation="bicubic")}])
def test_other_size_or_preprocessing_gets_a_new_key(folder: Path, tmp_path: Path, change: dict) -> None:
    """Another --calib-size or preprocessing is another entry, with its own images. Catches a key
    that leaves them out (planted: ``asdict(prep)`` dropped from ``_cache_key``: the 32 px images
    come back for 64 px)."""
    cache = tmp_path / "cache"
    load_calibration_set(folder, PREP, COUNT, cache_dir=cache)
    prep, size = change.get("prep", PREP), change.get("calib_size", COUNT)
    other = load_calibration_set(folder, prep, size, cache_dir=cache)
    fresh = load_calibration_set(folder, prep, size, use_cache=False)
    assert torch.equal(other.images, fresh.images)
    assert len(entries(cache)) == 2


def test_tests_never_write_the_users_cache() -> None:
    """The default cache of this test session is a temporary folder (conftest sets MF_EDGE_CACHE).
    Catches the session fixture being dropped: calibration runs would fill ``~/.cache/mf-edge``."""
    root = calib_data.cache_root()
    assert not root.is_relative_to(Path.home() / ".cache"), root
    assert "pytest-of-" in str(root), root
