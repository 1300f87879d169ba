"""converters/tensorrt.py and ``mf-edge engine`` against a fake TensorRT 10 on a faked CUDA device.

No GPU or TensorRT exists on CI, so the real engine tests in ``test_tensorrt.py`` skip there. Here a fake
``tensorrt`` module (put in ``sys.modules``) stands in. Its classes copy the TensorRT 10 Python bindings'
names, argument names and argument counts (read from NVIDIA/TensorRT 10.16 ``python/src/infer/pyCore.cpp``,
``pyFoundationalTypes.cpp``, ``python/src/parsers/pyOnnx.cpp`` and ``python/docstrings/infer/pyCoreDoc.h``),
so a misused call (a wrong name, a missing argument, a removed API) raises here as it would on the device.
It records every call, can make any of them fail, and its "engine" really computes what the test graph
computes (global average pool, with the graph's Q/DQ rounding) on the buffers the runtime hands it through
``set_tensor_address``, so the chunking, padding and dtype plumbing are checked against real numbers.

CUDA is faked by patching ``torch.cuda`` (availability, device name, ``Stream``, ``stream``) and pointing
the runtime's ``DEVICE`` at the CPU, whose tensors' ``data_ptr`` the fake reads and writes with ctypes.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from mf_edge.cli import main
from mf_edge.converters.tensorrt import target as trt_target
from mf_edge.converters.tensorrt.target import (
    ENGINE_FILE,
    TensorRTRuntime,
    build_engine,
    plan_engine,
    tensorrt_unavailable_reason,
)
from mf_edge.errors import RuntimeUnavailable, UserError

ENGINE_MAGIC = b"FAKE-TRT10-ENGINE\n"
CACHE_MAGIC = b"FAKE-TRT10-CACHE\n"
GPU_NAME = "Fake RTX 4000 Ada"
STREAM_HANDLE = 0x5EED


# --- the fake TensorRT 10 module ------------------------------------------------------------------------
class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT8 = "int8"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"
    UINT8 = "uint8"
    FP8 = "fp8"


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class BuilderFlag(enum.IntEnum):  # the ones mf-edge may set; TensorRT 10 has more
    FP16 = 0
    BF16 = 1
    INT8 = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated and ignored in TensorRT 10
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class FakeTensorRT:
    """State shared by the fake's objects: the call log, the calls made to fail, the engine's IO dtype."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.calls: list[tuple[str, tuple, dict]] = []
        self.failing: set[str] = set()
        self.io_dtype = DataType.FLOAT

    def record(self, name: str, *args: Any, **kwargs: Any) -> bool:
        """Log a call; ``False`` when the test made ``name`` fail."""
        self.calls.append((name, args, kwargs))
        return name not in self.failing

    def called(self, name: str) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for call, args, kwargs in self.calls if call == name]

    def module(self) -> types.ModuleType:
        """A ``tensorrt`` module made of the fake's classes, bound to this state."""
        fake = self
        mod = types.ModuleType("tensorrt")
        mod.__version__ = self.version
        mod.DataType, mod.TensorIOMode, mod.BuilderFlag = DataType, TensorIOMode, BuilderFlag
        mod.NetworkDefinitionCreationFlag, mod.MemoryPoolType = NetworkDefinitionCreationFlag, MemoryPoolType
        for alias, dtype in (("float32", DataType.FLOAT), ("float16", DataType.HALF),
                             ("bfloat16", DataType.BF16), ("int8", DataType.INT8), ("int32", DataType.INT32),
                             ("int64", DataType.INT64), ("bool", DataType.BOOL), ("uint8", DataType.UINT8),
                             ("fp8", DataType.FP8)):
            setattr(mod, alias, dtype)

        class Logger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = list(Severity)

            def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
                assert isinstance(min_severity, Severity), min_severity
                self.min_severity = min_severity

        class Builder:
            def __init__(self, logger: Logger) -> None:
                assert isinstance(logger, Logger)

            def create_network(self, flags: int = 0) -> Network:
                strongly_typed = 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED
                assert isinstance(flags, int) and flags & ~strongly_typed == 0, flags
                fake.record("create_network", flags)
                return Network(bool(flags & strongly_typed))

            def create_builder_config(self) -> BuilderConfig:
                return BuilderConfig()

            def create_optimization_profile(self) -> OptimizationProfile:
                return OptimizationProfile()

            def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
                assert isinstance(network, Network) and isinstance(config, BuilderConfig)
                assert network.graph is not None, "build before a successful parse"
                if network.strongly_typed:
                    assert not config.flags & {BuilderFlag.FP16, BuilderFlag.INT8, BuilderFlag.BF16}, \
                        "precision flags are an error on a strongly typed network"
                if network.graph["dynamic"]:
                    assert config.profiles, "a dynamic input needs an optimisation profile"
                if not fake.record("build_serialized_network", config.flags, network.strongly_typed):
                    return None
                if config.cache is not None:
                    config.cache.entries += 1
                profile = config.profiles[0].shapes[network.graph["input"]] if config.profiles else None
                program = {**network.graph, "profile": profile, "io_dtype": fake.io_dtype.value}
                return ENGINE_MAGIC + json.dumps(program).encode()

        class Network:
            def __init__(self, strongly_typed: bool) -> None:
                self.strongly_typed = strongly_typed
                self.graph: dict | None = None

        class ParserError:
            def __init__(self, text: str) -> None:
                self.text = text

            def __str__(self) -> str:
                return self.text

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                assert isinstance(network, Network) and isinstance(logger, Logger)
                self.network, self.errors = network, []

            def parse_from_file(self, model: str) -> bool:
                assert isinstance(model, str)
                if not fake.record("parse_from_file", model):
                    self.errors = [ParserError("In node 3 (importFoo): UNSUPPORTED_NODE: FooOp")]
                    return False
                self.network.graph = read_graph(Path(model))
                return True

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, index: int) -> ParserError:
                return self.errors[index]

        class OptimizationProfile:
            def __init__(self) -> None:
                self.shapes: dict[str, list] = {}

            def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 (TensorRT's names)
                shapes = [tuple(min), tuple(opt), tuple(max)]
                assert all(isinstance(d, int) for shape in shapes for d in shape), shapes
                self.shapes[input] = shapes

        class TimingCache:
            def __init__(self, device: str, entries: int) -> None:
                self.device, self.entries = device, entries

            def serialize(self) -> bytes:
                return CACHE_MAGIC + json.dumps({"device": self.device, "entries": self.entries}).encode()

        class BuilderConfig:
            def __init__(self) -> None:
                self.flags: set[BuilderFlag] = set()
                self.profiles: list[OptimizationProfile] = []
                self.cache: TimingCache | None = None
                self.workspace: int | None = None

            def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
                assert pool is MemoryPoolType.WORKSPACE and isinstance(pool_size, int) and pool_size > 0
                self.workspace = pool_size

            def set_flag(self, flag: BuilderFlag) -> None:
                assert isinstance(flag, BuilderFlag), flag
                fake.record("set_flag", flag)
                self.flags.add(flag)

            def add_optimization_profile(self, profile: OptimizationProfile) -> int:
                assert isinstance(profile, OptimizationProfile)
                low, opt, high = next(iter(profile.shapes.values()))
                if not fake.record("add_optimization_profile", profile.shapes) or not low <= opt <= high:
                    return -1
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, serialized_timing_cache: bytes) -> TimingCache | None:
                data = bytes(memoryview(serialized_timing_cache))  # the binding takes any buffer
                fake.record("create_timing_cache", data)
                if not data:
                    return TimingCache(GPU_NAME, 0)
                if not data.startswith(CACHE_MAGIC):
                    return None  # not a timing cache at all
                facts = json.loads(data[len(CACHE_MAGIC):])
                return TimingCache(facts["device"], facts["entries"])

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                assert isinstance(cache, TimingCache) and isinstance(ignore_mismatch, bool)
                if not fake.record("set_timing_cache", cache.device, ignore_mismatch=ignore_mismatch):
                    return False
                if cache.device != GPU_NAME and not ignore_mismatch:
                    return False  # the verification header names another device
                self.cache = cache
                return True

            def get_timing_cache(self) -> TimingCache | None:
                return self.cache

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                assert isinstance(logger, Logger)

            def deserialize_cuda_engine(self, serialized_engine: bytes) -> Engine | None:
                data = bytes(memoryview(serialized_engine))
                if not data.startswith(ENGINE_MAGIC):
                    return None  # TensorRT logs an error and returns None
                return Engine(json.loads(data[len(ENGINE_MAGIC):]))

        class Engine:
            def __init__(self, program: dict) -> None:
                self.program = program
                self.io = [program["input"], program["output"], *program.get("extra_outputs", [])]

            @property
            def num_io_tensors(self) -> int:
                return len(self.io)

            def get_tensor_name(self, index: int) -> str:
                return self.io[index]

            def get_tensor_mode(self, name: str) -> TensorIOMode:
                return TensorIOMode.INPUT if name == self.program["input"] else TensorIOMode.OUTPUT

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                assert name in self.io
                if name == self.program["input"]:
                    return tuple(self.program["shape"])
                return (self.program["shape"][0], self.program["classes"])

            def get_tensor_dtype(self, name: str) -> DataType:
                assert name in self.io
                return DataType(self.program["io_dtype"])

            def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
                assert name == self.program["input"] and profile_index == 0
                fake.record("get_tensor_profile_shape", name, profile_index)
                return [tuple(shape) for shape in self.program["profile"]]

            def create_execution_context(self) -> ExecutionContext:
                return ExecutionContext(self)

        class ExecutionContext:
            def __init__(self, engine: Engine) -> None:
                self.engine, self.input_shape, self.addresses = engine, None, {}

            def set_input_shape(self, name: str, shape: tuple | list) -> bool:
                assert name == self.engine.program["input"] and isinstance(shape, tuple | list)
                assert all(isinstance(d, int) for d in shape), shape
                shape = tuple(shape)
                program = self.engine.program
                if program["profile"] is None:
                    fits = shape == tuple(program["shape"])
                else:
                    low, _, high = program["profile"]
                    fits = low[0] <= shape[0] <= high[0] and shape[1:] == tuple(low[1:])
                if not fake.record("set_input_shape", name, shape) or not fits:
                    return False
                self.input_shape = shape
                return True

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                batch = self.input_shape[0] if self.input_shape else self.engine.program["shape"][0]
                if name == self.engine.program["input"]:
                    return (batch, *self.engine.program["shape"][1:])
                return (batch, self.engine.program["classes"])

            def set_tensor_address(self, name: str, memory: int) -> bool:
                assert name in self.engine.io and isinstance(memory, int) and memory != 0
                self.addresses[name] = memory
                return fake.record("set_tensor_address", name)

            def execute_async_v3(self, stream_handle: int) -> bool:
                assert isinstance(stream_handle, int)
                assert stream_handle != 0, "the default stream makes TensorRT synchronise the device"
                program = self.engine.program
                assert self.input_shape is not None and set(self.addresses) == set(self.engine.io)
                if not fake.record("execute_async_v3", stream_handle, self.input_shape):
                    return False
                dtype = DataType(program["io_dtype"])
                images = read_buffer(self.addresses[program["input"]], self.input_shape, dtype)
                if program["qdq_scale"] is not None:
                    scale = program["qdq_scale"]
                    images = np.clip(np.round(images / scale), -128, 127) * scale
                logits = images.mean(axis=(2, 3))
                write_buffer(self.addresses[program["output"]], logits, dtype)
                return True

        mod.Logger, mod.Builder, mod.OnnxParser, mod.Runtime = Logger, Builder, OnnxParser, Runtime
        mod.IBuilderConfig, mod.ICudaEngine, mod.IExecutionContext = BuilderConfig, Engine, ExecutionContext
        mod.IOptimizationProfile, mod.ITimingCache = OptimizationProfile, TimingCache
        return mod


def read_graph(path: Path) -> dict:
    """What the fake parser keeps of an ONNX file: IO names and shapes, and the Q/DQ scale if any."""
    model = onnx.load(str(path))
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in initializers)
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in graph_input.type.tensor_type.shape.dim]
    output = model.graph.output[0]
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    scale = float(initializers[quantize[0].input[1]]) if quantize else None
    classes = output.type.tensor_type.shape.dim[1].dim_value
    return {"input": graph_input.name, "shape": dims, "output": output.name, "classes": classes,
            "dynamic": dims[0] == -1, "qdq_scale": scale}


NUMPY_VIEW = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.BF16: np.uint16}


def read_buffer(address: int, shape: tuple[int, ...], dtype: DataType) -> np.ndarray:
    """The float32 values of a device buffer (here: host memory) of ``dtype`` at ``address``."""
    view = NUMPY_VIEW[dtype]
    count = int(np.prod(shape))
    raw = np.ctypeslib.as_array((ctypes.c_byte * (count * np.dtype(view).itemsize)).from_address(address))
    values = raw.view(view).reshape(shape)
    if dtype is DataType.BF16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def write_buffer(address: int, values: np.ndarray, dtype: DataType) -> None:
    view = NUMPY_VIEW[dtype]
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype is DataType.BF16:
        data = (values.view(np.uint32) >> 16).astype(np.uint16)
    else:
        data = values.astype(view)
    ctypes.memmove(address, data.ctypes.data, data.nbytes)


# --- fixtures: the fake installed, CUDA faked -------------------------------------------------------------
class FakeStream:
    """``torch.cuda.Stream`` stand-in: a non-default handle; counts synchronisations."""

    created: list[FakeStream] = []

    def __init__(self) -> None:
        self.cuda_stream, self.synchronized = STREAM_HANDLE + len(FakeStream.created), 0
        FakeStream.created.append(self)

    def synchronize(self) -> None:
        self.synchronized += 1


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[FakeStream]:
    """torch sees one CUDA GPU; engine buffers live on the CPU; yields the streams ``stream()`` entered."""
    return fake_cuda_on(monkeypatch)


def fake_cuda_on(monkeypatch: pytest.MonkeyPatch) -> list[FakeStream]:
    entered: list[FakeStream] = []

    @contextmanager
    def stream(s: FakeStream) -> Iterator[None]:
        assert isinstance(s, FakeStream), "work must go to the runtime's own stream"
        entered.append(s)
        yield

    FakeStream.created = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU_NAME)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(trt_target, "DEVICE", torch.device("cpu"))
    return entered


def install(monkeypatch: pytest.MonkeyPatch, version: str = "10.16.1.11") -> FakeTensorRT:
    fake = FakeTensorRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module())
    return fake


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch, fake_cuda: list[FakeStream]) -> FakeTensorRT:
    """TensorRT 10.16 (strongly typed int8) on one faked GPU."""
    return install(monkeypatch)


def write_pool_onnx(path: Path, batch: int | str = 1, size: int = 8, qdq: bool = False) -> Path:
    """Global average pool + flatten over 3 channels (logits = per-channel means), optionally Q/DQ'd."""
    nodes, pooled = [], "image"
    initializers = []
    if qdq:
        initializers = [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05]),
                        helper.make_tensor("zero", TensorProto.INT8, [], [0])]
        nodes += [helper.make_node("QuantizeLinear", ["image", "scale", "zero"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"])]
        pooled = "dq"
    nodes += [helper.make_node("GlobalAveragePool", [pooled], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["logits"])]
    graph = helper.make_graph(
        nodes, "pool", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def images(count: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out + captured.err


def pooled(batch: np.ndarray) -> np.ndarray:
    return batch.mean(axis=(2, 3))


# --- build ----------------------------------------------------------------------------------------------
def test_fixed_batch_fp16_build_and_run(fake_trt: FakeTensorRT, fake_cuda: list[FakeStream],
                                        tmp_path: Path) -> None:
    """A fixed batch-2 engine runs 5 images as 3 padded chunks on the runtime's own stream.

    Catches: a wrong TensorRT 10 call (the fake's signatures), the FP16 flag not set, chunks not padded to
    the engine's batch, work queued on the default stream (handle 0) or outside the runtime's stream."""
    plan = plan_engine(write_pool_onnx(tmp_path / "model.onnx", batch=2), "fp16", workspace_mib=64)
    facts = build_engine(plan, tmp_path / ENGINE_FILE)
    assert facts["device"] == GPU_NAME and facts["tensorrt_version"] == "10.16.1.11"
    assert facts["builder_flags"] == ["FP16"] and facts["strongly_typed"] is False
    assert fake_trt.called("create_network") == [((0,), {})]
    assert fake_trt.called("set_flag") == [((BuilderFlag.FP16,), {})]
    assert fake_trt.called("set_timing_cache") == [((GPU_NAME,), {"ignore_mismatch": False})]
    runtime = TensorRTRuntime(tmp_path / ENGINE_FILE)
    assert runtime.fixed_batch == 2 and runtime.batch_range == (2, 2, 2)
    batch = images(5)
    np.testing.assert_allclose(runtime.run(batch), pooled(batch), rtol=1e-6, atol=1e-6)
    assert [args[1] for args, _ in fake_trt.called("set_input_shape")] == [(2, 3, 8, 8)] * 3
    assert [args[0] for args, _ in fake_trt.called("execute_async_v3")] == [runtime.stream.cuda_stream] * 3
    assert fake_cuda == [runtime.stream] * 3 and runtime.stream.synchronized == 3
    assert not fake_trt.called("get_tensor_profile_shape")


def test_dynamic_batch_runs_in_chunks_of_the_profile_max(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    """10 images through a max-batch-4 engine: chunks of 4, 4 and 2, read from the engine's profile 0.

    Catches the defect of issue 19: every image sent as one batch, beyond the profile's max."""
    onnx_path = write_pool_onnx(tmp_path / "model.onnx", batch="batch")
    build_engine(plan_engine(onnx_path, "fp32", max_batch=4, opt_batch=2), tmp_path / ENGINE_FILE)
    assert fake_trt.called("add_optimization_profile") == [
        (({"image": [(1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)]},), {})]
    assert not fake_trt.called("set_flag")
    runtime = TensorRTRuntime(tmp_path / ENGINE_FILE)
    assert runtime.fixed_batch is None and runtime.batch_range == (1, 2, 4)
    assert fake_trt.called("get_tensor_profile_shape") == [(("image", 0), {})]
    batch = images(10, seed=1)
    np.testing.assert_allclose(runtime.run(batch), pooled(batch), rtol=1e-6, atol=1e-6)
    assert [args[1][0] for args, _ in fake_trt.called("set_input_shape")] == [4, 4, 2]


def test_false_set_input_shape_is_a_user_error(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    """Images of another size than the engine's: TensorRT answers False, mf-edge one clear error.

    Catches: the result of ``set_input_shape`` ignored (the engine would run on unset shapes)."""
    build_engine(plan_engine(write_pool_onnx(tmp_path / "model.onnx", batch="batch"), "fp16", max_batch=2),
                 tmp_path / ENGINE_FILE)
    runtime = TensorRTRuntime(tmp_path / ENGINE_FILE)
    with pytest.raises(UserError, match=r"refused input shape \(2, 3, 16, 16\): it takes batches of 1 to 2 "
                                        r"of \(3, 8, 8\)"):
        runtime.run(images(3, size=16))
    assert not fake_trt.called("execute_async_v3")


@pytest.mark.parametrize("version", ["10.16.1.11", "10.12.0.36", "10.8.0.43", "10.3.0.30"])
def test_int8_engine_matches_its_qdq_onnx(monkeypatch: pytest.MonkeyPatch, fake_cuda: list[FakeStream],
                                          tmp_path: Path, version: str) -> None:
    """int8: strongly typed without precision flags from TensorRT 10.12, INT8+FP16 flags before; the
    engine's logits equal onnxruntime's on the same Q/DQ ONNX.

    Catches: precision flags on a strongly typed network (an error in TensorRT), strong typing asked of
    a TensorRT < 10.12, and runtime plumbing that changes the numbers."""
    import onnxruntime as ort

    fake = install(monkeypatch, version)
    onnx_path = write_pool_onnx(tmp_path / "model.onnx", batch="batch", qdq=True)
    facts = build_engine(plan_engine(onnx_path, "int8", max_batch=8), tmp_path / ENGINE_FILE)
    strongly_typed = version.startswith("10.1") and version != "10.8.0.43"
    assert facts["strongly_typed"] is strongly_typed
    if strongly_typed:
        flags = 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        assert fake.called("create_network") == [((flags,), {})]
        assert facts["builder_flags"] == [] and not fake.called("set_flag")
    else:
        assert fake.called("create_network") == [((0,), {})]
        assert [args[0] for args, _ in fake.called("set_flag")] == [BuilderFlag.INT8, BuilderFlag.FP16]
    batch = images(11, seed=2) * 3
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": batch})[0]
    np.testing.assert_allclose(TensorRTRuntime(tmp_path / ENGINE_FILE).run(batch), expected, atol=1e-5)
    assert not np.allclose(expected, pooled(batch), atol=1e-4)  # the Q/DQ rounding is in both


@pytest.mark.parametrize(("io_dtype", "tolerance"), [(DataType.HALF, 2e-3), (DataType.BF16, 2e-2)])
def test_half_and_bfloat16_engine_buffers(fake_trt: FakeTensorRT, tmp_path: Path, io_dtype: DataType,
                                          tolerance: float) -> None:
    """An engine whose IO tensors are fp16 or bf16 gets its input cast to them and its logits back.

    Catches: bf16 missing from the dtype map (issue 19), buffers allocated in the wrong dtype."""
    fake_trt.io_dtype = io_dtype
    build_engine(plan_engine(write_pool_onnx(tmp_path / "model.onnx"), "fp16"), tmp_path / ENGINE_FILE)
    runtime = TensorRTRuntime(tmp_path / ENGINE_FILE)
    assert runtime.input_dtype == runtime.output_dtype == {DataType.HALF: torch.float16,
                                                           DataType.BF16: torch.bfloat16}[io_dtype]
    batch = images(3, seed=3)
    np.testing.assert_allclose(runtime.run(batch), pooled(batch), atol=tolerance)


def test_dtype_map_covers_tensorrt_10_io_types(fake_trt: FakeTensorRT) -> None:
    trt = sys.modules["tensorrt"]
    expected = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int8: torch.int8, trt.uint8: torch.uint8, trt.int32: torch.int32, trt.int64: torch.int64,
                trt.bool: torch.bool}
    assert {dtype: trt_target._torch_dtype(trt, dtype, "x") for dtype in expected} == expected
    with pytest.raises(UserError, match="tensor 'x' has TensorRT type DataType.FP8"):
        trt_target._torch_dtype(trt, trt.fp8, "x")


# --- timing cache ---------------------------------------------------------------------------------------
def test_timing_cache_is_reused_and_a_foreign_one_replaced(fake_trt: FakeTensorRT, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """The cache grows across builds on this GPU; a cache from another GPU fails TensorRT's check, is noted
    and replaced by a new one; an unreadable file likewise.

    Catches: ``set_timing_cache``'s result ignored (the foreign cache silently unused, then overwritten)."""
    cache = tmp_path / "timing.cache"
    plan = plan_engine(write_pool_onnx(tmp_path / "model.onnx"), "fp16", timing_cache=cache)
    build_engine(plan, tmp_path / ENGINE_FILE)
    build_engine(plan, tmp_path / ENGINE_FILE)
    assert json.loads(cache.read_bytes()[len(CACHE_MAGIC):]) == {"device": GPU_NAME, "entries": 2}
    capsys.readouterr()

    cache.write_bytes(CACHE_MAGIC + json.dumps({"device": "Jetson Orin", "entries": 7}).encode())
    build_engine(plan, tmp_path / ENGINE_FILE)
    assert "made on another GPU or TensorRT version; starting a new one" in capsys.readouterr().err
    assert [args[0] for args, _ in fake_trt.called("set_timing_cache")][-2:] == ["Jetson Orin", GPU_NAME]
    assert json.loads(cache.read_bytes()[len(CACHE_MAGIC):]) == {"device": GPU_NAME, "entries": 1}

    cache.write_bytes(b"\x00garbage")
    build_engine(plan, tmp_path / ENGINE_FILE)
    assert "starting a new one" in capsys.readouterr().err
    assert cache.read_bytes().startswith(CACHE_MAGIC)


def test_a_timing_cache_tensorrt_refuses_is_a_user_error(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    fake_trt.failing.add("set_timing_cache")
    with pytest.raises(UserError, match="could not create a timing cache"):
        build_engine(plan_engine(write_pool_onnx(tmp_path / "model.onnx")), tmp_path / ENGINE_FILE)
    assert not (tmp_path / ENGINE_FILE).exists()


# --- versions and hosts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["8.6.1.6", "9.3.0.1", "11.1.0.106"])
def test_tensorrt_other_than_10_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                       fake_cuda: list[FakeStream], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture, version: str) -> None:
    """JetPack's TensorRT 8.x (implicit batch era) or TensorRT 11 (no FP16/INT8 flags): named, refused.

    Catches: a build attempted with an API this code does not speak."""
    fake = install(monkeypatch, version)
    reason = tensorrt_unavailable_reason() or ""
    assert f"TensorRT {version} is installed" in reason and "TensorRT 10.x only" in reason
    assert "pip install 'tensorrt>=10,<11'" in reason
    code, output = run_cli(["engine", "build", str(write_pool_onnx(tmp_path / "model.onnx"))], capsys)
    assert code == RuntimeUnavailable.exit_code
    assert output.strip().startswith("error: ") and len(output.strip().splitlines()) == 1, output
    assert not fake.calls


def test_tensorrt_without_a_gpu_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs an NVIDIA GPU" in (tensorrt_unavailable_reason() or "")
    with pytest.raises(RuntimeUnavailable, match="needs an NVIDIA GPU"):
        TensorRTRuntime(tmp_path / ENGINE_FILE)


# --- TensorRT's failures become one-line errors ---------------------------------------------------------
@pytest.mark.parametrize(("failing", "message"), [
    ("parse_from_file", "could not parse .*UNSUPPORTED_NODE: FooOp"),
    ("build_serialized_network", "could not build the engine"),
    ("add_optimization_profile", "rejected the batch profile"),
])
def test_build_failures_are_user_errors(fake_trt: FakeTensorRT, tmp_path: Path, failing: str,
                                        message: str) -> None:
    fake_trt.failing.add(failing)
    plan = plan_engine(write_pool_onnx(tmp_path / "model.onnx", batch="batch"), "fp16")
    with pytest.raises(UserError, match=message):
        build_engine(plan, tmp_path / ENGINE_FILE)
    assert not (tmp_path / ENGINE_FILE).exists()


@pytest.mark.parametrize(("failing", "message"), [
    ("set_tensor_address", "refused the buffer of 'image'"),
    ("execute_async_v3", "failed to run the engine"),
])
def test_run_failures_are_user_errors(fake_trt: FakeTensorRT, tmp_path: Path, failing: str,
                                      message: str) -> None:
    build_engine(plan_engine(write_pool_onnx(tmp_path / "model.onnx")), tmp_path / ENGINE_FILE)
    fake_trt.failing.add(failing)
    with pytest.raises(UserError, match=message):
        TensorRTRuntime(tmp_path / ENGINE_FILE).run(images(1))


def test_engines_mf_edge_cannot_load(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        TensorRTRuntime(tmp_path / "missing.engine")
    (tmp_path / "other.engine").write_bytes(b"an engine of another TensorRT version")
    with pytest.raises(UserError, match=r"not an engine this TensorRT 10\.16\.1\.11 / GPU can load"):
        TensorRTRuntime(tmp_path / "other.engine")
    program = {**read_graph(write_pool_onnx(tmp_path / "model.onnx")), "profile": None, "io_dtype": "float32"}
    (tmp_path / "two.engine").write_bytes(ENGINE_MAGIC + json.dumps(
        {**program, "extra_outputs": ["features"]}).encode())
    with pytest.raises(UserError, match=r"outputs \['logits', 'features'\]; expected one of each"):
        TensorRTRuntime(tmp_path / "two.engine")


# --- the convert target and `mf-edge engine` ------------------------------------------------------------
def test_convert_target_builds_and_loads_the_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where TensorRT and a GPU are, ``--target tensorrt`` builds ``model.engine`` and serves it.

    (torch.onnx refuses to export while CUDA is faked, so the ONNX is exported first, for real.)"""
    from mf_edge import create_model
    from mf_edge.converters import get_target
    from mf_edge.spec import ExportSpec

    model = create_model("identityformer_s12", image_size=32, num_classes=10)
    spec = ExportSpec.for_model(model.mf_edge_info, image_size=32, precision="fp16")
    onnx_target = get_target("onnx")
    onnx_result = onnx_target.export(model, spec, tmp_path)
    monkeypatch.setattr(onnx_target, "export", lambda model, spec, out_dir: onnx_result)
    fake_cuda_on(monkeypatch)
    install(monkeypatch)
    target = get_target("tensorrt")
    assert target.artifact == ENGINE_FILE
    result = target.export(model, spec, tmp_path)
    assert tmp_path / ENGINE_FILE in result.files
    assert result.details["engine"]["device"] == GPU_NAME
    assert result.details["engine"]["builder_flags"] == ["FP16"]
    runtime = target.runtime(tmp_path, spec)
    assert runtime.input_shape == (1, 3, 32, 32) and runtime.run(images(2, size=32)).shape == (2, 10)


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(4)
    paths = []
    for index in range(count):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_engine_cli_build_and_run(fake_trt: FakeTensorRT, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    """``mf-edge engine build`` then ``engine run`` on 3 images with a max-batch-2 engine (chunked, noted),
    with a zoo model's transform, and on a random batch of the profile's opt size."""
    onnx_path = write_pool_onnx(tmp_path / "model.onnx", batch="batch", qdq=True)
    code, output = run_cli(["engine", "build", str(onnx_path), "--precision", "int8", "--max-batch", "2",
                            "--workspace", "32", "--timing-cache", str(tmp_path / "cache")], capsys)
    assert code == 0, output
    assert f"built {tmp_path / 'model.engine'}" in output.replace("\n", "")  # rich wraps long paths at 80
    assert "int8, strongly typed, TensorRT 10.16.1.11" in output
    assert (tmp_path / "cache").is_file()
    paths = write_images(tmp_path / "images", 3)
    code, output = run_cli(["engine", "run", str(tmp_path / "model.engine"), *map(str, paths),
                            "--repeat", "2", "--top", "2"], capsys)
    assert code == 0, output
    assert "3 images run in chunks of 2, the engine's largest batch" in output
    assert "top classes" in output and "latency for 3 image(s)" in output and "over 2 runs" in output
    assert [args[1][0] for args, _ in fake_trt.called("set_input_shape")] == [2, 1] * 3
    build_engine(plan_engine(write_pool_onnx(tmp_path / "m32.onnx", size=32)), tmp_path / "m32.engine")
    code, output = run_cli(["engine", "run", str(tmp_path / "m32.engine"), str(paths[0]), "--model",
                            "identityformer_s12", "--repeat", "1"], capsys)
    assert code == 0 and "class " in output, output
    code, output = run_cli(["engine", "run", str(tmp_path / "model.engine"), "--random", "--repeat", "1"],
                           capsys)
    assert code == 0 and "random[0]" in output and "latency for 1 image(s)" in output, output


def test_engine_cli_build_to_a_chosen_path(fake_trt: FakeTensorRT, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    code, output = run_cli(["engine", "build", str(write_pool_onnx(tmp_path / "model.onnx", batch=4)),
                            "-o", str(tmp_path / "out" / "pool.engine")], capsys)
    assert code == 0 and "fp16, TensorRT" in output and "strongly typed" not in output, output
    assert (tmp_path / "out" / "pool.engine").read_bytes().startswith(ENGINE_MAGIC)


def test_engine_cli_false_set_input_shape_is_one_error_line(fake_trt: FakeTensorRT, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    build_engine(plan_engine(write_pool_onnx(tmp_path / "model.onnx", batch="batch")), tmp_path / ENGINE_FILE)
    capsys.readouterr()
    fake_trt.failing.add("set_input_shape")
    code, output = run_cli(["engine", "run", str(tmp_path / ENGINE_FILE), "--random"], capsys)
    assert code == UserError.exit_code
    assert output.strip().startswith("error: the engine refused input shape (1, 3, 8, 8)"), output
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output


# --- the checks that need no TensorRT (so that every line of converters/tensorrt.py runs in CI) ----------
def test_onnx_files_mf_edge_cannot_build_from(tmp_path: Path) -> None:
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 3, 8, 8])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])
    add = helper.make_node("Add", ["image", "mask"], ["out"])
    two = helper.make_graph([add], "two", [image, mask], [out])
    onnx.save(helper.make_model(two), tmp_path / "two.onnx")
    with pytest.raises(UserError, match="has 2 inputs; mf-edge engines take one image batch input"):
        plan_engine(tmp_path / "two.onnx")
    flat = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 192])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "flat", [flat],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 192])])
    onnx.save(helper.make_model(graph), tmp_path / "flat.onnx")
    with pytest.raises(UserError, match=r"has shape \(1, 192\); expected \[batch, 3, H, W\]"):
        plan_engine(tmp_path / "flat.onnx")
    with pytest.raises(UserError, match=r"needs 1 <= opt \(5\) <= max \(4\)"):
        plan_engine(write_pool_onnx(tmp_path / "dynamic.onnx", batch="batch"), max_batch=4, opt_batch=5)


def test_a_failed_write_leaves_no_partial_engine(fake_trt: FakeTensorRT, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: a half-written engine or temporary file left where the engine should be."""
    plan = plan_engine(write_pool_onnx(tmp_path / "model.onnx"))

    def full_disk(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trt_target.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build_engine(plan, tmp_path / "out" / ENGINE_FILE)
    assert list((tmp_path / "out").iterdir()) == []


def test_tensorrt_target_refuses_weight_only_int8(tmp_path: Path) -> None:
    from mf_edge import create_model
    from mf_edge.converters import get_target
    from mf_edge.spec import ExportSpec

    model = create_model("identityformer_s12", image_size=32, num_classes=10)
    spec = ExportSpec.for_model(model.mf_edge_info, image_size=32, precision="w8")
    with pytest.raises(UserError, match="supports fp16, fp32, int8, not 'w8'"):
        get_target("tensorrt").export(model, spec, tmp_path)
    assert not any(tmp_path.iterdir())
