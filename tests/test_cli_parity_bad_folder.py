"""``mf-edge parity`` on a folder that no longer matches its manifest: one ``error:`` line, exit code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mf_edge import create_model
from mf_edge.cli import main
from mf_edge.weights import save_state_dict

SIZE = "32"


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the CLI in-process: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def convert(out: Path, weights: str, seed: int = 0) -> Path:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "identityformer_s12", "--target", "onnx", "--weights", weights, "--seed", str(seed),
              "--image-size", SIZE, "--output", str(out), "--quiet"])
    assert exit_info.value.code in (0, None)
    return out


def test_artifact_of_another_seed_fails_parity_with_exit_4(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """model.onnx swapped for the one converted with seed 1: the re-run parity check (references
    rebuilt from the manifest's seed 0) must fail with exit code 4 and one ``error:`` line naming the
    parity failure. Catches ``recheck`` rebuilding its reference from the artifact or the wrong seed
    (planted: ``seed=weights.get("seed") or 0`` -> ``seed=1`` in ``rebuild_float_model``: exit 0)."""
    folder = convert(tmp_path / "seed0", "random", seed=0)
    other = convert(tmp_path / "seed1", "random", seed=1)
    shutil.copyfile(other / "model.onnx", folder / "model.onnx")
    capsys.readouterr()
    code, _, err = run(["parity", str(folder), "--quiet"], capsys)
    assert code == 4, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "does not match its reference" in err and "cosine" in err


def test_checkpoint_edited_after_converting_is_a_sha256_error(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """The checkpoint a folder was converted from is overwritten with other weights: ``mf-edge
    parity`` must refuse with the sha256 error (exit 2), not compare against the new weights.
    Catches the manifest's weight hash going unchecked (planted: the sha256 comparison in
    ``rebuild_float_model`` removed: exit 4, a parity failure instead of the clear cause)."""
    checkpoint = tmp_path / "ckpt.safetensors"
    save_state_dict(create_model("identityformer_s12", image_size=int(SIZE), seed=0), checkpoint)
    folder = convert(tmp_path / "out", str(checkpoint))
    save_state_dict(create_model("identityformer_s12", image_size=int(SIZE), seed=1), checkpoint)
    capsys.readouterr()
    code, _, err = run(["parity", str(folder), "--quiet"], capsys)
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "sha256 mismatch" in err and str(checkpoint) in err
