"""Errors the engine raises on purpose.

Every error a user can cause is a :class:`MapClipError` whose message names the
problem and whose ``hint`` names the fix. The CLI prints ``error: <message>``
and ``  fix: <hint>`` on one or two lines and exits with ``exit_code``; the
plugin shows the same text in its message bar.
"""
from __future__ import annotations


class MapClipError(Exception):
    """A problem with the user's input or environment, with a fix to suggest."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(MapClipError):
    """Bad arguments: a missing file, an empty prompt, an output that exists."""

    exit_code = 2


class ModelError(MapClipError):
    """A model cannot be found, downloaded or loaded."""

    exit_code = 2


class Cancelled(MapClipError):
    """The caller set the cancel flag; nothing was written."""

    exit_code = 130

    def __init__(self, message: str = "cancelled", hint: str | None = None):
        super().__init__(message, hint)
