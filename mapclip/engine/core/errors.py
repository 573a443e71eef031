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

    def __init__(self, message: str, hint: str | None = None, option: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        #: the engine option (a field of an engine.core.options value) the error is about;
        #: front ends word the fix with their own name for it (CLI flag, dock field)
        self.option = option

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


#: Engine messages name options as the command line does (``--tile``);
#: these are the options whose flag is not ``--`` + the name in kebab case.
FLAGS = {"classes": "--class", "tile_px": "--tile", "dense_tile_px": "--dense-tile", "stride_px": "--stride",
         "scales": "--scale", "read": "--bands", "negative": "--negative", "background": "--background",
         "cache": "--no-cache", "dense_input_px": "--dense-input"}


def flag(option: str) -> str:
    """The command-line flag that sets an engine option."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def worded(exc: MapClipError, name_of) -> "tuple[str, str | None]":
    """The error's message and fix with options named as a front end names them.

    ``name_of(option)`` gives the front end's name for an engine option (the
    CLI's ``--tile``, the dock's "Tile size", a Processing parameter), or None
    where it has none. The engine's checks start their message with the
    option's name (engine.core.options.check), so that name is replaced; a fix that
    does not mention the option gets the name in front. Command-line flags that
    engine messages mention (``--bands 4,3,2``) are replaced by the front end's
    name for the same option where it has one.
    """
    option = getattr(exc, "option", None)
    message, hint = exc.message, exc.hint
    if option:
        name = name_of(option) or option
        if message.startswith(option):
            message = name + message[len(option):]
        elif message.startswith(f"unknown {option} "):
            message = f"unknown {name} " + message[len(f"unknown {option} "):]
        if hint and name not in hint:
            hint = f"{name}: {hint}"
    return renamed(message, name_of), renamed(hint, name_of)


def renamed(text, name_of):
    """``text`` (an engine message or note) with the command-line flags it mentions
    (``--read-workers 0``) replaced by a front end's names for the same options
    (``name_of(option)``, as in :func:`worded`); flags it has no name for stay."""
    import re
    if not text:
        return text
    options_of_flags = {v: k for k, v in FLAGS.items()}

    def swap(match):
        flag_text = match.group(0)
        name = name_of(options_of_flags.get(flag_text, flag_text[2:].replace("-", "_")))
        return name if name else flag_text
    return re.sub(r"--[a-z][a-z-]*", swap, text)


def reason(exc: BaseException, limit: int = 240) -> str:
    """The cause of a foreign exception as one clean clause for an error message:
    terminal colour codes removed, whitespace folded, cut at a sentence end
    (else a word end, with "...") so that a message never stops mid-sentence."""
    import re
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc))
    text = " ".join(text.split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = max(head.rfind(". "), head.rfind("; "))
    if end >= limit // 3:
        return head[:end + 1].rstrip(";")
    return head[:head.rfind(" ")].rstrip(",;:") + " ..."


#: errno values of the user's files and disks: reported with a fix, never a traceback
USER_ERRNOS = frozenset({"EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOENT", "ENOTDIR",
                         "EISDIR", "EEXIST", "EXDEV", "ENAMETOOLONG", "ELOOP", "EIO"})
#: errno values a write can fail with that mean the disk is full
_FULL = ("ENOSPC", "EDQUOT")
#: the other write failures a library may state only in its message
_WRITE = ("EROFS", "EACCES")
#: fixes for a failed file-system call, by errno name (the rest get the generic one)
_FS_FIXES = {name: "free disk space (or write to another disk) and run again; nothing was "
                   "left half-written" for name in _FULL}
_FS_FIX = "check the path, its permissions and the free disk space, then run again"


def _errno_named(exc: BaseException) -> "str | None":
    """The errno name of an OSError, or the one a library's write error states only
    in its text (GDAL through pyogrio or rasterio, safetensors, numpy: they lose
    the errno), or None."""
    import errno
    import os
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(code, int):
        return errno.errorcode.get(code)
    text = str(exc)
    if "disk is full" in text:  # SQLite's words (GeoPackage writes through GDAL)
        return "ENOSPC"
    for name in _FULL + _WRITE:
        value = getattr(errno, name, None)
        if value is not None and os.strerror(value) in text:
            return name
    return None


def is_utf8(text: str) -> bool:
    """False for text holding bytes that are not UTF-8 (Python keeps them as
    surrogates in file names and command-line arguments)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def not_utf8(name: "str | bytes") -> UsageError:
    """The error for a file name that is not valid UTF-8 (shown with its bad bytes escaped)."""
    if isinstance(name, str):
        name = name.encode("utf-8", "surrogateescape")
    shown = bytes(name).decode("utf-8", "backslashreplace")
    return UsageError(f"the file name '{shown}' is not valid UTF-8",
                      "rename the file or folder to a UTF-8 name (GDAL, the reports and the "
                      "manifests need one) and run again")


def from_foreign(exc: BaseException) -> "MapClipError | None":
    """The :class:`MapClipError` for an exception a library raised about the
    user's files (a disk that is full, a folder that is read-only, a file name
    that is not UTF-8), or None for anything else (a bug keeps its traceback)."""
    if isinstance(exc, UnicodeError) and "surrogates not allowed" in str(exc):
        text, i = getattr(exc, "object", ""), getattr(exc, "start", 0)
        if isinstance(text, str):  # the name alone, from the line being written
            cuts = ',;"\n\t'
            lo = max(text.rfind(c, 0, i) for c in cuts) + 1
            hi = min([j for j in (text.find(c, i) for c in cuts) if j >= 0] or [len(text)])
            text = text[lo:hi]
        return not_utf8(text)
    if not isinstance(exc, Exception):
        return None
    name = _errno_named(exc)
    if name not in USER_ERRNOS:
        return None
    where = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    what = (exc.strerror if isinstance(exc, OSError) and exc.strerror else reason(exc))
    return MapClipError(f"{what}" + (f": {where}" if where else ""), _FS_FIXES.get(name, _FS_FIX))
