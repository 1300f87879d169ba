"""Training checkpoints: one ``torch.save`` file, readable with ``weights_only=True``, written atomically.

Layout (``FORMAT``)::

    {"format": "mf-edge-train/1",
     "model": {name: tensor},      # weights to deploy, official layout (EMA weights with --ema)
     "qat": None | {...},          # QAT only: see mf_edge.train.qat (target, scheme, observer states)
     "meta": {...},                # model name, classes, image size, epoch, accuracy
     "train": {...}}               # resume only: optimiser, scheduler, scaler, EMA, history and the
                                   # RNG states of every process

``mf_edge.weights.read_state_dict`` unwraps ``"model"``, so ``--weights CKPT`` loads the weights anywhere.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from mf_edge.calibration.qat import read_qat_section  # noqa: F401  (re-exported)
from mf_edge.checkpoint_facts import FORMAT
from mf_edge.console import note
from mf_edge.errors import UserError
from mf_edge.paths import not_a_file
from mf_edge.publish import partial_file

LAST = "last.pt"
BEST = "best.pt"


def capture_rng() -> dict:
    """The state of every random generator a training step may draw from."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rng(state: dict) -> None:
    """Put every generator back where ``capture_rng`` found it."""
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    restore_cuda_rng(state["cuda"])


def restore_cuda_rng(states: list[torch.Tensor]) -> None:
    """Put back the CUDA generators of the GPUs this host has; say so when the checkpoint holds more."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, rng in enumerate(states[:count]):
        torch.cuda.set_rng_state(rng, index)
    if len(states) > count:
        note(f"the checkpoint holds the CUDA random state of {len(states)} GPU(s) and this host has {count}: "
             f"restored {min(count, len(states))}, so CUDA random draws may differ from an uninterrupted run")


def save_checkpoint(payload: dict, path: Path) -> Path:
    """Write ``payload`` to a temporary file beside ``path`` and move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_file(path)
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by ``save_checkpoint``; anything else raises ``UserError``."""
    from mf_edge.weights import load_weights_only

    path = Path(path)
    problem = not_a_file(path)
    if problem:
        raise UserError(f"checkpoint {path} {problem}; pass the last.pt of an earlier run to --resume.")
    payload = load_weights_only(path, "pass another checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not an mf-edge training checkpoint ({FORMAT}); "
                        "to start from plain weights use --weights instead of --resume.")
    return payload
