"""Atomic publishing: staged folder moved into place; failures, Ctrl-C and refusals leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from mf_edge.errors import UserError
from mf_edge.publish import check_output, staged_output


def test_success_moves_the_staged_folder_into_place(tmp_path: Path) -> None:
    output = tmp_path / "nested" / "out"
    with staged_output(output) as staging:
        assert staging.parent == output.parent and staging.name.startswith(".out.")
        assert not output.exists()
        (staging / "model.onnx").write_bytes(b"graph")
    assert (output / "model.onnx").read_bytes() == b"graph"
    assert sorted(p.name for p in output.parent.iterdir()) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("export failed"), KeyboardInterrupt()])
def test_failure_or_ctrl_c_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    with pytest.raises(type(error)), staged_output(tmp_path / "out") as staging:
        (staging / "model.pte").write_bytes(b"half written")
        raise error
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    (output / "manifest.json").write_text('{"format": "mf-edge-manifest/1"}')  # --force replaces only ours
    with pytest.raises(UserError, match="already exists; pass --force"):
        check_output(output, force=False)
    with staged_output(output, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in output.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder is gone


def test_failed_forced_replacement_keeps_the_old_output(tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    (output / "manifest.json").write_text('{"format": "mf-edge-manifest/1"}')  # --force replaces only ours
    with pytest.raises(KeyboardInterrupt), staged_output(output, force=True):
        raise KeyboardInterrupt
    assert (output / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "model.onnx"
    file.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        check_output(file, force=True)
    with pytest.raises(UserError, match="is a file"):
        check_output(file / "out", force=False)


def test_unwritable_location_is_a_user_error() -> None:
    # /proc refuses new entries to every user, root included.
    with pytest.raises(UserError, match="writable"), staged_output(Path("/proc/mf-edge-test-output")):
        pytest.fail("staging must not start")
