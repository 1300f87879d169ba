"""Layers point down: ``converters/`` and ``calibration/`` import nothing from the layers above them.

Every module under both folders (subfolders included) is parsed with ``ast`` and every ``import`` in
it is checked, at module level and inside functions alike. Regression caught: with
``from mf_edge.pipeline import make_spec`` planted inside a function of ``calibration/calibrate.py``
(as it was before the split) the test fails naming that file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOW_PACKAGES = ("converters", "calibration")
HIGHER_LAYERS = ("mf_edge.pipeline", "mf_edge.cli", "mf_edge.bench", "mf_edge.train", "mf_edge.sensitivity")


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``tree``, wherever it stands; ``from a import b`` gives
    both ``a`` and ``a.b`` (``b`` may be a submodule)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def is_upward(module: str) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in HIGHER_LAYERS)


def upward_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path.relative_to(REPO)}:{line} imports {module}"
            for line, module in imported_modules(tree) if is_upward(module)]


def low_modules() -> list[Path]:
    return sorted(path for package in LOW_PACKAGES for path in (REPO / package).rglob("*.py"))


def test_the_walk_sees_every_module_and_nested_imports() -> None:
    paths = low_modules()
    assert len(paths) >= 15 and any(p.name == "calibrate.py" for p in paths)
    planted = ast.parse("def f():\n    from mf_edge.pipeline import make_spec\n"
                        "    import mf_edge.cli.convert\n")
    assert [is_upward(m) for _, m in imported_modules(planted)] == [True, True, True]
    assert not is_upward("mf_edge.pipelines_helper") and not is_upward("mf_edge.parity")


@pytest.mark.parametrize("path", low_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_upward_import(path: Path) -> None:
    assert upward_imports(path) == []
