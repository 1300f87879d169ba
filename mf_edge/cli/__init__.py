"""The ``mf-edge`` command line. Each command group lives in its own module of this package."""

from __future__ import annotations

import importlib
import sys

import typer
from rich.markup import escape

from mf_edge.console import console
from mf_edge.errors import UserError

app = typer.Typer(
    name="mf-edge",
    help="MetaFormer models to Core ML, ExecuTorch, ONNX and TensorRT, with parity-tested artifacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = ("models", "convert", "calibrate", "engine", "train", "bench")


@app.callback()
def root() -> None:
    """mf-edge: convert, quantize, verify and benchmark MetaFormer classifiers for edge devices."""


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"mf_edge.cli.{name}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning ``UserError`` into one ``error:`` line and its exit code.

    Ctrl-C exits 130 without a traceback, also while the command modules (and PyTorch) import.
    """
    try:
        _register()
        app(args=argv, prog_name="mf-edge")
    except KeyboardInterrupt:
        sys.exit(130)
    except UserError as exc:
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
