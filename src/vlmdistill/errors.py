"""The one root of every error whose message is the whole story for a user.

Each such error names the file or key at fault and the fix. The CLI catches ``VlmdistillError`` alone and
prints its message as one line with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VlmdistillError(Exception):
    """Bad input or a run that cannot go on: the message names what and how to fix it."""


class RunError(VlmdistillError, RuntimeError):
    """A run directory that cannot be used as asked; the message says what is missing."""
