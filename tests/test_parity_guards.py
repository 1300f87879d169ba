"""Parity guards: the thresholds of every precision are pinned, and the Core ML reference executor's
fp16 findings reach parity.json, where an fp16 overflow fails the conversion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mf_edge import create_model
from mf_edge import parity as parity_lib
from mf_edge.coreml_reference import fp16
from mf_edge.data import parity_inputs
from mf_edge.errors import ParityFailure
from mf_edge.models.zoo import get_model_info
from mf_edge.pipeline import convert
from mf_edge.spec import ExportSpec

SIZE = 32


def test_thresholds_are_pinned_for_every_precision() -> None:
    """Every enforced threshold is pinned, not only fp32's. Catches a loosened fp16/int8/w8 threshold
    or a reference that stops being enforced (planted: fp16 cosine 0.999 -> 0.99: fails)."""
    assert parity_lib.THRESHOLDS == {
        "fp32": {"float": {"cosine": 0.9999, "top1_agreement": 1.0}},
        "fp16": {"float": {"cosine": 0.999, "top1_agreement": 0.75}},
        "int8": {"simulated": {"cosine": 0.99, "top1_agreement": 0.75}, "float": {}},
        "w8": {"simulated": {"cosine": 0.999, "top1_agreement": 0.75}, "float": {}},
    }


@pytest.fixture(scope="module")
def fp16_conversion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """identityformer_s12 at 32 px to a Core ML fp16 package, parity in the reference executor."""
    out = tmp_path_factory.mktemp("coreml_fp16") / "out"
    convert("identityformer_s12", "coreml", "fp16", weights="random", image_size=SIZE, output=out)
    return out


def test_fp16_findings_reach_parity_json(fp16_conversion: Path) -> None:
    """parity.json carries the executor's fp16 findings (an empty list for a model within fp16's
    range). Catches the report being dropped between the runtime and parity.json (planted: the
    ``report["fp16"] = findings`` line removed from ``parity.evaluate``: fails)."""
    report = json.loads((fp16_conversion / "parity.json").read_text())
    assert report["runtime"] == "coreml-reference" and report["status"] == "pass"
    assert "fp16" in report, sorted(report)
    assert not [f for f in report["fp16"] if f["kind"] == "overflow"], report["fp16"]


def test_fp16_overflow_fails_parity_and_publishes_nothing(tmp_path: Path) -> None:
    """A stem whose outputs leave fp16's range (|x| > 65504, at the cast of the fp32 stem conv to
    fp16) must fail parity with the overflowing op named, and publish nothing. Catches an executor
    that labels a cast's overflow as inf/nan (planted: ``cast`` casting to float16 itself again: the
    reason names no overflow) and an overflow that never reaches the reason."""
    model = create_model("identityformer_s12", image_size=SIZE)
    with torch.no_grad():
        model.downsample_layers[0].conv.weight.mul_(1e6)  # stem outputs ~1e6, beyond fp16's 65504
    out = tmp_path / "out"
    with pytest.raises(ParityFailure, match=r"fp16 overflow at \S+ \(\w+, max \|x\| [0-9.e+]+\)"):
        convert(model, "coreml", "fp16", image_size=SIZE, output=out)
    # nothing published: only the failed report is kept beside the output, for the user to read
    assert [path.name for path in tmp_path.iterdir()] == ["out.parity-failed.json"]
    kept = json.loads((tmp_path / "out.parity-failed.json").read_text())
    assert kept["status"] == "fail" and "fp16 overflow" in kept["reason"]


class ExactRuntime:
    """Gives the reference logits back exactly, with an fp16 report holding one finding of ``kind``."""

    name = "coreml-reference"

    def __init__(self, logits: np.ndarray, kind: str) -> None:
        self.logits = logits
        self.report = fp16.Report()
        self.report.add(fp16.Finding("conv2d_to_fp16", "cast", kind, 3, 8192, peak=1.4e6))

    def run(self, batch: np.ndarray) -> np.ndarray:
        assert len(batch) == len(self.logits)  # the whole batch at once (dynamic batch)
        return self.logits


def test_overflow_fails_even_when_the_logits_match() -> None:
    """An overflow finding fails parity although every metric passes (the logits are the reference's
    own); an underflow finding is reported in ``fp16`` but does not fail. Catches overflows that are
    recorded but not enforced (planted: ``and not overflows`` removed from the status in
    ``parity.evaluate``: the overflow report passes)."""
    inputs = parity_inputs(ExportSpec.for_model(get_model_info("identityformer_s12"), image_size=SIZE))
    logits = np.random.default_rng(0).normal(size=(len(inputs.batch), 10)).astype(np.float32)
    report = parity_lib.evaluate(ExactRuntime(logits, "overflow"), inputs, {"float": logits}, "fp16",
                                 dynamic_batch=True)
    assert report["references"]["float"]["passed"]
    assert report["status"] == parity_lib.FAIL
    assert report["reason"] == "fp16 overflow at conv2d_to_fp16 (cast, max |x| 1.4e+06)"
    assert [f["kind"] for f in report["fp16"]] == ["overflow"]
    quiet = parity_lib.evaluate(ExactRuntime(logits, "underflow"), inputs, {"float": logits}, "fp16",
                                dynamic_batch=True)
    assert quiet["status"] == parity_lib.PASS and [f["kind"] for f in quiet["fp16"]] == ["underflow"]
