"""Quantization-aware training on the graph the int8 export quantizes, and the QAT checkpoint contract.

The QAT graph is the one PTQ calibrates for the same target (the deployment rewrites, ``torch.export``,
the target's PT2E quantizer), prepared with ``prepare_qat_pt2e``: fake-quant modules whose observers
are first calibrated, then trained through, then frozen. A QAT checkpoint (see
``mf_edge.train.checkpoint``) keeps

- ``"model"``: the float official-layout weights QAT started from (the float reference of parity), and
- ``"qat"``: ``{"target", "precision", "scheme", "image_size", "frozen", "state"}``, where ``state`` is
  the prepared graph's state dict: the trained parameters of the deployment graph and every
  ``activation_post_process_*`` fake-quant module (scales, zero points, observer ranges).

``restore_for_export`` is the loading side used by ``mf_edge.calibration.quantize_for_export``: it
re-prepares the same graph at the export batch size, loads ``state`` strictly and freezes the
observers, so ``convert_pt2e`` gives the int8 program without calibrating again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule
from torchao.quantization.pt2e import (
    FakeQuantizeBase,
    allow_exported_model_train_eval,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)

from mf_edge.errors import UserError
from mf_edge.spec import ExportSpec
from mf_edge.train.checkpoint import read_qat_section

PRECISION = "int8"
OBSERVER_PREFIX = "activation_post_process_"
GRAPH_CONSTANT_PREFIX = "_tensor_constant"
BATCH_NORM_TRAINING_OPS = ("_native_batch_norm_legit", "cudnn_batch_norm", "batch_norm")


def prepare_graph(
    model: nn.Module, spec: ExportSpec, target: str, dynamic_batch: bool
) -> tuple[GraphModule, str]:
    """The target's int8 QAT graph of ``model`` (PTQ's scheme and rewrites) and the scheme's name."""
    from mf_edge.calibration import prepare_for_qat

    return prepare_for_qat(model, spec, target, dynamic_batch=dynamic_batch)


def fake_quant_modules(module: nn.Module) -> list[FakeQuantizeBase]:
    return [m for m in module.modules() if isinstance(m, FakeQuantizeBase)]


@torch.no_grad()
def calibrate(prepared: GraphModule, batches: Iterable[torch.Tensor]) -> int:
    """Observe ``batches`` with fake quantization off (PTQ-style ranges), then switch it on."""
    prepared.apply(disable_fake_quant)
    prepared.apply(enable_observer)
    device = next(prepared.parameters()).device
    count = 0
    for batch in batches:
        prepared(batch.to(device))
        count += len(batch)
    prepared.apply(enable_fake_quant)
    return count


def freeze_batch_norm_stats(prepared: GraphModule) -> int:
    """Switch training-mode batch norms of the graph to their running statistics; returns how many.

    (MetaFormers have none: their norms are LayerNorms; kept so any converted head with BN is handled.)
    """
    changed = 0
    for node in prepared.graph.nodes:
        name = getattr(node.target, "__name__", "")
        is_batch_norm = node.op == "call_function" and name.split(".")[0] in BATCH_NORM_TRAINING_OPS
        if is_batch_norm and len(node.args) > 5:
            args = list(node.args)
            if args[5] is True:
                args[5] = False
                node.args = tuple(args)
                changed += 1
    if changed:
        prepared.recompile()
    return changed


@contextmanager
def observers_paused(module: nn.Module) -> Iterator[None]:
    """Evaluate without letting validation images move the observer ranges."""
    saved = [(m, m.observer_enabled.clone()) for m in fake_quant_modules(module)]
    module.apply(disable_observer)
    try:
        yield
    finally:
        for fake_quant, enabled in saved:
            fake_quant.observer_enabled.copy_(enabled)


def graph_state(prepared: GraphModule) -> dict[str, torch.Tensor]:
    """Parameters and fake-quant buffers of the prepared graph (its lifted constants are rebuilt)."""
    return {k: v for k, v in prepared.state_dict().items() if not k.startswith(GRAPH_CONSTANT_PREFIX)}


def load_graph_state(prepared: GraphModule, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``graph_state`` output into a graph prepared the same way."""
    expected = graph_state(prepared)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        raise UserError(
            f"the QAT state in {source} does not fit this model's quantized graph ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped, e.g. "
            f"{(missing + unexpected + misshaped)[:3]}); convert with the model, image size and target it "
            "was trained for, or run `mf-edge train --qat` again."
        )
    prepared.load_state_dict(state, strict=False)


class QATModel:
    """A prepared QAT graph with the float weights it started from and its target's scheme."""

    def __init__(self, module: GraphModule, target: str, scheme: str, spec: ExportSpec,
                 start_weights: dict[str, torch.Tensor]) -> None:
        self.module, self.target, self.scheme, self.spec = module, target, scheme, spec
        self.start_weights = {k: v.detach().cpu().clone() for k, v in start_weights.items()}
        self.frozen = False

    @classmethod
    def prepare(cls, model: nn.Module, target: str, spec: ExportSpec,
                calibration: list[torch.Tensor] | None) -> QATModel:
        """Prepare ``model`` for ``target``'s int8 scheme; calibrate on ``calibration`` unless ``None``."""
        start_weights = model.state_dict()
        module, scheme = prepare_graph(model, spec, target, dynamic_batch=True)
        allow_exported_model_train_eval(module)
        if not fake_quant_modules(module):
            raise UserError(f"the {target} int8 scheme quantizes nothing in {spec.model}; QAT needs a target "
                            "whose int8 scheme has fake-quantized ops (e.g. executorch or onnx).")
        if calibration is not None:
            calibrate(module, calibration)
        return cls(module, target, scheme, spec, start_weights)

    def freeze(self) -> None:
        """Stop observer updates (scales and zero points stay as learned) and batch-norm statistics."""
        self.module.apply(disable_observer)
        freeze_batch_norm_stats(self.module)
        self.frozen = True

    def float_state(self) -> dict[str, torch.Tensor]:
        return self.start_weights

    def section(self) -> dict:
        """The checkpoint's ``"qat"`` section (see the module docstring)."""
        return {"target": self.target, "precision": PRECISION, "scheme": self.scheme,
                "image_size": self.spec.image_size, "frozen": self.frozen,
                "state": {k: v.detach().cpu().clone() for k, v in graph_state(self.module).items()}}

    def load_state(self, section: dict) -> None:
        load_graph_state(self.module, section["state"], "the --resume checkpoint")
        if section["frozen"]:
            self.freeze()


def restore_for_export(model: nn.Module, spec: ExportSpec, target: str) -> GraphModule | None:
    """The QAT-trained prepared graph if ``model``'s weights came from a QAT checkpoint, else ``None``.

    The result has frozen observers and is ready for ``convert_pt2e``; a checkpoint trained for another
    target or image size raises ``UserError``.
    """
    path = (getattr(model, "mf_edge_weights", None) or {}).get("path")
    section = read_qat_section(Path(path)) if path else None
    if section is None:
        return None
    if section["target"] != target or spec.image_size != section["image_size"]:
        raise UserError(
            f"{path} is a QAT checkpoint for --target {section['target']} at image size "
            f"{section['image_size']}; convert it with those (asked: --target {target}, image size "
            f"{spec.image_size}) or train again."
        )
    prepared, _ = prepare_graph(model, spec, target, dynamic_batch=spec.dynamic_batch)
    load_graph_state(prepared, section["state"], path)
    prepared.apply(disable_observer)
    prepared.apply(enable_fake_quant)
    return prepared
