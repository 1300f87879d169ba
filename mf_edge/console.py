"""One rich console for progress and notes; ``set_quiet(True)`` silences both."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

T = TypeVar("T")
console = Console(stderr=True)
_state = {"quiet": False}


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


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A progress bar over ``items`` unless quiet."""
    if _state["quiet"]:
        yield from items
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        yield from progress.track(items, total=total, description=description)
