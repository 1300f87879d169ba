"""Quantization schemes: what each target quantizes, as data, turned into a PT2E quantizer in one place.

A ``Scheme`` names the weight and activation formats, which operators get quantized inputs and
whether residual adds get a Q/DQ pair. Each target declares its own (``Target.schemes`` in
``converters/<target>/target.py``; a scheme whose quantizer is not this module's ``QDQQuantizer`` names
its ``build``, e.g. ``converters/executorch/quantizer.py``). Targets differ only in their scheme:

- ExecuTorch ``int8``: executorch's ``XNNPACKQuantizer`` with ``get_symmetric_quantization_config(
  is_per_channel=True)`` on convolutions and linears (XNNPACK's int8 kernels), except depthwise
  convolutions: XNNPACK's int8 depthwise kernels ran 1.4x slower than its fp32 ones on ConvFormer's
  split 7x7 convolutions (ETDump profile; README, Benchmarks), for about 1% of the MACs; ``w8``: the same
  quantizer with ``is_dynamic=True`` on linears (int8 weights, activations quantized per batch at run
  time). Elementwise ops stay fp32: on MetaFormer, quantizing StarReLU's squares and the residual
  stream costs far more accuracy than it saves time.
- ONNX / TensorRT ``int8``: symmetric int8 activations (zero point 0), per-channel symmetric int8
  weights, Q/DQ on the inputs of conv, linear and matmul. The two runtimes then need different graphs
  (docs/int8-placement.md):
  - ONNX also quantizes each GEMM's output (``outputs``; not the graph's output, the logits):
    onnxruntime fuses only complete DQ -> Conv/MatMul -> Q units into ``QLinearConv``/
    ``QLinearMatMul`` (its QDQ selector/action transformer); without the output Q a convolution
    stays a float ``Conv`` on dequantized weights, and int8 measured slower than fp32.
    Its fused kernels also re-quantize each float bias to int32 at scale ``s_x * s_w`` (the
    accumulator's step), so the scheme rounds the biases onto that grid first (``bias_grid``):
    the simulation then adds the bias the runtime adds (worst-image cosine to the simulation
    0.99961 -> 0.99978 on the trained ConvFormer-S18 of tests/test_ptq.py).
  - TensorRT keeps its explicit-quantization guide's placement: inputs of weighted ops only (it
    propagates Q/DQ itself and fuses the following activation in higher precision) plus the skip
    input of residual adds, so TensorRT fuses the add into the preceding GEMM's int8 epilogue.
- Core ML ``int8``: the same layout with affine (zero-point) activations, which coremltools 9 turns
  into ``quantize``/``dequantize`` ops and ``constexpr`` int8 weights.
- ``w8`` (ONNX, Core ML): int8 per-channel symmetric weights only, activations float. Core ML applies
  it after conversion (``coremltools.optimize.coreml.linear_quantize_weights``); the PT2E version of
  the scheme is its PyTorch simulation.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import PerChannelMinMaxObserver
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

from mf_edge.calibration.observers import activation_observer
from mf_edge.errors import UserError

aten = torch.ops.aten
OPS = {"conv2d": aten.conv2d.default, "linear": aten.linear.default, "matmul": aten.matmul.default}
GEMMS = {aten.conv2d.default, aten.linear.default, aten.matmul.default, aten.bmm.default, aten.mm.default}
SHAPE_OPS = {aten.permute.default, aten.reshape.default, aten.view.default, aten.transpose.int,
             aten.flatten.using_ints, aten.contiguous.default, aten.clone.default, aten.mul.Tensor}
SOFTMAX = {aten.softmax.int, aten._softmax.default}


@dataclass(frozen=True)
class Scheme:
    """One target's quantization recipe (see the module docstring)."""

    name: str
    quantizer: str  # the quantizer's name, as the manifest records it: "qdq" (QDQQuantizer below), ...
    ops: tuple[str, ...]
    activations: str | None  # "symmetric", "affine", "dynamic" or None (weight-only)
    weights: str = "int8 per-channel symmetric"
    residual_adds: bool = False
    applied_by: str = "pt2e"  # "pt2e", or "coremltools" (w8 compressed after conversion)
    depthwise: bool = True  # False: depthwise convolutions stay float
    outputs: bool = False  # True: GEMM outputs are quantized too (DQ -> op -> Q, see the module docstring)
    # builds the quantizer: ``build(scheme, observer, quantizable)``; None: ``QDQQuantizer``
    build: Callable[[Scheme, str, Callable[[Node], bool]], Quantizer] | None = field(
        default=None, compare=False, repr=False)
    bias_grid: bool = False  # True: float biases rounded to the int32 accumulator grid s_x * s_w

    @property
    def calibrated(self) -> bool:
        """Whether the scheme has static activation ranges, i.e. needs calibration images."""
        return self.activations in ("symmetric", "affine")

    def describe(self) -> dict:
        return {"name": self.name, "quantizer": self.quantizer, "ops": list(self.ops),
                "weights": self.weights,
                "activations": f"int8 per-tensor {self.activations}" if self.calibrated
                else ("int8 dynamic per batch" if self.activations == "dynamic" else "float"),
                "residual_adds": self.residual_adds, "quantized_outputs": self.outputs,
                "bias": "float on the int32 grid (input scale x weight scale)" if self.bias_grid else "float",
                "applied_by": self.applied_by,
                "depthwise_conv": "int8" if self.depthwise or "conv2d" not in self.ops else "float"}


GEMM_OPS = ("conv2d", "linear", "matmul")


def all_schemes() -> dict[tuple[str, str], Scheme]:
    """``(target, precision) -> Scheme`` over every registered target (each declares ``Target.schemes``)."""
    from mf_edge.converters import get_target, target_names

    return {(name, precision): scheme for name in target_names()
            for precision, scheme in get_target(name).schemes.items()}


def scheme_for(target: str, precision: str) -> Scheme:
    """The scheme of ``target`` at ``precision`` (``int8`` or ``w8``); others raise ``UserError``."""
    from mf_edge.converters import get_target, target_names

    scheme = get_target(target).schemes.get(precision) if target in target_names() else None
    if scheme is None:  # an unknown target too: the message lists what can be quantized
        choices = ", ".join(f"{t} {p}" for t, p in all_schemes())
        raise UserError(f"no quantization scheme for {target} {precision}; quantized exports are: {choices}.")
    return scheme


def calibrated_targets() -> list[str]:
    """Targets whose ``int8`` scheme needs calibration, in the registry's order."""
    return [target for (target, precision), scheme in all_schemes().items()
            if precision == "int8" and scheme.calibrated]


# ---------------------------------------------------------------- quantization specs


def activation_spec(scheme: Scheme, observer: str) -> QuantizationSpec:
    """Per-tensor int8 activations: zero point 0 for ``symmetric``, free for ``affine``."""
    qscheme = torch.per_tensor_symmetric if scheme.activations == "symmetric" else torch.per_tensor_affine
    return QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=qscheme,
                            observer_or_fake_quant_ctr=activation_observer(observer))


def weight_spec() -> QuantizationSpec:
    """Per-output-channel symmetric int8 weights in ``[-127, 127]``."""
    return QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127,
                            qscheme=torch.per_channel_symmetric, ch_axis=0,
                            observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=2**-12))


# ---------------------------------------------------------------- keeping layers in float


def module_names(node: Node) -> list[str]:
    """The names of the modules a graph node was traced in, outermost first (``stages.0.0.mlp.fc1``)."""
    return [name for name, _ in node.meta.get("nn_module_stack", {}).values() if name]


def matches_keep_float(name: str, patterns: Iterable[str]) -> bool:
    """Whether module ``name`` or one of the modules holding it matches a ``--keep-float`` pattern."""
    parts = name.split(".")
    owners = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(owner, pattern) for owner in owners for pattern in patterns)


def keep_float_filter(patterns: Iterable[str]) -> Callable[[Node], bool]:
    """``filter(node)``: True where the node may be quantized (no module name matches a pattern)."""
    patterns = tuple(patterns)

    def quantizable(node: Node) -> bool:
        return not any(matches_keep_float(name, patterns) for name in module_names(node))

    return quantizable


def check_keep_float(patterns: Iterable[str], model: torch.nn.Module) -> None:
    """Every ``--keep-float`` pattern must match a module of ``model``; else a ``UserError``."""
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            example = next((n for n in names if n.endswith("fc1")), names[0] if names else "head")
            raise UserError(f"--keep-float {pattern!r} matches no layer of the model; layer names look like "
                            f"{example!r} (shell patterns, e.g. 'head.*').")


# ---------------------------------------------------------------- quantizers


class QDQQuantizer(Quantizer):
    """Q/DQ on the inputs of the scheme's ops: activations per tensor, weights per output channel.

    With ``scheme.residual_adds`` the skip input of a residual add (the operand that is not a GEMM
    output) is quantized too.
    """

    def __init__(self, scheme: Scheme, observer: str, quantizable: Callable[[Node], bool]) -> None:
        super().__init__()
        self.scheme = scheme
        self.quantizable = quantizable
        self.activation = activation_spec(scheme, observer) if scheme.calibrated else None
        self.weight = weight_spec()
        self.targets = {OPS[op] for op in scheme.ops}

    def annotate(self, model: GraphModule) -> GraphModule:
        for node in model.graph.nodes:
            if node.op != "call_function" or not self.quantizable(node):
                continue
            inputs = self._input_specs(node)
            output = self.activation if self._quantized_output(node) else None
            if inputs:
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map=inputs, output_qspec=output, _annotated=True)
        return model

    def _quantized_output(self, node: Node) -> bool:
        """With ``scheme.outputs``: a GEMM's output, except one the graph returns (the logits stay float)
        and attention scores (a GEMM feeding a softmax): onnxruntime would fuse DQ -> Softmax -> Q into
        ``QLinearSoftmax``, whose table-lookup exponent rounds away from the simulation (worst-image
        cosine 0.99939 on the trained CAFormer-S18); with a float output the scores' GEMM runs as
        ``MatMulIntegerToFloat`` (still an int8 GEMM) and the softmax in float."""
        return (self.scheme.outputs and self.activation is not None and node.target in self.targets
                and all(user.op != "output" for user in node.users) and not _feeds_softmax(node))

    def _input_specs(self, node: Node) -> dict[Node, QuantizationSpec]:
        if node.target in self.targets:
            if node.target == aten.matmul.default:
                return {arg: self.activation for arg in node.args[:2]
                        if isinstance(arg, Node) and self.activation is not None}
            specs = {node.args[1]: self.weight}
            if self.activation is not None:
                specs[node.args[0]] = self.activation
            return specs
        if self.scheme.residual_adds and self.activation is not None and node.target == aten.add.Tensor:
            skip = residual_skip_input(node)
            if skip is not None:
                return {skip: self.activation}
        return {}

    def validate(self, model: GraphModule) -> None:
        pass


def _feeds_softmax(node: Node) -> bool:
    """Whether ``node``'s output reaches a softmax, possibly through reshapes, permutes or a scale."""
    users = list(node.users)
    while users:
        user = users.pop()
        if user.target in SOFTMAX:
            return True
        if user.target in SHAPE_OPS:
            users.extend(user.users)
    return False


def _from_gemm(node: Node) -> bool:
    """Whether ``node`` is a GEMM output, possibly through reshapes, permutes or a scale."""
    while node.op == "call_function":
        if node.target in GEMMS:
            return True
        if node.target not in SHAPE_OPS or not isinstance(node.args[0], Node):
            return False
        node = node.args[0]
    return False


def residual_skip_input(add: Node) -> Node | None:
    """The skip operand of ``add`` when exactly one operand is a GEMM output (a residual add)."""
    a, b = add.args[:2]
    if not (isinstance(a, Node) and isinstance(b, Node)) or "val" not in a.meta or "val" not in b.meta:
        return None
    if a.meta["val"].shape != b.meta["val"].shape:
        return None
    from_a, from_b = _from_gemm(a), _from_gemm(b)
    if from_a == from_b:
        return None
    return b if from_a else a


DATA_MOVEMENT = {aten.permute.default, aten.transpose.int, aten.reshape.default, aten.view.default,
                 aten.flatten.using_ints, aten.squeeze.dim, aten.slice.Tensor, aten.dropout.default}


def share_through_data_movement(model: GraphModule) -> None:
    """Give data-movement ops after a quantized output the same qparams (values unchanged, so lossless).

    XNNPACK's own propagation also shares through ``mean``; a mean's range is far narrower than its
    input's (e.g. the statistics of a rewritten GroupNorm), so sharing there wipes it out.
    """
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in DATA_MOVEMENT:
            continue
        if not isinstance(node.args[0], Node):
            continue
        previous = node.args[0].meta.get("quantization_annotation")
        current = node.meta.get("quantization_annotation")
        if previous is None or previous.output_qspec is None or (current is not None and current._annotated):
            continue
        shared = SharedQuantizationSpec(node.args[0])
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={node.args[0]: shared}, output_qspec=shared, _annotated=True)


def is_depthwise_conv(node: Node) -> bool:
    """An ``aten.conv2d`` node with one input channel per group and more than one group."""
    if node.target != aten.conv2d.default:
        return False
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    weight = node.args[1].meta.get("val") if isinstance(node.args[1], Node) else None
    return groups > 1 and weight is not None and weight.shape[1] == 1


def has_trained_weight(node: Node) -> bool:
    """False for a GEMM whose weight is a buffer, not a parameter: it computes statistics (the means of
    ``xnnpack_layout.ChannelsFirstLayerNorm``), which stay float."""
    if node.target not in GEMMS or len(node.args) < 2 or not isinstance(node.args[1], Node):
        return True
    weight = node.args[1]
    if weight.op != "get_attr":
        return True
    buffers = dict(node.graph.owning_module.named_buffers())
    return weight.target not in buffers


def snap_biases_to_accumulator_grid(model: GraphModule) -> int:
    """Round the float bias of every quantized conv/linear of a converted graph to a multiple of
    ``s_x * s_w[c]`` (input scale times the output channel's weight scale); returns how many changed.

    An int8 kernel adds its bias to the int32 accumulator, whose step is ``s_x * s_w``: onnxruntime
    turns a float bias into ``round(b / (s_x * s_w))`` when it fuses ``QLinearConv``/``QGemm``.
    Rounding here first changes each bias by at most half an accumulator step (far below the output's
    own step) and makes the simulation add exactly what the runtime adds.
    """
    import operator

    snapped = 0
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.conv2d.default, aten.linear.default):
            continue
        if len(node.args) < 3 or not all(isinstance(arg, Node) for arg in node.args[:3]):
            continue
        source, weight, bias = node.args[:3]
        if (source.target != torch.ops.quantized_decomposed.dequantize_per_tensor.default
                or weight.target != torch.ops.quantized_decomposed.dequantize_per_channel.default
                or bias.op != "get_attr" or weight.args[1].op != "get_attr"):
            continue
        weight_scales = operator.attrgetter(weight.args[1].target)(model)
        step = torch.tensor(float(source.args[1]), dtype=torch.float32) * weight_scales.to(torch.float32)
        owner_name, _, name = bias.target.rpartition(".")
        owner = model.get_submodule(owner_name)
        values = getattr(owner, name)
        rounded = torch.round(values.detach() / step) * step  # a new tensor: the float model's stays as it is
        setattr(owner, name, torch.nn.Parameter(rounded, requires_grad=False)
                if isinstance(values, torch.nn.Parameter) else rounded)
        snapped += 1
    return snapped


def build_quantizer(scheme: Scheme, observer: str, keep_float: Iterable[str] = ()) -> Quantizer:
    """The PT2E quantizer of ``scheme``: the one place a scheme becomes a quantizer."""
    not_kept = keep_float_filter(keep_float)

    def quantizable(node: Node) -> bool:
        return (not_kept(node) and has_trained_weight(node)
                and (scheme.depthwise or not is_depthwise_conv(node)))
    return (scheme.build or QDQQuantizer)(scheme, observer, quantizable)
