"""Shared fixtures: the CIFAR-10 JPEGs from ../shared/data (skipped with a reason when absent, a failure
in CI), and a temporary mf-edge cache for the whole session."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR_TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def in_ci() -> bool:
    """``CI`` set to true (GitHub Actions, GitLab, most CI services set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_data(path: Path, reason: str) -> None:
    """Skip a test whose data ``path`` is absent, with ``reason``; in CI fail it instead, so that a
    lost data folder cannot turn 40 tests into silent skips."""
    if path.exists():
        return
    if in_ci():
        pytest.fail(f"{reason}; CI=true, so missing test data is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _temporary_mf_edge_cache(tmp_path_factory: pytest.TempPathFactory):
    """``MF_EDGE_CACHE`` in a session temp folder: calibration caches and downloads never land in the
    user's ``~/.cache/mf-edge`` (a test that needs its own cache still sets it with monkeypatch)."""
    previous = os.environ.get("MF_EDGE_CACHE")
    os.environ["MF_EDGE_CACHE"] = str(tmp_path_factory.mktemp("mf-edge-cache"))
    yield
    if previous is None:
        os.environ.pop("MF_EDGE_CACHE", None)
    else:
        os.environ["MF_EDGE_CACHE"] = previous


@pytest.fixture(autouse=True)
def _console_not_quiet():
    """Each test starts with notes on: a ``--quiet`` CLI call in one test must not silence the next."""
    from mf_edge.console import set_quiet

    set_quiet(False)
    yield
    set_quiet(False)


@pytest.fixture
def one_torch_thread():
    """One PyTorch thread for the test: small models gain nothing from intra-op threads, and on a
    shared 2-core machine two threads make eager PyTorch many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``.../cifar10`` with ``train/`` and ``test/`` ImageFolder trees, extracted once per session."""
    require_data(CIFAR_TARBALL, f"CIFAR-10 data not found at {CIFAR_TARBALL} "
                 "(../shared is only beside dev and CI clones)")
    cache = Path(os.environ.get("MF_EDGE_TEST_DATA", tmp_path_factory.getbasetemp() / "data"))
    root = cache / "cifar10"
    if not (root / "test").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(CIFAR_TARBALL) as tar:
            tar.extractall(cache, filter="data")
    return root


@pytest.fixture(scope="session")
def cifar10_small(cifar10_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ImageFolder (``train/`` 20 per class, ``val/`` 10 per class) linked from CIFAR-10."""
    out = tmp_path_factory.mktemp("cifar10_small")
    for split, source, count in (("train", "train", 20), ("val", "test", 10)):
        for class_dir in sorted((cifar10_root / source).iterdir()):
            target = out / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (target / image.name).symlink_to(image)
    return out
