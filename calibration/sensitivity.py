"""Layer sensitivity: quantize one layer at a time and see what it does to the logits.

A *layer* is the innermost module holding an operator the target's int8 scheme quantizes (a
convolution or linear; a split depthwise convolution counts as one layer). The model is prepared as
the pipeline prepares it (deployment rewrites, then the target's ``prepare``), captured once and
calibrated once (``mf_edge.calibration``); then for each layer the scheme's quantizer is applied to
that layer alone (every other layer in ``keep_float``), the result is run on held-out images and its
logits are compared with the float graph's: SQNR in dB (``10 log10(sum(ref^2) / sum((ref - q)^2))``
over all logits), cosine (mean over images) and top-1 agreement. The ranking puts the lowest SQNR
first.

``choose_keep_float`` answers ``convert --precision int8 --max-drop X``: the fewest layers, taken
worst-first from the ranking, to keep in float so that the fully quantized model's drop is at most
``X``. The drop is measured against the float model on the evaluation images:

- ``metric="top1"`` (default): ``1 - top-1 agreement``, the fraction of images whose top-1 class
  changes (``--max-drop 0.01``: at most 1% of images change class);
- ``metric="cosine"``: ``1 - mean cosine similarity`` of the logits.

The search takes the first ``k`` layers of the ranking for growing ``k`` (1, 2, 4, ... until the
budget is met, then bisection between the last miss and the first hit), so it assumes that keeping
more of the worst layers in float does not make the drop larger; the chosen ``k`` is always one whose
measured drop meets the budget.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule

from mf_edge.calibration.schemes import matches_keep_float
from mf_edge.console import track
from mf_edge.errors import UserError
from mf_edge.parity import compare

DROP_METRICS = ("top1", "cosine")
# PT2E's quantize/dequantize operators, by name (``quantized_decomposed`` is registered by torchao).
QUANTIZE = {f"quantized_decomposed.quantize_per_{kind}" for kind in ("tensor.default", "tensor.tensor",
                                                                      "channel.default")}
DEQUANTIZE = {name.replace(".quantize", ".dequantize") for name in QUANTIZE}
QDQ = QUANTIZE | DEQUANTIZE
_aten = torch.ops.aten
# Ops a quantized output passes through and stays quantized (XNNPACK's quantizer shares the
# observer of their input with their output), so what they read is still the producing layer's.
PASS_THROUGH = {getattr(_aten, name).default for name in (
    "relu", "hardtanh", "hardtanh_", "max_pool2d", "mean", "permute", "permute_copy", "view", "view_copy",
    "reshape", "adaptive_avg_pool2d", "dropout", "clone", "contiguous")} | {
    _aten.mean.dim, _aten.transpose.int, _aten.squeeze.dim, _aten.squeeze_copy.dim, _aten.slice.Tensor,
    _aten.slice_copy.Tensor, _aten.flatten.using_ints}
EVAL_BATCH = 16
BUDGET_EVAL_IMAGES = 64  # held-out images convert --max-drop measures the drop on
RANKING_IMAGES = 16  # of which the per-layer ranking uses the first


@dataclass
class LayerEffect:
    """What quantizing one layer alone does to the logits."""

    layer: str
    sqnr_db: float
    cosine: float
    top1_agreement: float


@dataclass
class KeepFloatChoice:
    """The layers ``choose_keep_float`` keeps in float, the drop they give and how it was found."""

    keep_float: list[str]
    drop: float
    metric: str
    max_drop: float
    trials: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``candidate`` against ``reference`` in dB (inf if equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(candidate, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def drop_of(reference: np.ndarray, candidate: np.ndarray, metric: str = "top1") -> float:
    """The drop of ``candidate`` against ``reference`` logits (see the module docstring)."""
    if metric not in DROP_METRICS:
        raise UserError(f"unknown drop metric {metric!r}; choose one of {', '.join(DROP_METRICS)}.")
    metrics = compare(reference, candidate)
    return 1.0 - _or_worst(metrics["top1_agreement"] if metric == "top1" else metrics["cosine_mean"])


def _or_worst(value: float | None) -> float:
    """A similarity metric, or 0.0 (nothing shared) where NaN/inf logits left it uncomputed (``None``)."""
    return 0.0 if value is None else value


def logits(module: nn.Module, images: torch.Tensor, batch: int = EVAL_BATCH) -> np.ndarray:
    """Logits of ``module`` on ``images`` in batches, without gradients."""
    with torch.no_grad():
        return torch.cat([module(images[i:i + batch]).float() for i in range(0, len(images), batch)]).numpy()


def layer_of(module_name: str, model: nn.Module | None) -> str:
    """The layer a module belongs to: a part (``.parts.N``) of a module that ``counts_as_one_layer`` (the
    ExecuTorch target's split depthwise convolution) is that whole module."""
    if ".parts." in module_name and model is not None:
        owner = module_name.rsplit(".parts.", 1)[0]
        try:
            if getattr(model.get_submodule(owner), "counts_as_one_layer", False):
                return owner
        except AttributeError:
            pass
    return module_name


class QuantSwitch(nn.Module):
    """Follows one quantize/dequantize pair: the quantized value when on, the float one when off."""

    def __init__(self, owners: frozenset[str]) -> None:
        super().__init__()
        self.owners = owners
        self.on = True

    def forward(self, original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized if self.on else original


class QuantizedVariants:
    """The model quantized by the scheme once, with every quantize/dequantize pair switchable by layer.

    The captured graph is prepared with the scheme's quantizer for every layer, given the calibrated
    ranges and converted (``mf_edge.calibration``; weights left as float -> int8 -> float, so they
    can be switched back). Each quantize/dequantize pair belongs to the layers it feeds and to the
    layer whose output it quantizes (through activations and reshapes); ``configure`` turns on the
    pairs of the chosen layers, which computes what quantizing only those layers would compute.
    """

    def __init__(self, graph: GraphModule, scheme, observer: str, stats: dict, image_size: int,
                 model: nn.Module | None = None) -> None:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        from mf_edge.calibration.quantize import prepare_and_load

        self.graph = graph
        prepared = prepare_and_load(copy.deepcopy(graph), scheme, observer, (), stats, image_size)
        self.module = convert_pt2e(prepared, fold_quantize=False)
        self.switches: list[QuantSwitch] = []
        self.layers: list[str] = []
        self._install_switches(model)

    def _install_switches(self, model: nn.Module | None) -> None:
        from mf_edge.calibration.schemes import GEMMS, has_trained_weight, module_names

        graph = self.module.graph

        def layer(node) -> str | None:  # a norm's statistics (a buffer weight) are no layer
            if node.op == "call_function" and node.target in GEMMS and has_trained_weight(node):
                names = module_names(node)
                return layer_of(names[-1], model) if names else node.name
            return None

        def upstream_layer(node) -> str | None:
            while node.op == "call_function" and (node.target in PASS_THROUGH or str(node.target) in QDQ):
                node = node.args[0]
            return layer(node)

        for node in graph.nodes:
            name = layer(node)
            if name is not None and name not in self.layers and any(
                    str(getattr(arg, "target", "")) in DEQUANTIZE for arg in node.args):
                self.layers.append(name)
        # one switch per use of a dequantized value: PT2E shares a quantized output among all its readers
        # (activations and reshapes pass it on), so each reader is quantized for its own reasons
        uses = [(q, dq, user) for q in graph.nodes if q.op == "call_function" and str(q.target) in QUANTIZE
                for dq in list(q.users) if str(dq.target) in DEQUANTIZE for user in list(dq.users)]
        owners = [{upstream_layer(q.args[0]), layer(user)} - {None} for q, dq, user in uses]
        for index, ((q, dq, user), owned) in enumerate(zip(uses, owners, strict=True)):
            switch = QuantSwitch(frozenset(owned))
            self.module.add_submodule(f"quant_switch_{index}", switch)
            with graph.inserting_before(user):
                node = graph.call_module(f"quant_switch_{index}", (q.args[0], dq))
            user.replace_input_with(dq, node)
            self.switches.append(switch)
        self.module.recompile()

    def configure(self, quantized: Iterable[str], others: bool) -> GraphModule:
        """Quantize the ``quantized`` layers (and, with ``others``, the pairs no layer owns); the module."""
        chosen = set(quantized)
        for switch in self.switches:
            switch.on = bool(switch.owners & chosen) if switch.owners else others
        return self.module

    def only(self, layer: str) -> GraphModule:
        """Only ``layer`` quantized."""
        return self.configure([layer], others=False)

    def keeping_float(self, keep_float: Iterable[str]) -> GraphModule:
        """Everything quantized except the layers matching the ``keep_float`` patterns."""
        patterns = tuple(keep_float)
        return self.configure([name for name in self.layers if not matches_keep_float(name, patterns)],
                              others=True)


def layer_sensitivity(variants: QuantizedVariants, layers: list[str], images: torch.Tensor,
                      reference: np.ndarray | None = None) -> list[LayerEffect]:
    """Each layer quantized alone, run on ``images``, against the float graph: worst (lowest SQNR) first."""
    reference = logits(variants.graph, images) if reference is None else reference
    effects = []
    for layer in track(layers, "layer sensitivity", total=len(layers)):
        candidate = logits(variants.only(layer), images)
        metrics = compare(reference, candidate)
        effects.append(LayerEffect(layer, sqnr_db(reference, candidate), _or_worst(metrics["cosine_mean"]),
                                   _or_worst(metrics["top1_agreement"])))
    return sorted(effects, key=lambda effect: effect.sqnr_db)


def smallest_prefix(meets: Callable[[int], bool], count: int) -> int | None:
    """The smallest ``k`` in ``0..count`` with ``meets(k)``, by doubling then bisection; ``None`` if none.

    Assumes ``meets`` is monotone (false up to some ``k``, true from there on).
    """
    if meets(0):
        return 0
    low, high = 0, 1  # meets(low) is False
    while not meets(min(high, count)):
        if high >= count:
            return None
        low, high = high, high * 2
    high = min(high, count)
    while high - low > 1:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle
    return high


def choose_keep_float(variants: QuantizedVariants, ranking: list[str], images: torch.Tensor, max_drop: float,
                      metric: str = "top1", keep_float: Iterable[str] = (),
                      reference: np.ndarray | None = None) -> KeepFloatChoice:
    """The fewest worst-ranked layers to keep in float (on top of ``keep_float``) for a drop <= ``max_drop``.

    ``ranking`` is worst first (``layer_sensitivity``); the drop is measured on ``images`` against
    the float graph (see the module docstring for the metrics and the search).
    """
    if max_drop < 0:
        raise UserError(f"--max-drop must be 0 or more, got {max_drop}.")
    drop_of(np.zeros((1, 2)), np.zeros((1, 2)), metric)  # checks the metric name
    reference = logits(variants.graph, images) if reference is None else reference
    base = list(keep_float)
    trials: dict[int, float] = {}

    def drop_with(k: int) -> float:
        if k not in trials:
            trials[k] = drop_of(reference, logits(variants.keeping_float(base + ranking[:k]), images), metric)
        return trials[k]

    k = smallest_prefix(lambda k: drop_with(k) <= max_drop, len(ranking))
    if k is None:
        worst = drop_with(len(ranking))
        raise UserError(f"even with every quantized layer in float the {metric} drop is {worst:.4f} > "
                        f"--max-drop {max_drop}; raise the budget or use a float precision.")
    return KeepFloatChoice(base + ranking[:k], trials[k], metric, max_drop,
                           [{"kept": n, "drop": d} for n, d in sorted(trials.items())])


def budget_keep_float(variants: QuantizedVariants, images: torch.Tensor, max_drop: float,
                      keep_float: Iterable[str] = (),
                      metric: str = "top1") -> tuple[KeepFloatChoice, list[LayerEffect]]:
    """``--max-drop`` in one call: rank the layers ``keep_float`` does not already cover, then choose.

    What ``quantize_for_export`` calls with its captured graph and statistics (``variants``) and the
    images to measure the drop on.
    """
    patterns = tuple(keep_float)
    layers = [layer for layer in variants.layers if not matches_keep_float(layer, patterns)]
    reference = logits(variants.graph, images)
    effects = layer_sensitivity(variants, layers, images, reference)
    choice = choose_keep_float(variants, [effect.layer for effect in effects], images, max_drop, metric,
                               patterns, reference)
    return choice, effects


def keep_float_for_budget(graph: GraphModule, spec, scheme, observer: str, stats: dict, opts,
                          model: nn.Module | None = None,
                          eval_size: int = BUDGET_EVAL_IMAGES) -> tuple[tuple[str, ...], dict]:
    """``convert --max-drop``: the ``keep_float`` patterns meeting ``opts.max_drop``, and manifest facts.

    Called by ``quantize_for_export`` with its captured graph and calibration statistics. The drop is
    measured on ``eval_size`` images of ``opts.calib_data`` that follow the calibration sample (held
    out from it); layers are ranked on the first ``RANKING_IMAGES`` of them. ``model`` (the prepared
    float model) groups the pieces of one module, as ``mf-edge sensitivity`` does.
    """
    from mf_edge.calibration.data import load_calibration_set

    if not opts.calib_data:
        raise UserError("--max-drop measures the drop on images: pass --calib-data DIR (a calibration file "
                        "alone has no images to measure on).")
    sample = load_calibration_set(opts.calib_data, spec.preprocessing, opts.calib_size + eval_size, opts.seed,
                                  opts.cache_dir)
    images = sample.images[opts.calib_size:]
    if len(images) == 0:
        raise UserError(f"--max-drop needs images beyond the {opts.calib_size} calibration images of "
                        f"{opts.calib_data}; pass a larger folder or a smaller --calib-size.")
    variants = QuantizedVariants(graph, scheme, observer, stats, spec.image_size, model)
    patterns = tuple(opts.keep_float)
    layers = [layer for layer in variants.layers if not matches_keep_float(layer, patterns)]
    ranking = [effect.layer for effect in layer_sensitivity(variants, layers, images[:RANKING_IMAGES])]
    choice = choose_keep_float(variants, ranking, images, opts.max_drop, "top1", patterns)
    facts = {**choice.to_dict(), "evaluation_images": len(images), "ranking": ranking}
    return tuple(choice.keep_float), facts
