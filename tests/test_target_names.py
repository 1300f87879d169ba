"""Nothing outside ``converters/`` branches on a target's name: it asks the ``Target`` object instead.

Every module of ``mf_edge/`` (its ``converters`` link excepted) and of ``calibration/`` is parsed with
``ast``; a target name (``get_target``'s registry) as a string literal in a comparison or ``in`` test
(``target == "executorch"``, ``("onnx", "int8") in pairs``), as a dict key (``{"coreml": ...}``) or as
a subscript (``table["tensorrt"]``) fails the test. Names in plain tuples (``DEFAULT_TARGETS``),
defaults and messages are allowed: they are data, not branches. Regression caught: with
``if row.target == "executorch"`` planted back into ``mf_edge/bench/runner.py`` (as ``native_rows`` had
it) the test fails naming that file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mf_edge.converters import target_names

REPO = Path(__file__).resolve().parents[1]
NAMES = frozenset(target_names())


def _names_in(node: ast.AST | None) -> list[str]:
    """Target names written as string literals in ``node`` itself or directly in a tuple/list/set."""
    if isinstance(node, ast.Constant) and node.value in NAMES:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in NAMES]
    return []


def name_branches(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, what)`` for each comparison, dict key or subscript that uses a target name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            found += [(node.lineno, f"compares with {n!r}")
                      for part in (node.left, *node.comparators) for n in _names_in(part)]
        elif isinstance(node, ast.Dict):
            found += [(node.lineno, f"dict keyed by {n!r}") for key in node.keys for n in _names_in(key)]
        elif isinstance(node, ast.Subscript):
            found += [(node.lineno, f"subscript {n!r}") for n in _names_in(node.slice)]
    return found


def checked_modules() -> list[Path]:
    mf_edge = [p for p in (REPO / "mf_edge").rglob("*.py")
               if p.relative_to(REPO / "mf_edge").parts[0] not in ("converters", "calibration")]
    return sorted(mf_edge + list((REPO / "calibration").rglob("*.py")))


def test_the_check_sees_the_forms_it_forbids() -> None:
    assert {"coreml", "executorch", "onnx", "tensorrt"} <= NAMES
    planted = ast.parse('if row.target == "executorch": pass\nok = ("onnx", "int8") in pairs\n'
                        'table = {"coreml": 1}\nx = words["tensorrt"]\nfine = ("onnx", "coreml")\n')
    assert [line for line, _ in name_branches(planted)] == [1, 2, 3, 4]
    assert len(checked_modules()) > 40


@pytest.mark.parametrize("path", checked_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_branch_on_a_target_name(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    assert [f"{path.relative_to(REPO)}:{line} {what}" for line, what in name_branches(tree)] == []
