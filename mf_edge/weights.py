"""Weights: find them (Hugging Face Hub cache or a path), read them, map their layout, load them.

Two layouts are understood: the official ``sail-sg/metaformer`` one (the contract of this package's
parameter names) and timm's ``metaformer.py`` one, which ``mf_edge.layouts`` translates.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mf_edge.console import note
from mf_edge.errors import UserError
from mf_edge.layouts import detect_layout, official_to_timm, timm_to_official
from mf_edge.models.zoo import ModelInfo
from mf_edge.paths import not_a_file
from mf_edge.publish import partial_file

StateDict = dict[str, torch.Tensor]


def cache_dir() -> Path:
    """Where downloaded checkpoints live (``$MF_EDGE_CACHE``, else the Hugging Face Hub cache)."""
    env = os.environ.get("MF_EDGE_CACHE")
    if env:
        return Path(env)
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def hub_sources(info: ModelInfo) -> list[tuple[str, str]]:
    """``(repo_id, filename)`` of ``info``'s ImageNet weights: the official file, then timm's copy."""
    sources = [(info.hub_repo, info.hub_file)] if info.hub_file else []
    if info.timm_hub_id:
        sources.append((f"timm/{info.timm_hub_id}", "model.safetensors"))
    return sources


def download_official(info: ModelInfo) -> Path:
    """Fetch ``info``'s checkpoint through huggingface_hub: the cache first, then the Hub.

    The official file is preferred, timm's safetensors is the fallback. ``HF_ENDPOINT`` (a mirror)
    is honoured when set. Offline with nothing cached, raises one ``UserError`` naming
    ``--weights PATH`` and ``--weights random``.
    """
    from huggingface_hub import hf_hub_download

    sources = hub_sources(info)
    if not sources:
        raise UserError(f"{info.name} has no published ImageNet weights (a registered model): "
                        "pass --weights PATH or --weights random")
    for repo_id, filename in sources:  # a cached copy needs no network at all
        try:
            return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir(), local_files_only=True))
        except (OSError, ValueError):
            continue
    errors = []
    for repo_id, filename in sources:
        try:
            path = hf_hub_download(repo_id, filename, cache_dir=cache_dir(),
                                   endpoint=os.environ.get("HF_ENDPOINT") or None)
        except (OSError, ValueError) as exc:  # offline, no route, missing file, refused
            errors.append(f"{repo_id}/{filename}: {type(exc).__name__}")
            continue
        note(f"downloaded {repo_id}/{filename} into {cache_dir()}")
        return Path(path)
    raise UserError(
        f"could not download the ImageNet weights of {info.name} ({'; '.join(errors)}). "
        f"Download {info.official_url} yourself and pass --weights PATH, or use --weights random."
    )


WEIGHTS_FIX = "download it again or pass another file to --weights"


def read_state_dict(path: str | Path) -> StateDict:
    """Read a ``.safetensors`` or ``.pth`` checkpoint, unwrapping ``model`` / ``state_dict`` wrappers."""
    path = Path(path)
    problem = not_a_file(path)
    if problem:
        raise UserError(f"checkpoint {path} {problem}; pass an existing file to --weights.")
    if path.suffix == ".safetensors":
        try:
            obj = load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError, ...
            raise _corrupt(path, exc, WEIGHTS_FIX) from None
    else:
        obj = load_weights_only(path, WEIGHTS_FIX)
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no state dict of tensors; is it a MetaFormer checkpoint?")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights_only(path: Path, fix: str) -> object:
    """``torch.load(path, weights_only=True)``; any failure is a ``UserError`` ending with ``fix``.

    A pickle that asks to call a function (``__reduce__``: it could run any code) is refused by
    PyTorch's weights-only unpickler before anything runs; the message says so, not "corrupt".
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        called = re.search(r"GLOBAL ([\w.]+)", str(exc))  # the refused call; garbage fails otherwise
        if called:
            raise UserError(
                f"checkpoint {path} is not a weights-only checkpoint: unpickling it would call "
                f"{called.group(1)} (code it could run), so it was "
                "refused for safety and never unpickled; save only the tensors "
                "(torch.save(model.state_dict(), path), or .safetensors) and pass that file.") from None
        raise _corrupt(path, exc, fix) from None
    except Exception as exc:  # a damaged pickle can fail in any way (KeyError, struct.error, ...)
        raise _corrupt(path, exc, fix) from None


def _corrupt(path: Path, exc: Exception, fix: str) -> UserError:
    return UserError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:120]}); "
                     f"{fix}.")


def to_official_layout(state_dict: StateDict) -> StateDict:
    """Return ``state_dict`` in the official layout, translating timm's names if needed."""
    return timm_to_official(state_dict) if detect_layout(state_dict) == "timm" else dict(state_dict)


def checkpoint_num_classes(state_dict: StateDict) -> int | None:
    """Number of classes of an official-layout state dict's classifier, if it has one."""
    for key in ("head.fc2.weight", "head.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return None


def check_compatible(model: nn.Module, state_dict: StateDict, source: str) -> None:
    """Raise ``UserError`` naming missing, unexpected and mis-shaped keys, if any."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    if not (missing or unexpected or misshaped):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
            parts.append(f"{len(keys)} {label}: {shown}")
    hint = _random_matrix_hint(state_dict, misshaped) or (
        "Is it for another model? Check the model name or pass the matching checkpoint.")
    raise UserError(f"checkpoint {source} does not fit this architecture ({'; '.join(parts)}). {hint}")


def _random_matrix_hint(state_dict: StateDict, misshaped: list[str]) -> str | None:
    """For RandFormer matrices of another token count: the image size the checkpoint was made for."""
    for entry in misshaped:
        key = entry.split()[0]
        match = re.match(r"^stages\.(\d+)\..*random_matrix$", key)
        if match:
            side = math.isqrt(state_dict[key].shape[0]) * 2 ** (int(match.group(1)) + 2)
            return (f"RandFormer's frozen random_matrix is sized by the token count: this checkpoint needs "
                    f"image_size={side} (--image-size {side}).")
    return None


def resolve_weights(info: ModelInfo, weights: str | Path) -> Path | None:
    """The checkpoint file that ``weights`` designates (``None`` for ``"random"``)."""
    if str(weights) == "random":
        return None
    if str(weights) == "imagenet":
        return download_official(info)
    return Path(weights)


class Checkpoint(NamedTuple):
    """A checkpoint read from disk, translated to the official layout."""

    state_dict: StateDict
    path: Path
    layout: str  # the layout the file was written in: "official" or "timm"


def load_checkpoint(info: ModelInfo, weights: str | Path) -> Checkpoint:
    """Read the checkpoint ``weights`` designates (``"imagenet"`` or a path), in the official layout."""
    path = resolve_weights(info, weights)
    if path is None:
        raise ValueError("random weights have no checkpoint")
    state_dict = read_state_dict(path)
    layout = detect_layout(state_dict)
    return Checkpoint(to_official_layout(state_dict), path, layout)


def load_into(model: nn.Module, state_dict: StateDict, source: str) -> None:
    """Strictly load an official-layout ``state_dict`` into ``model`` after checking every key.

    The tensors are assigned, so ``model`` may be built on the ``meta`` device; floats become float32.
    """
    check_compatible(model, state_dict, source)
    model.load_state_dict({k: _own_storage(v) for k, v in state_dict.items()}, strict=True, assign=True)
    note(f"loaded weights from {source}")


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as float32 in 64-byte aligned memory, copied only when it is not already.

    safetensors hands out views into one file buffer at arbitrary offsets; kernels take other code
    paths on unaligned data and the logits then move in the last bit from one load to the next.
    """
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        return tensor.float()
    return tensor.clone() if tensor.data_ptr() % 64 else tensor


def save_state_dict(model: nn.Module, path: str | Path, layout: str = "official") -> Path:
    """Save ``model``'s weights in the ``official`` or ``timm`` layout (``.safetensors`` or ``.pth``)."""
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if layout == "timm":
        state = official_to_timm(state)
    elif layout != "official":
        raise UserError(f"unknown layout {layout!r}; use 'official' or 'timm'.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_file(path)
    if path.suffix == ".safetensors":
        save_file(state, str(tmp))
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (or of every file under a folder, in sorted order)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()
