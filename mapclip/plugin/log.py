"""One place for MapCLIP's messages: the log panel (tag "MapCLIP") and the message bar.

Errors are shown short in the message bar and in full (traceback included) in
the log panel, so a user sees what went wrong and a developer sees where.
"""
from __future__ import annotations

import traceback
from typing import Dict, Optional

from qgis.core import Qgis, QgsMessageLog

TAG = "MapCLIP"
BAR_SECONDS = 8


def info(message: str) -> None:
    QgsMessageLog.logMessage(message, TAG, Qgis.Info)


def warning(message: str) -> None:
    QgsMessageLog.logMessage(message, TAG, Qgis.Warning)


def critical(message: str) -> None:
    QgsMessageLog.logMessage(message, TAG, Qgis.Critical)


def _bar(iface):
    if iface is None:
        return None
    try:
        return iface.messageBar()
    except Exception:  # headless runners (qgis_process) have no message bar
        return None


def bar_success(iface, text: str, title: str = TAG, seconds: int = BAR_SECONDS) -> None:
    info(text)
    bar = _bar(iface)
    if bar is not None:
        bar.pushMessage(title, text, Qgis.Success, seconds)


def bar_warning(iface, text: str, title: str = TAG, seconds: int = BAR_SECONDS) -> None:
    warning(text)
    bar = _bar(iface)
    if bar is not None:
        bar.pushMessage(title, text, Qgis.Warning, seconds)


MAX_BAR_TEXT = 400


def error_text(exc: BaseException, names: Optional[Dict[str, str]] = None) -> str:
    """The one line a user reads: MapClipError message and fix, else type and message.

    ``names`` maps engine options to the front end's own names for them (the
    dock's field labels), so an error about ``tile_px`` speaks of "Tile size".
    """
    text = _error_text(exc, names)
    return text if len(text) <= MAX_BAR_TEXT else text[:MAX_BAR_TEXT - 1] + "…"


INSTALL_HINT = "install MapCLIP's packages: Raster > MapCLIP > Install dependencies…"


def _error_text(exc: BaseException, names: Optional[Dict[str, str]] = None) -> str:
    if isinstance(exc, ImportError):
        from . import deps
        diagnosis = deps.explain_import_error(exc)  # a shadowing copy, a NumPy mismatch, ...
        if diagnosis:
            return diagnosis
        name = getattr(exc, "name", None) or str(exc)
        return (f"the Python package '{name}' is missing or cannot be imported "
                f"({str(exc).strip()[:200]}); {INSTALL_HINT}")
    message = getattr(exc, "message", None)
    if message is not None:
        hint = getattr(exc, "hint", None)
        if names is not None:
            from ..engine.core.errors import worded
            message, hint = worded(exc, names.get)
            hint = (hint or "").replace("$MAPCLIP_CACHE", "the MAPCLIP_CACHE environment variable "
                                        "(Settings > Options > System > Environment)") or None
        return f"{message} (fix: {hint})" if hint else str(message)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_user_error(exc: Optional[BaseException]) -> bool:
    """An engine MapClipError: the user's input or environment, with its fix."""
    from ..engine.core.errors import MapClipError
    return isinstance(exc, MapClipError)


def bar_error(iface, what: str, exc: Optional[BaseException] = None,
              details: Optional[str] = None, names: Optional[Dict[str, str]] = None) -> str:
    """Show ``what`` failed in the message bar; log the full story. Returns the bar text.

    The bar shows the first line in full (it wraps; a long text is not cut off) and
    keeps the details one click away ("Show more")."""
    text = what if exc is None else f"{what}: {error_text(exc, names)}"
    full = text
    if _is_user_error(exc):
        pass  # the user's input or environment: the message and its fix say it all
    elif details:
        full += "\n" + details
    elif exc is not None and exc.__traceback__ is not None:
        full += "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    critical(full)
    bar = _bar(iface)
    if bar is not None:
        if full != text:
            bar.pushMessage(TAG, text, full + "\n\n(also in the log panel, tab MapCLIP)",
                            Qgis.Critical, 0)
        else:
            bar.pushMessage(TAG, text, Qgis.Critical, 0)
    return text
