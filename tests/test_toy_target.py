"""Adding a target is one object: a ``torch.export`` ``.pt2`` target defined in this file only, added with
``register_target``, goes through ``mf-edge convert``, ``mf-edge parity``, ``predict`` and ``mf-edge bench``
(whose workers load it again from this file) without any other module knowing it.

Real numbers: the ``.pt2`` program runs in ``torch.export.load`` and its logits are compared with the
eager model's by the pipeline's own parity check and by bench's fidelity. Regression caught: with
``bench.runner.worker_kind`` not passing ``target_file`` to the measuring worker, the bench row fails
(``unknown target 'pt2'`` in the fresh interpreter) and so does this test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mf_edge.cli import main
from mf_edge.converters import (
    BenchFacts,
    ExportResult,
    Target,
    get_target,
    register_target,
    unregister_target,
)
from mf_edge.converters.program import export_program
from mf_edge.spec import ExportSpec

MODEL, SIZE = "identityformer_s12", 32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Pt2Runtime:
    """A ``.pt2`` program loaded with ``torch.export.load``, run eagerly."""

    name = "torch.export"

    def __init__(self, path: Path) -> None:
        self._module = torch.export.load(str(path)).module()

    def run(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()


class Pt2Target(Target):
    """``pt2``: the ``torch.export`` program of the prepared model, saved with ``torch.export.save``."""

    name = "pt2"
    precisions = ("fp32",)
    default_precision = "fp32"
    artifact = "model.pt2"
    next_step = "next: torch.export.load('{output}/model.pt2').module()"
    bench = BenchFacts(precisions=("fp32",), runtime_name="torch.export")

    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> ExportResult:
        path = Path(out_dir) / self.artifact
        torch.export.save(export_program(model, spec), str(path))
        return ExportResult([path], {"format": "torch.export"})

    def runtime(self, out_dir: Path, spec: ExportSpec) -> Pt2Runtime:
        return Pt2Runtime(Path(out_dir) / self.artifact)


TARGET = Pt2Target()


@pytest.fixture(scope="module")
def pt2_target():
    register_target(TARGET)
    yield TARGET
    unregister_target(TARGET.name)


def cli(*args: str) -> None:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    assert done.value.code in (0, None)


def test_toy_target_converts_checks_and_benches(pt2_target, tmp_path: Path, capsys) -> None:
    assert get_target("pt2") is pt2_target
    output = tmp_path / "pt2-out"
    cli("convert", MODEL, "--target", "pt2", "--weights", "random", "--image-size", str(SIZE),
        "--output", str(output), "--quiet")
    assert "parity pass in torch.export" in capsys.readouterr().out
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["target"] == "pt2" and manifest["artifact"] == "model.pt2"
    assert manifest["rewrites"]["fold_norm_affine"] > 0  # the default Target.rewrites ran
    parity = json.loads((output / "parity.json").read_text())
    assert parity["status"] == "pass" and parity["runtime"] == "torch.export"
    assert parity["references"]["float"]["metrics"]["cosine"] > 0.9999

    cli("parity", str(output), "--json")
    rechecked = json.loads(capsys.readouterr().out)
    metrics = rechecked["references"]["float"]["metrics"]
    assert rechecked["status"] == "pass" and metrics["top1_agreement"] == 1

    report_path = tmp_path / "bench.json"
    cli("bench", MODEL, "--weights", "random", "--image-size", str(SIZE), "--targets", "pt2",
        "--num-images", "4", "--runs", "3", "--warmup", "1", "--threads", "1", "--batch", "2",
        "--artifacts", str(tmp_path / "artifacts"), "--out", str(report_path), "--quiet")
    rows = {row["runtime"]: row for row in json.loads(report_path.read_text())["rows"]}
    row = rows["torch.export"]
    assert row["target"] == "pt2" and row["status"] == "measured", row
    assert row["fidelity"]["cosine_mean"] > 0.9999 and row["latency"]["median_ms"] > 0
