"""What a path is, in words, so that an error about a file the user named says what is there instead."""

from __future__ import annotations

import stat
from pathlib import Path

KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a file"))


def kind_of(path: str | Path) -> str:
    """``"a file"``, ``"a folder"``, ``"a FIFO (named pipe)"``, ..., ``"a broken symbolic link"`` or
    ``"missing"`` (it does not exist)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def not_a_file(path: str | Path) -> str | None:
    """``None`` for a regular file, else why ``path`` is not one (``"does not exist"``, ``"is a folder,
    not a file"``...)."""
    kind = kind_of(path)
    if kind == "a file":
        return None
    return "does not exist" if kind == "missing" else f"is {kind}, not a file"
