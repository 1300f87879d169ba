"""The ExecuTorch target's quantizer: executorch's ``XNNPACKQuantizer`` built from a ``Scheme``.

The ``int8`` and ``w8`` schemes in ``target.py`` name it as their ``build``; ``calibration.schemes.
build_quantizer`` calls it with the scheme, the activation observer and the filter of quantizable nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import Quantizer

from mf_edge.calibration.observers import activation_observer
from mf_edge.calibration.schemes import OPS, Scheme, share_through_data_movement

aten = torch.ops.aten


def reshape_dynamic_linear_inputs(model: GraphModule) -> None:
    """Put a shape-preserving reshape in front of every linear's input (exact; layout only).

    ExecuTorch 1.5's XNNPACK lowering carries its channels-last tag from a convolution or a mean,
    through permutes and elementwise ops, into a dynamically quantized linear and then transposes
    the int8 data, which XNNPACK rejects (``Failed to create static transpose``) or the lowering
    refuses (``Weight and Input should both be quantized``). A reshape stops the tag.
    """
    for node in list(model.graph.nodes):
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        source = node.args[0]
        with model.graph.inserting_before(node):
            shape = [-1, *source.meta["val"].shape[1:]]
            reshaped = model.graph.call_function(aten.reshape.default, (source, shape))
        reshaped.meta = {**source.meta, "val": source.meta["val"]}
        node.replace_input_with(source, reshaped)
    model.graph.lint()
    model.recompile()


def xnnpack_quantizer(scheme: Scheme, observer: str, quantizable: Callable[[Node], bool]) -> Quantizer:
    """executorch's ``XNNPACKQuantizer`` on the scheme's ops, with the chosen activation observer."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    class GemmXNNPACKQuantizer(XNNPACKQuantizer):
        """XNNPACK's annotations, shared only through data-movement ops (see above)."""

        def transform_for_annotation(self, model: GraphModule) -> GraphModule:
            model = super().transform_for_annotation(model)
            if scheme.activations == "dynamic":
                reshape_dynamic_linear_inputs(model)
            return model

        def annotate(self, model: GraphModule) -> GraphModule:
            model = self._annotate_for_quantization_config(model)
            share_through_data_movement(model)
            return model

    dynamic = scheme.activations == "dynamic"
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    if scheme.calibrated:
        spec = replace(config.input_activation, observer_or_fake_quant_ctr=activation_observer(observer))
        config = replace(config, input_activation=spec, output_activation=spec)
    quantizer = GemmXNNPACKQuantizer()
    for op in scheme.ops:
        quantizer.set_operator_type(OPS[op], config)
    quantizer.set_filter_function(quantizable)
    return quantizer
