"""No silent skips: missing test data fails CI, and the required runtimes are never skipped."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def conftest(request: pytest.FixtureRequest):
    """The tests' conftest module, as pytest loaded it."""
    for plugin in request.config.pluginmanager.get_plugins():
        if Path(getattr(plugin, "__file__", "") or "") == TESTS / "conftest.py":
            return plugin
    pytest.fail("tests/conftest.py is not loaded")


def test_missing_data_fails_in_ci(conftest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``CI=true`` a missing data folder fails the test; elsewhere it skips with the reason.
    Catches the CIFAR fixture going back to a plain skip (planted: ``require_data`` without its CI
    branch: ``Failed`` not raised, the 40 data tests would skip in CI)."""
    absent = tmp_path / "cifar10-jpg.tar.gz"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(BaseException) as outcome:  # a skip must not escape as this test's own skip
        conftest.require_data(absent, "CIFAR-10 data not found")
    assert outcome.type is pytest.fail.Exception, outcome.type
    assert "CI=true, so missing test data is a failure" in str(outcome.value)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="CIFAR-10 data not found"):
        conftest.require_data(absent, "CIFAR-10 data not found")
    conftest.require_data(tmp_path, "present")  # present: neither


REQUIRED = ("coremltools", "onnx", "onnxruntime", "executorch", "torchao", "timm", "mf_edge")


def test_required_dependencies_are_not_behind_skips() -> None:
    """executorch, coremltools, onnxruntime, timm (the test extra) and mf-edge's own modules (the
    Core ML executor, PTQ) are required: a broken install must fail the tests, not skip them.
    Catches a new ``pytest.importorskip`` of one of them (planted: ``importorskip("onnx")`` put back
    into test_convert_onnx.py: fails naming it)."""
    found = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and str(node.args[0].value).split(".")[0] in REQUIRED):
                found.append(f"{path.name}:{node.lineno} importorskip({node.args[0].value!r})")
    assert not found, found
