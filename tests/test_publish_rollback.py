"""Publishing's two late failure paths: a forced replace that fails at the move, and an output that
appears while the conversion runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mf_edge import publish
from mf_edge.errors import UserError
from mf_edge.publish import staged_output


def _old_output(tmp_path: Path) -> Path:
    output = tmp_path / "out"
    output.mkdir()
    (output / "model.onnx").write_bytes(b"old graph")
    (output / "manifest.json").write_text('{"format": "mf-edge-manifest/1"}')  # --force replaces only ours
    return output


def test_failed_replace_under_force_restores_the_old_output(tmp_path: Path, monkeypatch) -> None:
    """The move of the staged folder onto the output fails (disk full, a permission change) after the
    old output was moved aside: the old output must be put back whole, and neither the ``.old`` nor
    the ``.partial`` folder may stay. Catches a rollback that is dropped (the output is gone) or that
    leaks its temporary folders (planted: ``os.replace(old / output.name, output)`` removed from
    ``_move_into_place``: ``out/model.onnx`` is missing)."""
    output = _old_output(tmp_path)
    real_replace = os.replace

    def replace(source, target):
        if Path(source).name.endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(publish.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"), staged_output(output, force=True) as staging:
        (staging / "model.onnx").write_bytes(b"new graph")
    assert (output / "model.onnx").read_bytes() == b"old graph"
    assert sorted(p.name for p in output.iterdir()) == ["manifest.json", "model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.*.old, no .out.*.partial


def test_output_appearing_during_the_conversion_is_a_user_error(tmp_path: Path) -> None:
    """Without ``--force``, an output folder that another process created while this conversion ran
    must be refused with a UserError and left untouched, and the staging folder removed. Catches a
    publish that checks the output only before the work (planted: the ``not force`` branch of
    ``_move_into_place`` removed: the other process's folder was replaced)."""
    output = tmp_path / "out"
    with pytest.raises(UserError, match="appeared during the conversion; pass --force"), \
            staged_output(output) as staging:
        (staging / "model.onnx").write_bytes(b"mine")
        output.mkdir()
        (output / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in output.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
