"""The ``mf-edge`` command line. Each command group lives in its own module of this package."""

from __future__ import annotations

import importlib
import sys

import typer
from rich.markup import escape

from mf_edge.console import console, silence_third_party
from mf_edge.errors import UserError

app = typer.Typer(
    name="mf-edge",
    help="MetaFormer models to Core ML, ExecuTorch, ONNX and TensorRT, with parity-tested artifacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = ("models", "convert", "calibrate", "engine", "train", "bench")


def _print_version(value: bool) -> None:
    if value:
        from mf_edge import __version__

        typer.echo(f"mf-edge {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", help="Also show the warnings of the libraries "
                                 "mf-edge uses (coremltools, PyTorch, ExecuTorch, ONNX), hidden by default."),
) -> None:
    """mf-edge: convert, quantize, verify and benchmark MetaFormer classifiers for edge devices."""
    if not verbose:
        silence_third_party()


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"mf_edge.cli.{name}")


def _command():
    """The click command of ``app``; its on/off flags (``--help`` too) show no ``<bool>`` in the help."""
    command = typer.main.get_command(app)
    commands = [command]
    while commands:
        current = commands.pop()
        commands.extend(getattr(current, "commands", {}).values())
        help_option = current.get_help_option(current.context_class(current))
        for param in [*current.params, help_option]:
            if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
    return command


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning ``UserError`` into one ``error:`` line and its exit code.

    Ctrl-C exits 130 without a traceback, also while the command modules (and PyTorch) import.
    """
    try:
        _register()
        _command().main(args=argv, prog_name="mf-edge")
    except KeyboardInterrupt:
        sys.exit(130)
    except UserError as exc:
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
