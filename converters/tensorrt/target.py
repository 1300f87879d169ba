"""TensorRT target: a TensorRT-ready ONNX, and a serialized engine where TensorRT and a CUDA GPU exist.

An engine is specific to the GPU and the TensorRT version that built it, so the portable artifact is
``model.onnx`` (the ONNX target's export: static input shape, or a dynamic batch served by an
optimisation profile); ``mf-edge engine build model.onnx`` builds ``model.engine`` on the device
itself (a Jetson, a GPU server). ``convert --target tensorrt`` builds the engine too where it can.

The build goes through one description, ``EnginePlan`` (precision flags, workspace limit, timing
cache, profile), made by ``plan_engine`` without TensorRT, then applied by ``build_engine`` with the
TensorRT 10 Python API. ``TensorRTRuntime`` runs an engine with the tensor API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) on torch CUDA buffers and a stream of its own.

Only TensorRT 10.x is supported: on 8.x and 9.x a network made without ``EXPLICIT_BATCH`` (deprecated and
implied in 10) is implicit-batch, and 11 removed the FP16/INT8 builder flags. From 10.12 (where NVIDIA
deprecated weak typing) an int8 engine is built from a strongly typed network: the Q/DQ nodes alone decide
what runs in int8, as NVIDIA's explicit-quantization guide recommends.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from mf_edge.calibration.schemes import GEMM_OPS, Scheme
from mf_edge.console import note, step
from mf_edge.converters.base import BenchFacts, ExportResult, Runtime, Target
from mf_edge.errors import RuntimeUnavailable, UserError
from mf_edge.paths import not_a_file
from mf_edge.spec import ExportSpec

ENGINE_FILE = "model.engine"
ONNX_FILE = "model.onnx"
ENGINE_PRECISIONS = ("fp16", "fp32", "int8")
DEFAULT_MAX_BATCH = 8
INSTALL_HINT = "pip install '.[tensorrt]' on the NVIDIA device (on a Jetson, JetPack's python3-libnvinfer)"

SUPPORTED_MAJOR = 10
STRONGLY_TYPED_INT8_FROM = (10, 12)  # weak typing (the precision builder flags) is deprecated from here
DEVICE = torch.device("cuda")  # where the engine's input and output buffers live

# Builder flags per engine precision: fp16 lets TensorRT pick fp16 kernels; int8 runs the Q/DQ
# (explicitly quantized) layers in int8 and the rest in fp16 where faster (weakly typed TensorRT < 10.12).
BUILDER_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}


def tensorrt_version(trt: ModuleType) -> tuple[int, int]:
    """``(major, minor)`` of the imported ``tensorrt`` (``"10.12.0.36"`` -> ``(10, 12)``)."""
    major, minor = (re.findall(r"\d+", str(getattr(trt, "__version__", ""))) + ["0", "0"])[:2]
    return int(major), int(minor)


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module (10.x), or ``RuntimeUnavailable`` saying what to install."""
    try:
        import tensorrt
    except ImportError:
        raise RuntimeUnavailable(f"TensorRT is not installed here: {INSTALL_HINT}, then run this "
                                 "command there.") from None
    if tensorrt_version(tensorrt)[0] != SUPPORTED_MAJOR:
        raise RuntimeUnavailable(
            f"TensorRT {getattr(tensorrt, '__version__', '?')} is installed, but mf-edge builds and runs "
            f"engines with TensorRT {SUPPORTED_MAJOR}.x only (8.x/9.x networks are implicit-batch without "
            "EXPLICIT_BATCH, 11 removed the FP16/INT8 builder flags): pip install 'tensorrt>=10,<11' (on a "
            "Jetson: JetPack 6.1 or later).")
    return tensorrt


def require_cuda() -> None:
    """``RuntimeUnavailable`` unless torch sees a CUDA device (TensorRT's buffers live there)."""
    if not torch.cuda.is_available():
        raise RuntimeUnavailable("TensorRT needs an NVIDIA GPU with CUDA and none is visible here; build and "
                                 "run the engine on the device (mf-edge engine build model.onnx).")


def tensorrt_unavailable_reason() -> str | None:
    """Why an engine cannot be built or run on this host, or ``None`` when it can."""
    try:
        require_tensorrt()
        require_cuda()
    except RuntimeUnavailable as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class OnnxInput:
    """The single image input of an ONNX graph: its name and shape (a ``str`` for a symbolic dim)."""

    name: str
    shape: tuple[int | str, ...]
    quantized: bool

    @property
    def dynamic_batch(self) -> bool:
        return not isinstance(self.shape[0], int)


def read_onnx_input(path: Path) -> OnnxInput:
    """Name and shape of ``path``'s one input, and whether it holds Q/DQ nodes; bad files: ``UserError``."""
    import onnx

    path = Path(path)
    problem = not_a_file(path)
    if problem:
        inside = path / "model.onnx"
        fix = f"pass {inside}" if inside.is_file() else \
            "pass the model.onnx written by `mf-edge convert --target tensorrt`"
        raise UserError(f"{path} {problem}; {fix}.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__}); "
                        "convert it again.") from None
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"{path} has {len(inputs)} inputs; mf-edge engines take one image batch input.")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
    if len(shape) != 4 or any(not isinstance(d, int) for d in shape[1:]):
        raise UserError(f"{path} input {inputs[0].name!r} has shape {shape}; expected [batch, 3, H, W] with "
                        "a fixed image size.")
    quantized = any(node.op_type == "QuantizeLinear" for node in model.graph.node)
    return OnnxInput(inputs[0].name, shape, quantized)


@dataclass(frozen=True)
class EnginePlan:
    """Everything ``build_engine`` will ask of TensorRT, decided before TensorRT is imported."""

    onnx_path: Path
    input_name: str
    precision: str
    builder_flags: tuple[str, ...]
    workspace_bytes: int | None
    timing_cache: Path | None
    static_shape: tuple[int, ...] | None
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None  # min, opt, max

    def describe(self) -> dict[str, Any]:
        """The plan as manifest-ready facts."""
        return {
            "onnx": self.onnx_path.name,
            "input": self.input_name,
            "precision": self.precision,
            "builder_flags": list(self.builder_flags),
            "workspace_mib": None if self.workspace_bytes is None else self.workspace_bytes // 2**20,
            "timing_cache": None if self.timing_cache is None else str(self.timing_cache),
            "input_shape": list(self.static_shape) if self.static_shape else None,
            "profile": None if self.profile is None else {
                key: list(shape) for key, shape in zip(("min", "opt", "max"), self.profile, strict=True)},
        }


def plan_engine(
    onnx_path: Path,
    precision: str = "fp16",
    workspace_mib: int | None = None,
    timing_cache: Path | None = None,
    max_batch: int | None = None,
    opt_batch: int | None = None,
) -> EnginePlan:
    """Turn build options into an ``EnginePlan``, checking them against the ONNX file (``UserError``)."""
    if precision not in ENGINE_PRECISIONS:
        raise UserError(f"unknown engine precision {precision!r}; choose one of "
                        f"{', '.join(ENGINE_PRECISIONS)}.")
    if workspace_mib is not None and workspace_mib <= 0:
        raise UserError(f"--workspace must be a positive number of MiB, got {workspace_mib}.")
    onnx_input = read_onnx_input(Path(onnx_path))
    if precision == "int8" and not onnx_input.quantized:
        raise UserError(f"{onnx_path} has no Q/DQ nodes, so it cannot give an int8 engine; convert with "
                        "`--target tensorrt --precision int8` (calibrated) or build with --precision fp16.")
    if timing_cache is not None and Path(timing_cache).is_dir():
        raise UserError(f"--timing-cache {timing_cache} is a folder; pass a file path (created if missing).")
    static_shape, profile = None, None
    if onnx_input.dynamic_batch:
        top = max_batch or DEFAULT_MAX_BATCH
        opt = opt_batch or 1
        if top < 1 or not 1 <= opt <= top:
            raise UserError(f"the batch profile needs 1 <= opt ({opt}) <= max ({top}); fix --max-batch.")
        image = tuple(int(d) for d in onnx_input.shape[1:])
        profile = ((1, *image), (opt, *image), (top, *image))
    else:
        static_shape = tuple(int(d) for d in onnx_input.shape)
        if max_batch is not None and max_batch != static_shape[0]:
            raise UserError(f"{onnx_path} has a fixed batch of {static_shape[0]}; --max-batch needs an ONNX "
                            "exported with --dynamic-batch.")
    return EnginePlan(
        onnx_path=Path(onnx_path),
        input_name=onnx_input.name,
        precision=precision,
        builder_flags=BUILDER_FLAGS[precision],
        workspace_bytes=None if workspace_mib is None else int(workspace_mib) * 2**20,
        timing_cache=None if timing_cache is None else Path(timing_cache),
        static_shape=static_shape,
        profile=profile,
    )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_engine(plan: EnginePlan, output: Path) -> dict[str, Any]:
    """Build and serialize the engine ``plan`` describes into ``output`` (atomically); return build facts.

    Needs TensorRT 10 and a CUDA GPU (``RuntimeUnavailable`` otherwise); also updates the timing cache.
    An int8 plan on TensorRT >= 10.12 builds a strongly typed network without precision flags.
    """
    trt = require_tensorrt()
    require_cuda()
    strongly_typed = plan.precision == "int8" and tensorrt_version(trt) >= STRONGLY_TYPED_INT8_FROM
    builder_flags = () if strongly_typed else plan.builder_flags
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode in TensorRT 10; the one creation flag left to choose is strong typing.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
                                     if strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT {trt.__version__} could not parse {plan.onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    if plan.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for flag in builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.profile is not None:
        profile = builder.create_optimization_profile()
        profile.set_shape(plan.input_name, *plan.profile)
        if config.add_optimization_profile(profile) < 0:
            raise UserError(f"TensorRT rejected the batch profile {plan.describe()['profile']}; "
                            "check --max-batch.")
    _attach_timing_cache(config, plan.timing_cache)
    started = time.perf_counter()
    with step(f"building the TensorRT engine ({plan.precision})"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError("TensorRT could not build the engine (see its log above); try a larger --workspace "
                        "or --precision fp32.")
    _write_atomically(Path(output), bytes(serialized))
    if plan.timing_cache is not None:
        _write_atomically(plan.timing_cache, bytes(config.get_timing_cache().serialize()))
    return {
        "engine": Path(output).name,
        "tensorrt_version": trt.__version__,
        "device": torch.cuda.get_device_name(),
        "build_seconds": round(time.perf_counter() - started, 1),
        "size_bytes": Path(output).stat().st_size,
        **plan.describe(),
        "builder_flags": list(builder_flags),
        "strongly_typed": strongly_typed,
    }


def _attach_timing_cache(config: Any, path: Path | None) -> None:
    """Give ``config`` the timing cache at ``path`` (if any), or a new one where that cache does not fit.

    A cache written on another GPU or TensorRT version fails TensorRT's check (``ignore_mismatch=False``):
    it is then noted and replaced by a new cache, which the build fills and ``build_engine`` writes back.
    """
    data = path.read_bytes() if path is not None and path.exists() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if data:
        note(f"the timing cache {path} was made on another GPU or TensorRT version; starting a new one "
             "(it replaces that file after the build)")
        cache = config.create_timing_cache(b"")
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
    raise UserError("TensorRT could not create a timing cache (see its log above); check the TensorRT "
                    "install, or build without --timing-cache.")


def _torch_dtype(trt: ModuleType, dtype: Any, tensor: str) -> torch.dtype:
    """The torch dtype of an engine tensor; types mf-edge cannot hold in torch are a ``UserError``."""
    known = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int8: torch.int8, trt.uint8: torch.uint8, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool}
    if dtype not in known:
        raise UserError(f"the engine's tensor {tensor!r} has TensorRT type {dtype}, which mf-edge cannot "
                        "feed; rebuild the engine from the model.onnx of `mf-edge convert`.")
    return known[dtype]


class TensorRTRuntime:
    """A deserialized engine run on the GPU; ``run`` takes the normalised batch, returns float32 logits.

    The batch runs in chunks the engine accepts: a fixed-batch engine's own batch (the last chunk padded),
    or at most its optimisation profile's max batch (padded up to the profile's min where smaller).
    """

    name = "tensorrt"

    def __init__(self, engine_path: Path) -> None:
        trt = require_tensorrt()
        require_cuda()
        engine_path = Path(engine_path)
        problem = not_a_file(engine_path)
        if problem:
            raise UserError(f"{engine_path} {problem}; build it with `mf-edge engine build model.onnx`.")
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise UserError(f"{engine_path} is not an engine this TensorRT {trt.__version__} / GPU can load; "
                            "rebuild it here with `mf-edge engine build model.onnx`.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{engine_path} has inputs {inputs} and outputs {outputs}; expected one of each.")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.input_dtype, self.output_dtype = (_torch_dtype(trt, self.engine.get_tensor_dtype(name), name)
                                               for name in (self.input_name, self.output_name))
        if self.fixed_batch is not None:
            self.batch_range = (self.fixed_batch,) * 3
        else:  # profile 0, the one a new execution context uses: (min, opt, max) input shapes
            shapes = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.batch_range = tuple(int(shape[0]) for shape in shapes)
        # TensorRT synchronises the whole device around work on the default stream: use a stream of our own.
        self.stream = torch.cuda.Stream()

    @property
    def fixed_batch(self) -> int | None:
        return self.input_shape[0] if self.input_shape[0] > 0 else None

    def _run_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        context = self.context
        with torch.cuda.stream(self.stream):
            x = chunk.to(DEVICE, self.input_dtype).contiguous()
            if not context.set_input_shape(self.input_name, tuple(x.shape)):
                low, _, high = self.batch_range
                raise UserError(f"the engine refused input shape {tuple(x.shape)}: it takes batches of {low} "
                                f"to {high} of {tuple(self.input_shape[1:])}; rebuild it for this input.")
            out = torch.empty(tuple(context.get_tensor_shape(self.output_name)), device=DEVICE,
                              dtype=self.output_dtype)
            for name, tensor in ((self.input_name, x), (self.output_name, out)):
                if not context.set_tensor_address(name, tensor.data_ptr()):
                    raise UserError(f"TensorRT refused the buffer of {name!r} (see its log above).")
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise UserError("TensorRT failed to run the engine (see its log above).")
        self.stream.synchronize()
        return out.float().cpu()

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        low, _, high = self.batch_range
        results = []
        for start in range(0, len(x), high):
            chunk = x[start:start + high]
            padded = torch.cat([chunk, chunk.new_zeros((max(low - len(chunk), 0), *chunk.shape[1:]))])
            results.append(self._run_chunk(padded)[:len(chunk)])
        return torch.cat(results).numpy()


class TensorRTTarget(Target):
    """``tensorrt``: ``model.onnx`` for TensorRT plus ``model.engine`` where TensorRT and CUDA exist."""

    name = "tensorrt"
    precisions: tuple[str, ...] = ("fp16", "fp32", "int8")
    default_precision = "fp16"
    options = ("workspace_mib", "timing_cache", "max_batch", "opt_batch")
    option_flags = {"workspace_mib": "--workspace"}
    has_fallback_runtime = True
    # int8: symmetric Q/DQ on weighted ops' inputs plus residual adds' skip inputs (explicit quantization)
    schemes = {"int8": Scheme("tensorrt-qdq-w8a8", "qdq", GEMM_OPS, "symmetric", residual_adds=True)}
    bench = BenchFacts(precisions=("fp16",), runtime_name="tensorrt", runtime_module="tensorrt")
    next_step = ("next: on the NVIDIA device, mf-edge engine build {output}/model.onnx, then "
                 "mf-edge engine run {output}/model.engine image.jpg: docs/deploy/jetson.md")

    @property
    def artifact(self) -> str:
        """``model.engine`` where this host builds engines (as ``export`` does), else ``model.onnx``."""
        return ENGINE_FILE if tensorrt_unavailable_reason() is None else ONNX_FILE

    def output_label(self, spec: ExportSpec) -> str:
        """What a conversion holds, for its folder name: the engine's precision where this host builds
        engines, else the ONNX it writes (``onnx-int8`` Q/DQ, or ``onnx-fp32`` for fp16/fp32 engines)."""
        if tensorrt_unavailable_reason() is None:
            return spec.precision
        return "onnx-int8" if spec.precision == "int8" else "onnx-fp32"

    def export(self, model: nn.Module, spec: ExportSpec, out_dir: Path) -> ExportResult:
        from mf_edge.converters import get_target

        self.check_precision(spec.precision)
        out_dir = Path(out_dir)
        options = spec.options
        if options.get("max_batch") is not None and not spec.dynamic_batch:
            raise UserError("--max-batch sets the optimisation profile of a dynamic batch; add "
                            "--dynamic-batch or drop --max-batch.")
        # TensorRT lowers float ONNX to fp16 itself; only int8 needs a different (Q/DQ) ONNX.
        onnx_spec = replace(spec, precision="int8" if spec.precision == "int8" else "fp32")
        onnx_result = get_target("onnx").export(model, onnx_spec, out_dir)
        plan = plan_engine(out_dir / ONNX_FILE, spec.precision, options.get("workspace_mib"),
                           options.get("timing_cache"), options.get("max_batch"), options.get("opt_batch"))
        files = list(onnx_result.files)
        details: dict[str, Any] = {"onnx": onnx_result.details, "engine_plan": plan.describe()}
        reason = tensorrt_unavailable_reason()
        if reason is None:
            details["engine"] = build_engine(plan, out_dir / ENGINE_FILE)
            files.append(out_dir / ENGINE_FILE)
        else:
            details["engine"] = {"built": False, "reason": reason}
            note("wrote the TensorRT-ready ONNX only: no engine can be built on this host (why: below)")
        return ExportResult(files=files, details=details)

    def runtime(self, out_dir: Path, spec: ExportSpec) -> Runtime:
        """The engine in TensorRT; ``RuntimeUnavailable`` where TensorRT or CUDA is missing."""
        reason = tensorrt_unavailable_reason()
        if reason is not None:
            raise RuntimeUnavailable(reason)
        return TensorRTRuntime(Path(out_dir) / ENGINE_FILE)

    def fallback_runtime(self, out_dir: Path, spec: ExportSpec) -> Runtime:
        """The TensorRT-ready ONNX in onnxruntime: what can be verified on a host without TensorRT."""
        from mf_edge.converters import get_target

        return get_target("onnx").runtime(out_dir, replace(spec, precision="fp32"))


TARGET = TensorRTTarget()
