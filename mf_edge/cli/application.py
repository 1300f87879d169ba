"""The typer app of ``mf-edge``: the root options and the click command built from the command modules."""

from __future__ import annotations

import importlib

import typer

from mf_edge.console import silence_third_party

app = typer.Typer(
    name="mf-edge",
    help="MetaFormer models to Core ML, ExecuTorch, ONNX and TensorRT, with parity-tested artifacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = ("models", "convert", "calibrate", "engine", "train", "bench")
VERBOSE_HELP = ("Also show the warnings of the libraries mf-edge uses (coremltools, PyTorch, ExecuTorch, "
                "ONNX), hidden by default. Works before or after the command name.")


def _print_version(value: bool) -> None:
    if value:
        from mf_edge import __version__

        typer.echo(f"mf-edge {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """mf-edge: convert, quantize, verify and benchmark MetaFormer classifiers for edge devices."""
    if not verbose:
        silence_third_party()


def register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"mf_edge.cli.{name}")


def verbose_first(argv: list[str]) -> list[str]:
    """``--verbose`` anywhere before ``--`` moved in front of the command name, so that
    ``mf-edge convert ... --verbose`` means ``mf-edge --verbose convert ...``."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--verbose" not in argv[:end]:
        return argv
    return ["--verbose", *[arg for arg in argv[:end] if arg != "--verbose"], *argv[end:]]


def _hide_bool_metavars(command) -> None:
    """On/off flags (``--help`` too) show no ``<bool>`` in the help."""
    commands = [command]
    while commands:
        current = commands.pop()
        commands.extend(getattr(current, "commands", {}).values())
        help_option = current.get_help_option(current.context_class(current))
        for param in [*current.params, help_option]:
            if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""


def build_command():
    """The click command of ``app`` with every command module registered."""
    register_commands()
    command = typer.main.get_command(app)
    _hide_bool_metavars(command)
    return command
