"""``import mf_edge`` and every submodule work from the source root and from anywhere, after a
non-editable and after an editable install.

The source tree keeps ``converters/`` and ``calibration/`` beside ``mf_edge/`` (pyproject's package-dir
maps them to ``mf_edge.converters`` / ``mf_edge.calibration``); the symlinks ``mf_edge/converters`` and
``mf_edge/calibration`` let the checkout's own ``mf_edge/``, which shadows an installed package when
Python runs from the clone's root, find them too. Regression caught: without the symlinks, ``python -c
"import mf_edge.converters"`` from the root of a clone with a non-editable install fails with
``ModuleNotFoundError``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "mf_edge", "converters", "calibration")
IMPORTS = ("import mf_edge, mf_edge.converters.base, mf_edge.calibration.store; "
           "print(mf_edge.__file__); print(mf_edge.converters.__file__); print(mf_edge.calibration.__file__)")


def newest_setuptools() -> Path:
    """The folder of the newest setuptools this environment has (pyproject asks for >= 68)."""
    found = [(tuple(int(p) for p in d.version.split(".")[:2] if p.isdigit()), Path(d.locate_file("")))
             for d in metadata.distributions() if d.metadata["Name"] == "setuptools"]
    if not found or max(found)[0] < (68,):
        pytest.skip("building a wheel needs setuptools >= 68 in this environment")
    return max(found)[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the files a build reads (symlinks kept), so building leaves the checkout clean."""
    root = tmp_path_factory.mktemp("src") / "mf-edge"
    root.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, root / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, root / name)
    return root


def build(source: Path, hook: str, out: Path) -> Path:
    """``setuptools.build_meta.<hook>`` in ``source``, without build isolation (no network)."""
    env = {**os.environ, "PYTHONPATH": str(newest_setuptools())}
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


def install(wheel: Path, site: Path) -> Path:
    """Unpack a pure-Python wheel into ``site``: what ``pip install`` does for it, minus the scripts."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def dependencies(site: Path) -> Path:
    """A folder beside ``site`` that links every entry of torch's site-packages except mf-edge's own
    (the environment running the tests may hold a non-editable ``mf_edge``, which would answer first:
    an editable install's finder comes after the path entries)."""
    folder = site.parent / "dependencies"
    if not folder.is_dir():
        folder.mkdir()
        for entry in Path(torch.__file__).resolve().parents[1].iterdir():
            if not entry.name.lower().startswith(("mf_edge", "mf-edge", "__editable__")):
                (folder / entry.name).symlink_to(entry)
    return folder


def imports(cwd: Path, site: Path) -> list[Path]:
    """Run ``IMPORTS`` in a fresh interpreter that sees ``site`` (its ``.pth`` files processed) and then
    the dependencies (torch's folder, as a plain path, without any ``mf_edge`` installed there);
    the resolved files of ``mf_edge``, ``mf_edge.converters`` and ``mf_edge.calibration``."""
    path = dependencies(site)
    code = f"import site, sys; site.addsitedir({str(site)!r}); sys.path.append({str(path)!r}); " + IMPORTS
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [Path(p).resolve() for p in done.stdout.split()]


def in_tree(root: Path) -> list[Path]:
    """Where the three packages' ``__init__.py`` are in a source tree (``converters/``, ``calibration/``
    beside ``mf_edge/``)."""
    return [(root / name / "__init__.py").resolve() for name in ("mf_edge", "converters", "calibration")]


def test_wheel_holds_every_module_once(source: Path, tmp_path: Path) -> None:
    """The symlinks must not put the converters and calibration modules into the wheel twice, and every
    module of their subfolders (one per target) must be in it."""
    names = zipfile.ZipFile(build(source, "build_wheel", tmp_path)).namelist()
    assert len(names) == len(set(names))
    assert {"mf_edge/converters/onnx/target.py", "mf_edge/calibration/quantize.py",
            "mf_edge/models/zoo_stats.json"} <= set(names)  # the table `mf-edge models` reads
    assert all(name.startswith(("mf_edge/", "mf_edge-")) for name in names), names
    sources = {str(p.relative_to(REPO)) for folder in ("converters", "calibration") for p in
               (REPO / folder).rglob("*.py")}  # the target folders (converters/onnx/, ...) included
    packaged = {name.removeprefix("mf_edge/") for name in names
                if name.startswith(("mf_edge/converters/", "mf_edge/calibration/"))}
    assert sources == packaged


def test_installed_wheel_imports_from_the_source_root_and_elsewhere(source: Path, tmp_path: Path) -> None:
    site = install(build(source, "build_wheel", tmp_path / "dist"), tmp_path / "site")
    assert imports(source, site) == in_tree(source)  # the checkout's mf_edge shadows the installed one
    installed = site / "mf_edge"
    assert imports(tmp_path, site) == [installed / "__init__.py", installed / "converters" / "__init__.py",
                                       installed / "calibration" / "__init__.py"]


def test_editable_install_imports_from_the_source_root_and_elsewhere(source: Path, tmp_path: Path) -> None:
    site = install(build(source, "build_editable", tmp_path / "dist"), tmp_path / "site")
    for cwd in (source, tmp_path):
        assert imports(cwd, site) == in_tree(source)
