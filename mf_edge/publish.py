"""Atomic publishing: artifacts are written to a temporary folder beside the output, then moved into place.

A failure or Ctrl-C before the move leaves neither the output nor the temporary folder behind; an
existing output is only replaced with ``force`` (moved aside, replaced, then deleted).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mf_edge.errors import UserError


def check_output(output: Path, force: bool) -> Path:
    """Validate the output folder before any work: absent (or ``force``), a folder, parent writable."""
    output = Path(output).expanduser().absolute()
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a folder; pass another --output.")
    if output.exists() and not force:
        raise UserError(f"output folder {output} already exists; pass --force to replace it or choose "
                        "another --output.")
    parent = _existing_ancestor(output.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent} (permission denied); pass an --output in a writable "
                        "folder.")
    return output


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a folder; pass an --output under a folder.")
    return path


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def staged_output(output: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``output``; on success move it to ``output`` atomically.

    Any exception, ``KeyboardInterrupt`` included, removes the temporary folder and re-raises.
    """
    output = check_output(output, force)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the output folder follows the umask
    except OSError as exc:
        raise UserError(f"cannot create the output folder in {output.parent} ({exc.strerror}); "
                        "pass an --output in a writable folder.") from None
    try:
        yield staging
        _move_into_place(staging, output, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, output: Path, force: bool) -> None:
    if not output.exists():
        os.replace(staging, output)
        return
    if not force:
        raise UserError(f"output folder {output} appeared during the conversion; pass --force to replace it.")
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
    os.replace(output, old / output.name)
    try:
        os.replace(staging, output)
    except BaseException:
        os.replace(old / output.name, output)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
