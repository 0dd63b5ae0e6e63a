"""The project's error classes: which failures are the user's to fix and which are bugs.

A :class:`UserError` is something wrong with what the user gave (a config key, a data file, a model
directory, a checkpoint, a run directory, an argument): its message names the file (and line/field) or
the key, the value, and what was expected, so the command line prints it as one or two lines and exits
with status 2. Any other exception is a bug and keeps its traceback (``RLHF_JAX_DEBUG=1`` or ``--debug``
shows the traceback of a user error too).
"""
from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """An error in the user's input or environment that the message alone lets them fix."""


class Interrupted(UserError):
    """The run was stopped with Ctrl-C (SIGINT); ``saved_step`` is the checkpoint it can continue from
    (None when there is none)."""

    def __init__(self, message: str, out_dir: Path, saved_step: int | None):
        super().__init__(message)
        self.out_dir, self.saved_step = out_dir, saved_step
