"""Shared fixtures: the CIFAR-10 JPEGs from ../shared/data (skipped with a reason when absent, a failure
in CI), a temporary mf-edge cache for the whole session, and the trained checkpoints the PTQ tests share.

The default run is spread over pytest-xdist workers (``-n auto --dist loadfile`` in pyproject.toml): a
module's tests and module fixtures stay in one worker, and the costliest modules are handed out first.
"""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside the tests (ptq_checks)

import small_models  # noqa: E402
from ptq_checks import TRAINED_SIZE, link_images  # noqa: E402

small_models.register()  # convformer_d1 & co: the one-block-per-stage variants of the default run

REPO = Path(__file__).resolve().parents[1]
CIFAR_TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"

# Modules by their measured cost on 2 cores (docs/testing.md), costliest first. With ``--dist loadfile
# --no-loadscope-reorder`` xdist hands modules to its workers in collection order, so the long ones
# start first and the short ones fill the gaps (largest-first scheduling).
COSTLY_MODULES = (
    "test_ptq.py", "test_ptq_executorch.py", "test_convert_executorch.py", "test_native_app.py",
    "test_bench.py", "test_sensitivity.py", "test_coreml_reference.py", "test_train_qat.py",
    "test_ddp_equivalence.py", "test_convert_coreml.py", "test_convert_onnx.py", "test_flow.py",
)


def torch_threads() -> int:
    """At most two intra-op threads, the cores shared among pytest-xdist's workers (2 cores, 2 workers:
    one each; more threads than cores makes eager PyTorch many times slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


torch.set_num_threads(torch_threads())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The costliest modules first (``COSTLY_MODULES``), each module's tests in their own order."""
    rank = {name: index for index, name in enumerate(COSTLY_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
def quiet_with_own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Notes off and an mf-edge cache of the test's own (the PTQ modules: no calibration cache carried
    from one test to the next)."""
    from mf_edge.console import set_quiet

    set_quiet(True)
    monkeypatch.setenv("MF_EDGE_CACHE", str(tmp_path / "cache"))
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
    from filelock import FileLock

    cache = Path(os.environ.get("MF_EDGE_TEST_DATA", tmp_path_factory.getbasetemp() / "data"))
    cache.mkdir(parents=True, exist_ok=True)
    done = cache / "cifar10.extracted"  # written last: a folder from an interrupted extraction is redone
    with FileLock(str(cache / "cifar10.lock")):  # MF_EDGE_TEST_DATA is shared by the xdist workers
        if not done.exists():
            with tarfile.open(CIFAR_TARBALL) as tar:
                tar.extractall(cache, filter="data")
            done.touch()
    return cache / "cifar10"


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


def shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this run that every xdist worker sees (the session's base temp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def calib_dir(cifar10_small: Path) -> Path:
    """The 200 calibration images (20 per class) of the PTQ tests."""
    return cifar10_small / "train"


@pytest.fixture(scope="session")
def parity_dir(cifar10_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 labelled CIFAR-10 test images (3 classes x 4)."""
    return link_images(cifar10_small / "val", tmp_path_factory.mktemp("parity"), slice(0, 4), classes=3)


@pytest.fixture(scope="session")
def trained_weights(cifar10_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """``weights(name)``: a checkpoint of ``name`` trained on 100 images per class at 32 px with
    ``mf_edge.train`` (images 20-119 of each class: not the calibration images): 4 epochs at lr 1e-3
    for the zoo models, 6 at 3e-3 for the one-block variants. At 4 epochs and 1e-3 CAFormer-d1 stayed
    near chance (12% val top-1); its logits carried so little signal that int8 rounding flips in the
    ExecuTorch runtime took the worst image's cosine to the simulation to 0.77. At 6 and 3e-3: 22%, and
    0.99994 (ConvFormer-d1 0.99996, ONNX 0.99994/0.99996), in 21 s instead of 17.

    Trained once per run: a file lock lets the first worker that needs a model train it while the
    others wait, then read the same checkpoint."""
    from filelock import FileLock

    from mf_edge.console import set_quiet
    from mf_edge.train.config import TrainConfig
    from mf_edge.train.trainer import train

    work = shared_folder(tmp_path_factory) / "trained"
    work.mkdir(exist_ok=True)
    data = work / "data"
    with FileLock(str(work / "data.lock")):
        if not (work / "data.done").exists():
            link_images(cifar10_root / "train", data, slice(20, 120))
            (work / "data.done").touch()

    def weights(name: str) -> Path:
        done = work / f"{name}.checkpoint"
        with FileLock(str(work / f"{name}.lock")):
            if not done.exists():
                set_quiet(True)
                epochs, lr = (6, 3e-3) if name in small_models.ONE_BLOCK else (4, 1e-3)
                config = TrainConfig(model=name, data=data, output=work / name, epochs=epochs, batch_size=32,
                                     lr=lr, warmup_epochs=0.5, image_size=TRAINED_SIZE, workers=0)
                done.write_text(str(train(config).last_checkpoint))
        return Path(done.read_text())

    return weights

