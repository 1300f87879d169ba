"""Atomic publishing: artifacts are written to a temporary folder beside the output, then moved into place.

A failure or Ctrl-C before the move leaves neither the output nor the temporary folder behind; an
existing output is only replaced with ``force`` (moved aside, replaced, then deleted), and only when
mf-edge made it (it holds an mf-edge ``manifest.json``) or it is empty, never the working folder or
one of its parents. Temporary names carry the writing process's id (``.NAME.pidPID-....partial``),
so a later run of the same output removes what a killed one (SIGKILL, power loss) left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
    if output.exists():
        check_replaceable(output, _holds_manifest, "an mf-edge output folder (one holding its manifest.json)")
    parent = _existing_ancestor(output.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent} (permission denied); pass an --output in a writable "
                        "folder.")
    return output


def check_replaceable(folder: Path, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse (``UserError``) to let ``--force`` replace ``folder`` unless it is empty or ``ours(folder)``
    says mf-edge made it; the working folder and its parents are never replaced."""
    resolved, here = folder.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UserError(f"--force will not replace {folder}: it is the working folder or one of its parents; "
                        "pass an --output below it.")
    if any(folder.iterdir()) and not ours(folder):
        names = sorted(entry.name for entry in folder.iterdir())
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(f"--force only replaces {what} or an empty one; {folder} holds other files "
                        f"({shown}); move them away or pass another --output.")


def _holds_manifest(folder: Path) -> bool:
    import json

    from mf_edge.manifest import FORMAT, MANIFEST

    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def temporary_prefix(name: str) -> str:
    """The start of a temporary name for ``name`` written by this process: ``.NAME.pidPID-``."""
    return f".{name}.pid{os.getpid()}-"


def partial_file(path: Path) -> Path:
    """This process's temporary file for ``path``: ``.NAME.pidPID-.partial`` beside it."""
    return path.with_name(f"{temporary_prefix(path.name)}.partial")


def remove_stale(folder: Path, name: str) -> list[Path]:
    """Remove the temporary files and folders of ``name`` in ``folder`` left by processes that are gone."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.pid(\d+)-.*\.(partial|old)$")
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = pattern.match(entry.name)
        if match and not _alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or not ours to judge
    return True


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
        remove_stale(output.parent, output.name)
        staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(output.name), suffix=".partial",
                                        dir=output.parent))
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
    check_replaceable(output, _holds_manifest, "an mf-edge output folder (one holding its manifest.json)")
    old = Path(tempfile.mkdtemp(prefix=temporary_prefix(output.name), suffix=".old", dir=output.parent))
    os.replace(output, old / output.name)
    try:
        os.replace(staging, output)
    except BaseException:
        os.replace(old / output.name, output)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
