"""The graph PT2E quantizes: ``torch.export`` of the target-prepared model, batch dimension free.

Calibration statistics are keyed by the names of this graph's nodes, so the same model prepared for
the same target always gives the same graph (``graph_sha256``) and a saved calibration applies to it;
``params_sha256`` ties the statistics to the exact weights.
"""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
from torchao.quantization.pt2e.quantizer import Quantizer

MAX_BATCH = 4096


def capture(model: nn.Module, image_size: int) -> GraphModule:
    """``torch.export`` of ``model`` in eval mode on ``[B, 3, image_size, image_size]``, ``B`` dynamic."""
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        program = torch.export.export(model.eval(), (example,),
                                      dynamic_shapes=({0: Dim("batch", min=1, max=MAX_BATCH)},))
    return program.module()


def graph_sha256(graph_module: GraphModule) -> str:
    """sha256 of the graph's structure: each node's kind, name, operator and arguments."""
    digest = hashlib.sha256()
    for node in graph_module.graph.nodes:
        digest.update(f"{node.op}|{node.name}|{node.target}|{node.args}\n".encode())
    return digest.hexdigest()


def params_sha256(graph_module: GraphModule) -> str:
    """sha256 of every parameter and buffer of the graph (names and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(graph_module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def observed_source(node: Node) -> Node:
    """The value an observer node watches: its input, skipping observers chained in front of it."""
    source = node.args[0]
    while (isinstance(source, Node) and source.op == "call_module"
           and source.target.startswith("activation_post_process")):
        source = source.args[0]
    return source


def observers(prepared: GraphModule) -> list[tuple[Node, ObserverBase]]:
    """The ``(observer node, observer module)`` pairs ``prepare_pt2e`` inserted."""
    found = []
    for node in prepared.graph.nodes:
        if node.op == "call_module":
            module = prepared.get_submodule(node.target)
            if isinstance(module, ObserverBase):
                found.append((node, module))
    return found


def is_activation(source: Node) -> bool:
    """Whether an observed value depends on the input (not a weight or constant read by ``get_attr``)."""
    return source.op in ("call_function", "placeholder")


def activation_nodes(graph_module: GraphModule, quantizer: Quantizer) -> list[str]:
    """Names of the nodes whose outputs ``quantizer`` observes as activations (static ranges)."""
    prepared = prepare_pt2e(copy.deepcopy(graph_module), quantizer)
    names = {observed_source(node).name for node, module in observers(prepared)
             if is_activation(observed_source(node)) and not getattr(module, "is_dynamic", False)}
    return sorted(names)
