"""The ``mf-edge`` command line. Each command group lives in its own module of this package; the typer
app is in ``mf_edge.cli.application``.

This module imports nothing heavy (no typer, rich or PyTorch): the console script imports it before
``main`` runs, outside any Ctrl-C handling.
"""

from __future__ import annotations

import sys


def __getattr__(name: str):
    """``from mf_edge.cli import app`` (the command modules do) without importing typer here."""
    if name == "app":
        from mf_edge.cli.application import app

        return app
    raise AttributeError(f"module 'mf_edge.cli' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning ``UserError`` into one ``error:`` line and its exit code.

    Ctrl-C exits 130 without a traceback, also while typer, rich, the command modules and PyTorch import.
    """
    from mf_edge.errors import UserError

    try:
        from mf_edge.cli.application import build_command, verbose_first

        args = verbose_first(sys.argv[1:] if argv is None else list(argv))
        build_command().main(args=args, prog_name="mf-edge")
    except KeyboardInterrupt:
        sys.exit(130)
    except UserError as exc:
        from rich.markup import escape

        from mf_edge.console import console

        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
