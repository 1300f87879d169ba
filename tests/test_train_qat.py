"""``mf-edge train --qat``: the QAT checkpoint converts to int8 for the real runtime without calibration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mf_edge import create_model
from mf_edge.calibration.qat import graph_state, restore_for_export
from mf_edge.converters import get_target
from mf_edge.converters.prepare import prepare_for_target
from mf_edge.data import find_images, load_image, preprocess
from mf_edge.errors import UserError
from mf_edge.manifest import spec_from_manifest
from mf_edge.parity import runtime_logits
from mf_edge.pipeline import convert
from mf_edge.spec import ExportSpec
from mf_edge.train import TrainConfig, TrainResult, train
from mf_edge.train.checkpoint import load_checkpoint

MODEL = "poolformerv2_d1"  # one block per stage (tests/small_models.py): a third of the int8 lowering
DDP_MODEL = "poolformerv2_s12"  # torchrun's processes know the zoo only (register_model is per process)
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def qat_run(cifar10_small: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """Float fine-tuning, then two short QAT epochs for ExecuTorch (observers frozen for the second)."""
    out = tmp_path_factory.mktemp("qat")
    common = {"model": MODEL, "data": cifar10_small, "image_size": SIZE, "batch_size": 16, "workers": 0,
              "device": "cpu", "warmup_epochs": 0.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    float_run = train(TrainConfig(**common, output=out / "float", epochs=1, lr=1e-3))
    result = train(TrainConfig(**common, output=out / "qat", epochs=2, lr=1e-4, max_steps_per_epoch=3,
                               weights=str(float_run.last_checkpoint), qat=True, target="executorch",
                               freeze_observers_after=0.5, calib_size=32))
    torch.set_num_threads(threads)
    return result


def test_qat_checkpoint_records_the_trained_graph(qat_run: TrainResult) -> None:
    checkpoint = load_checkpoint(qat_run.last_checkpoint)
    section = checkpoint["qat"]
    assert section["target"] == "executorch" and section["precision"] == "int8" and section["frozen"]
    observers = [k for k in section["state"] if k.endswith("observer_enabled")]
    assert observers and all(int(section["state"][k]) == 0 for k in observers)
    assert [row["phase"] for row in checkpoint["train"]["history"]] == ["qat", "qat-frozen"]
    scales = [v for k, v in section["state"].items() if k.endswith(".scale")]
    assert scales and all(bool((s > 0).all()) for s in scales)
    # The graph convert rebuilds from the checkpoint holds exactly the trained state.
    model = create_model(MODEL, weights=qat_run.last_checkpoint, image_size=SIZE)
    spec = ExportSpec.for_model(model.mf_edge_info, SIZE, precision="int8", num_classes=model.num_classes)
    deploy = prepare_for_target(model, spec, get_target("executorch"))
    prepared, facts = restore_for_export(deploy, spec, "executorch")
    assert facts["source"] == "qat checkpoint" and facts["observers_frozen"]
    restored = graph_state(prepared)
    assert restored.keys() == section["state"].keys()
    for key, value in section["state"].items():
        assert torch.equal(restored[key], value), key


def test_qat_checkpoint_converts_to_int8_pte(qat_run: TrainResult, cifar10_small: Path,
                                             tmp_path: Path) -> None:
    # No calibration images are passed: a plain float checkpoint would need --calib-data here.
    conversion = convert(MODEL, "executorch", "int8", weights=qat_run.last_checkpoint, image_size=SIZE,
                         output=tmp_path / "pte", images=cifar10_small / "val")
    assert conversion.artifact.name == "model.pte"
    assert conversion.parity["status"] == "pass"
    simulated = conversion.parity["references"]["simulated"]["metrics"]
    assert simulated["cosine"] > 0.99
    assert conversion.manifest["quantization"]["calibration"]["source"] == "qat checkpoint"
    # The int8 program scores what QAT's fake-quantized model scored on the same validation images.
    spec = spec_from_manifest(conversion.manifest)
    found = find_images(cifar10_small / "val")
    batch = preprocess([load_image(path) for path, _ in found], spec.preprocessing)
    classes = sorted({label for _, label in found})
    labels = np.array([classes.index(label) for _, label in found])
    runtime = get_target("executorch").runtime(conversion.output, spec)
    program = runtime_logits(runtime, batch, 1, False)
    accuracy = float((program.argmax(1) == labels).mean() * 100)
    assert abs(accuracy - qat_run.history[-1]["val_top1"]) <= 5.0
    # The model is near chance, so equal accuracy alone is met by a program computing anything else:
    # per image, the .pte must predict what the QAT fake-quantized graph (from the checkpoint) predicts.
    model = create_model(MODEL, weights=qat_run.last_checkpoint, image_size=SIZE)
    qat_spec = ExportSpec.for_model(model.mf_edge_info, SIZE, precision="int8", num_classes=model.num_classes)
    deploy = prepare_for_target(model, qat_spec, get_target("executorch"))
    fake_quantized, _ = restore_for_export(deploy, qat_spec, "executorch")
    with torch.no_grad():
        qat_logits = fake_quantized(torch.from_numpy(batch)).numpy()
    agreement = float((program.argmax(1) == qat_logits.argmax(1)).mean())
    assert agreement >= 0.9, agreement


def test_qat_checkpoint_refuses_another_target(qat_run: TrainResult, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="QAT checkpoint for --target executorch"):
        convert(MODEL, "onnx", "int8", weights=qat_run.last_checkpoint, image_size=SIZE,
                output=tmp_path / "x")


@pytest.mark.parametrize(("option", "flag"), [({"calib_data": "images"}, "--calib-data"),
                                              ({"calibration": "calibration.safetensors"}, "--calibration"),
                                              ({"observer": "mse"}, "--observer"),
                                              ({"max_drop": 0.01}, "--max-drop"),
                                              ({"keep_float": ("head",)}, "--keep-float")])
def test_qat_checkpoint_refuses_calibration_options(qat_run: TrainResult, tmp_path: Path, option: dict,
                                                    flag: str) -> None:
    with pytest.raises(UserError, match=f"{flag}.* not apply to a QAT checkpoint.*drop {flag}"):
        convert(MODEL, "executorch", "int8", weights=qat_run.last_checkpoint, image_size=SIZE,
                output=tmp_path / "x", ptq_options=option)


@pytest.mark.slow
def test_qat_resume_continues_exactly(cifar10_small: Path, tmp_path: Path) -> None:
    common = {"model": MODEL, "data": cifar10_small, "image_size": SIZE, "batch_size": 16, "workers": 0,
              "device": "cpu", "epochs": 2, "lr": 1e-4, "max_steps_per_epoch": 2, "qat": True,
              "target": "executorch", "calib_size": 16}
    train(TrainConfig(**common, output=tmp_path / "straight"))
    train(TrainConfig(**common, output=tmp_path / "resumed", stop_after_epochs=1))
    train(TrainConfig(**common, output=tmp_path / "resumed", resume=tmp_path / "resumed" / "last.pt"))
    straight, resumed = (load_checkpoint(tmp_path / run / "last.pt")["qat"]
                         for run in ("straight", "resumed"))
    assert straight["frozen"] and resumed["frozen"]
    assert straight["state"].keys() == resumed["state"].keys()
    for key, value in straight["state"].items():
        assert torch.equal(value, resumed["state"][key]), f"{key} differs after resuming"


@pytest.mark.slow
def test_qat_two_process_gloo_ddp(cifar10_small: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mf_edge.train", DDP_MODEL, "--data", str(cifar10_small), "--image-size", str(SIZE),
               "--epochs", "2", "--batch-size", "8", "--max-steps-per-epoch", "2", "--workers", "0",
               "--device", "cpu", "--weights", "random", "--qat", "--target", "executorch",
               "--calib-size", "16",
               "--output", str(tmp_path / "qat")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "qat" / "last.pt")
    assert checkpoint["meta"]["world_size"] == 2 and checkpoint["qat"]["frozen"]
    conversion = convert(DDP_MODEL, "executorch", "int8", weights=tmp_path / "qat" / "last.pt",
                         image_size=SIZE, output=tmp_path / "pte")
    assert conversion.parity["status"] == "pass"
