"""The CUDA paths of training and calibration: AMP's precision choice, device and process checks, CUDA
random states on resume. Without a GPU they run on a faked ``torch.cuda`` (monkeypatched availability,
device count, capability, ``is_bf16_supported``); the real ones (an int8 TensorRT engine against its Q/DQ
ONNX, 2-GPU NCCL DDP with AMP) skip with the reason where TensorRT or the GPUs are absent.

On a GPU host with TensorRT 10: ``pytest tests/test_gpu_paths.py tests/test_tensorrt.py -rs -p no:randomly``
(see docs/gpu-tests.md).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mf_edge.calibration.statistics import resolve_device as calibration_device
from mf_edge.cli import main
from mf_edge.errors import UserError
from mf_edge.train import distributed
from mf_edge.train.checkpoint import restore_cuda_rng
from mf_edge.train.loop import describe_precision, mixed_precision

HAS_CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if HAS_CUDA else 0
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int = 1, capability: tuple[int, int] = (8, 0),
              name: str = "NVIDIA A100-SXM4-40GB") -> list:
    """``torch.cuda`` reports ``count`` GPUs of ``capability``; returns the ``set_device`` calls.

    ``is_bf16_supported`` keeps torch's semantics: native from capability 8.0, and True below it unless
    ``including_emulation=False`` (emulated bf16 is what issue 19 is about)."""
    set_devices: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "set_device", set_devices.append)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability >= (8, 0) or including_emulation)
    return set_devices


# --- AMP ------------------------------------------------------------------------------------------------
def test_amp_takes_bf16_on_ampere(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, capability=(8, 0))
    precision = mixed_precision(torch.device("cuda", 0), enabled=True)
    assert precision.dtype is torch.bfloat16 and precision.scaler is None
    assert describe_precision(precision, torch.device("cuda", 0)) == (
        "precision: AMP bf16 autocast (NVIDIA A100-SXM4-40GB, compute capability 8.0: native bf16)")


@pytest.mark.parametrize(("name", "capability"), [("Tesla T4", (7, 5)), ("Tesla V100-SXM2-16GB", (7, 0)),
                                                  ("Xavier", (7, 2))])
def test_amp_takes_fp16_with_a_scaler_where_bf16_is_only_emulated(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                  capability: tuple[int, int]) -> None:
    """Catches issue 19's defect: ``is_bf16_supported()`` (emulation on) picked bf16 on T4/V100/Xavier."""
    fake_gpus(monkeypatch, capability=capability, name=name)
    precision = mixed_precision(torch.device("cuda", 0), enabled=True)
    assert precision.dtype is torch.float16 and precision.scaler is not None and precision.scaler.is_enabled()
    assert describe_precision(precision, torch.device("cuda", 0)) == (
        f"precision: AMP fp16 autocast with a gradient scaler ({name}, compute capability "
        f"{capability[0]}.{capability[1]}: no native bf16)")


def test_amp_off_is_float32() -> None:
    precision = mixed_precision(torch.device("cpu"), enabled=False)
    assert precision.dtype is None
    assert describe_precision(precision, torch.device("cpu")) == "precision: float32"


def test_amp_on_cpu_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--amp needs a CUDA device"):
        mixed_precision(torch.device("cpu"), enabled=True)


def test_amp_on_cpu_from_the_cli(cifar10_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "poolformerv2_s12", "--data", str(cifar10_small), "--image-size", "32",
              "--device", "cpu", "--amp", "--workers", "0", "--weights", "random",
              "--output", str(tmp_path / "out")])
    output = capsys.readouterr().err.strip()
    assert exit_info.value.code == UserError.exit_code
    assert output.splitlines()[-1].startswith("error: --amp needs a CUDA device"), output
    assert "Traceback" not in output


# --- devices and processes ------------------------------------------------------------------------------
def test_training_device_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, count=2)
    assert distributed.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert distributed.resolve_device("cuda") == torch.device("cuda", 0)
    assert distributed.resolve_device(None, local_rank=1, local_world_size=2) == torch.device("cuda", 1)
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "cpu:1", "cuda:-1"):
        with pytest.raises(UserError, match=f"unknown device '{bad}'"):
            distributed.resolve_device(bad)


def test_training_gpu_beyond_the_count_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, count=2)
    with pytest.raises(UserError, match=r"--device cuda:2 asks for GPU 2, but this host has 2 \(cuda:0 to "
                                        r"cuda:1\)"):
        distributed.resolve_device("cuda:2")
    with pytest.raises(UserError, match="torchrun gives each process the GPU of its local rank"):
        distributed.resolve_device("cuda:1", local_rank=0, local_world_size=2)


def test_more_processes_than_gpus_is_one_error_before_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 torchrun processes on a 2-GPU host: every rank stops with one line, none reaches NCCL.

    Catches issue 19's ``local_rank % device_count()``, which put ranks 0 and 2 on one GPU."""
    fake_gpus(monkeypatch, count=2)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda *args, **kwargs: pytest.fail("init_process_group was reached"))
    for rank in range(3):
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        with pytest.raises(UserError, match="torchrun started 3 processes on this host, which has 2 GPU"):
            distributed.setup("cuda")


def test_single_process_on_a_chosen_gpu_makes_it_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device cuda:1`` sets the current device, so AMP's bf16 check and bare "cuda" tensors use it."""
    set_devices = fake_gpus(monkeypatch, count=2)
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    context = distributed.setup("cuda:1")
    assert context.device == torch.device("cuda", 1) and not context.enabled
    assert set_devices == [torch.device("cuda", 1)]


def test_train_cli_gpu_beyond_the_count(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    fake_gpus(monkeypatch, count=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "poolformerv2_s12", "--data", str(tmp_path), "--device", "cuda:3",
              "--weights", "random", "--output", str(tmp_path / "out")])
    output = capsys.readouterr().err.strip()
    assert exit_info.value.code == UserError.exit_code
    assert output == ("error: --device cuda:3 asks for GPU 3, but this host has 1 (cuda:0 to cuda:0); "
                      "pick one of those."), output


def test_calibration_gpu_beyond_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, count=2)
    assert calibration_device("cuda:1") == torch.device("cuda", 1)
    assert calibration_device("cuda") == torch.device("cuda")
    with pytest.raises(UserError, match=r"--device cuda:2 asks for GPU 2, but this host has 2"):
        calibration_device("cuda:2")


def notes(capsys: pytest.CaptureFixture) -> str:
    """stderr with the console's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


# --- CUDA random states on resume -----------------------------------------------------------------------
def test_resume_restores_the_cuda_rng_states_that_fit(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """A checkpoint from a 2-GPU host resumed on 1 GPU: GPU 0's state restored, the rest noted.

    Catches issue 19's ``set_rng_state_all`` on fewer GPUs (an IndexError inside torch)."""
    fake_gpus(monkeypatch, count=1)
    restored: list = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    states = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    restore_cuda_rng(states)
    assert len(restored) == 1 and restored[0][1] == 0 and torch.equal(restored[0][0], states[0])
    assert "CUDA random state of 2 GPU(s) and this host has 1: restored 1" in notes(capsys)

    restored.clear()
    restore_cuda_rng(states[:1])
    assert len(restored) == 1 and "CUDA random state" not in notes(capsys)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restored.clear()
    restore_cuda_rng(states)
    assert not restored and "this host has 0: restored 0" in notes(capsys)


# --- on a real GPU --------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_real_amp_choice_follows_the_capability() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    precision = mixed_precision(device, enabled=True)
    native = torch.cuda.get_device_capability(device) >= (8, 0)
    assert (precision.dtype is torch.bfloat16) == native and (precision.scaler is None) == native


@pytest.mark.skipif(not (HAS_TENSORRT and HAS_CUDA),
                    reason="tensorrt not installed" if not HAS_TENSORRT else "no CUDA device")
def test_real_int8_engine_matches_its_qdq_onnx(cifar10_small: Path, tmp_path: Path) -> None:
    """The int8 engine of a calibrated IdentityFormer against the same Q/DQ ONNX in onnxruntime."""
    import onnxruntime as ort

    from mf_edge.converters import get_target
    from mf_edge.converters.tensorrt.target import ENGINE_FILE, ONNX_FILE, TensorRTRuntime
    from mf_edge.parity import compare
    from mf_edge.pipeline import export, load_model, make_spec, quantize

    target = get_target("tensorrt")
    model = load_model("identityformer_s12", "random", image_size=64, num_classes=10)
    spec = make_spec(model, target, "int8", 64, dynamic_batch=True)
    quantized = quantize(model, spec, target, {"calib_data": cifar10_small / "train", "calib_size": 32})
    facts = export(target, quantized.module, spec, tmp_path).details["engine"]
    assert facts["strongly_typed"] == (tuple(map(int, facts["tensorrt_version"].split(".")[:2])) >= (10, 12))
    batch = np.random.default_rng(0).standard_normal((12, 3, 64, 64)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: batch})[0]
    metrics = compare(expected, TensorRTRuntime(tmp_path / ENGINE_FILE).run(batch))  # 12 > max batch 8
    assert metrics["cosine"] > 0.999 and metrics["top1_agreement"] >= 11 / 12, metrics


@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs, this host has {GPUS}")
def test_two_gpu_nccl_ddp_with_amp(cifar10_small: Path, tmp_path: Path) -> None:
    from mf_edge.train.checkpoint import load_checkpoint

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mf_edge.train", "poolformerv2_s12", "--data", str(cifar10_small), "--image-size", "32",
               "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "3", "--workers", "0",
               "--device", "cuda", "--amp", "--weights", "random", "--output", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("precision: AMP") == 1, done.stderr[-3000:]  # rank 0 says which
    assert load_checkpoint(tmp_path / "last.pt")["meta"]["world_size"] == 2
