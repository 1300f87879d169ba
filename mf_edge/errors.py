"""User-facing errors: one clear line that says what went wrong and how to fix it."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad name, path, shape, file, missing runtime).

    The CLI prints ``error: <message>`` and exits with ``exit_code``, never a traceback.
    """

    exit_code = 2


class RuntimeUnavailable(UserError):
    """A runtime this host lacks (Core ML off macOS, TensorRT without an NVIDIA GPU)."""

    exit_code = 3


class ParityFailure(UserError):
    """An artifact computed something other than the float model, beyond the thresholds."""

    exit_code = 4
