"""What an mf-edge training checkpoint says about itself: model, class names and image size.

``mf-edge train`` writes ``best.pt``/``last.pt`` (format ``mf-edge-train/1``, see
``mf_edge.train.checkpoint``) with a ``meta`` section. Wherever such a checkpoint is given as weights
(``create_model``, ``convert``, ``calibrate``, ``bench``, ``sensitivity``, ``train --weights``), its
image size and class count are the defaults and its class names become the artifact's ``labels.txt``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from mf_edge.console import note
from mf_edge.errors import UserError

FORMAT = "mf-edge-train/1"


@dataclass(frozen=True)
class TrainedFacts:
    """The ``meta`` of a training checkpoint, as far as deployment needs it."""

    path: str
    model: str
    classes: tuple[str, ...]
    image_size: int
    qat_target: str | None = None
    started_from: str | None = None  # the weights the run started from: imagenet, random or a path
    epoch: int | None = None
    val_top1: float | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "classes": list(self.classes)}


def read_trained_facts(weights: str | Path | None) -> TrainedFacts | None:
    """The facts of the training checkpoint ``weights`` designates; ``None`` for any other weights."""
    if weights is None or str(weights) in ("random", "imagenet"):
        return None
    path = Path(weights)
    if path.suffix == ".safetensors" or not path.is_file():
        return None
    stat = path.stat()
    return _read(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int) -> TrainedFacts | None:
    import torch

    try:  # mmap: only the small meta section is actually read from disk
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours to judge: plain weights are validated by mf_edge.weights
        return None
    meta = payload.get("meta") if isinstance(payload, dict) and payload.get("format") == FORMAT else None
    if not isinstance(meta, dict) or not meta.get("classes") or not meta.get("image_size"):
        return None
    started = (meta.get("weights") or {}).get("source")
    return TrainedFacts(path, str(meta.get("model")), tuple(str(c) for c in meta["classes"]),
                        int(meta["image_size"]), meta.get("qat_target"), started, meta.get("epoch"),
                        meta.get("val_top1"))


def trained_defaults(model: str, weights: str | Path | None, image_size: int | None,
                     num_classes: int | None, quiet: bool = False) -> tuple[int | None, int | None]:
    """``(image_size, num_classes)``: the given values, else those of the training checkpoint ``weights``.

    A checkpoint trained for another zoo model is a ``UserError`` (the parameter names of some
    families coincide, so loading would succeed and silently give another network). A given image
    size that disagrees with the checkpoint's is used, with a note unless ``quiet`` (another class
    count re-initialises the classifier: ``create_model`` notes that).
    """
    facts = read_trained_facts(weights)
    if facts is None:
        return image_size, num_classes
    if facts.model != model:
        raise UserError(f"{facts.path} was trained for {facts.model}, not {model}; pass {facts.model} as "
                        "the model, or another checkpoint.")
    if image_size is not None and image_size != facts.image_size and not quiet:
        note(f"using image size {image_size}, not the {facts.image_size} px {Path(facts.path).name} was "
             "trained at")
    return image_size or facts.image_size, num_classes or len(facts.classes)
