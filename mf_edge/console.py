"""One rich console for progress and notes; ``set_quiet(True)`` silences both."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

T = TypeVar("T")
# Libraries whose import-time and export-time chatter a user cannot act on (coremltools' "Failed to load
# _MLModelProxy" on Linux and its version warnings, torch's pytree deprecation line, ...).
THIRD_PARTY_LOGGERS = ("coremltools", "torch.utils._pytree", "torch.export", "torch._export", "torchao",
                       "executorch", "onnxscript", "onnx_ir")
THIRD_PARTY_MODULES = r"(torch|torchao|torchvision|executorch|coremltools|onnx|onnxscript|onnx_ir)\b"
# Lines native runtimes write straight to file descriptor 2, with no log-level setting in their Python
# package: ExecuTorch's cpuinfo probe on CPUs it does not know (5 lines when XNNPACK first loads).
NATIVE_NOISE = re.compile(rb"^\[cpuinfo_utils\.cpp:\d+\] ")
console = Console(stderr=True)
_state = {"quiet": False, "silenced": False}


def silence_third_party() -> None:
    """Hide third-party warnings (log records below ERROR, Python warnings) that a user cannot act on.

    The CLI calls this unless ``mf-edge --verbose``; errors still show.
    """
    import logging
    import os
    import warnings

    _state["silenced"] = True
    # coremltools' conversion passes draw tqdm bars; tqdm reads TQDM_* defaults when it is imported
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=THIRD_PARTY_MODULES)


@contextmanager
def native_log_filtered() -> Iterator[None]:
    """Drop the ``NATIVE_NOISE`` lines that native code writes to stderr (fd 2) inside this block, once
    ``silence_third_party`` ran (the CLI without ``--verbose``); every other line is passed on after it."""
    if not _state["silenced"]:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            kept = [line for line in lines if not NATIVE_NOISE.match(line)]
            if kept:
                os.write(2, b"".join(kept))


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def note(message: str) -> None:
    """Print an informational line to stderr unless quiet."""
    if not _state["quiet"]:
        console.print(f"[dim]{escape(message)}[/dim]", highlight=False)


@contextmanager
def step(description: str) -> Iterator[None]:
    """A spinner with elapsed time around one long step (export, lowering, calibration...)."""
    if _state["quiet"]:
        yield
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(description, total=None)
        yield
        progress.update(task, completed=1, total=1)


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar of ``total`` units; yields ``advance(n)``. Quiet: a no-op."""
    if _state["quiet"]:
        yield lambda n: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A progress bar over ``items`` unless quiet."""
    if _state["quiet"]:
        yield from items
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        yield from progress.track(items, total=total, description=description)
