"""One place for MapCLIP's messages: the log panel (tag "MapCLIP") and the message bar.

No message is ever cut where it is kept: the log panel gets every text whole
(an error's traceback too), and so does the dock's status line. The message
bar shows a text of up to MAX_BAR_TEXT characters as it is; a longer one is
shown up to a sentence or word end, with a "Show more" button that opens the
whole text (a path at its end is never lost).
"""
from __future__ import annotations

import traceback
from typing import Dict, Optional

from qgis.core import Qgis, QgsMessageLog

from ..engine.core.errors import MapClipError, worded
from .deps.verify import explain_import_error

TAG = "MapCLIP"
BAR_SECONDS = 8
#: an error stays longer than a note, then goes (it is in the log panel, whole)
ERROR_SECONDS = 30


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


#: the longest text the message bar shows as it is (longer: cut, with "Show more")
MAX_BAR_TEXT = 400
#: the name of the message-bar button that opens a text whole
SHOW_MORE = "mapclipShowMore"


def short_text(text: str, limit: int = MAX_BAR_TEXT) -> str:
    """``text`` as the message bar shows it: whole up to ``limit`` characters, else cut at
    a sentence end (else a word end) with "…"."""
    if len(text) <= limit:
        return text
    head = text[:limit - 1]
    end = max(head.rfind(". "), head.rfind("; "))
    if end < limit // 2:
        end = head.rfind(" ")
    return head[:end + 1 if end > 0 else len(head)].rstrip(" ;,:") + " …"


#: the MapCLIP error each message bar shows ({id(bar): item}): a new error replaces it
_LAST_ERROR: Dict[int, object] = {}


def _drop_last_error(bar) -> None:
    from qgis.PyQt import sip
    item = _LAST_ERROR.pop(id(bar), None)
    if item is not None and not sip.isdeleted(item) and item in bar.items():
        bar.popWidget(item)


def _push(iface, title: str, text: str, level, seconds: int, more: str = "") -> None:
    """Show ``text`` in the message bar; a long one, or one with ``more`` to it, gets a
    "Show more" button that opens the whole text (plus ``more``). An error replaces the
    previous MapCLIP error rather than stacking under it."""
    bar = _bar(iface)
    if bar is None:
        return
    whole = text + ("\n\n" + more if more else "")
    item = bar.createMessage(title, short_text(text))
    if whole != item.text():
        from qgis.PyQt.QtWidgets import QPushButton
        item.setProperty("mapclipText", whole)
        button = QPushButton("Show more", item)
        button.setObjectName(SHOW_MORE)
        button.clicked.connect(lambda: _show_whole(bar, title, whole))
        item.layout().addWidget(button)
    if level == Qgis.Critical:
        _drop_last_error(bar)
        _LAST_ERROR[id(bar)] = item
    bar.pushWidget(item, level, seconds)


def _show_whole(parent, title: str, text: str):
    from qgis.gui import QgsMessageViewer
    viewer = QgsMessageViewer(parent)
    viewer.setWindowTitle(title)
    viewer.setMessageAsPlainText(text + "\n\n(also in the log panel, tab MapCLIP)")
    viewer.show()
    return viewer


def bar_success(iface, text: str, title: str = TAG, seconds: int = BAR_SECONDS) -> None:
    info(text)
    _push(iface, title, text, Qgis.Success, seconds)


def bar_warning(iface, text: str, title: str = TAG, seconds: int = BAR_SECONDS) -> None:
    warning(text)
    _push(iface, title, text, Qgis.Warning, seconds)


def error_text(exc: BaseException, names: Optional[Dict[str, str]] = None) -> str:
    """The one line a user reads, whole: MapClipError message and fix, else type and message.

    ``names`` maps engine options to the front end's own names for them (the
    dock's field labels), so an error about ``tile_px`` speaks of "Tile size".
    """
    return _error_text(exc, names)


INSTALL_HINT = "install MapCLIP's packages: Raster > MapCLIP > Install dependencies…"


def _error_text(exc: BaseException, names: Optional[Dict[str, str]] = None) -> str:
    if isinstance(exc, ImportError):
        diagnosis = explain_import_error(exc)  # a shadowing copy, a NumPy mismatch, ...
        if diagnosis:
            return diagnosis
        name = getattr(exc, "name", None) or str(exc)
        return (f"the Python package '{name}' is missing or cannot be imported "
                f"({str(exc).strip()[:200]}); {INSTALL_HINT}")
    message = getattr(exc, "message", None)
    if message is not None:
        hint = getattr(exc, "hint", None)
        if names is not None:
            message, hint = worded(exc, names.get)
            hint = (hint or "").replace("$MAPCLIP_CACHE", "the MAPCLIP_CACHE environment variable "
                                        "(Settings > Options > System > Environment)") or None
        return f"{message} (fix: {hint})" if hint else str(message)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_user_error(exc: Optional[BaseException]) -> bool:
    """An engine MapClipError: the user's input or environment, with its fix."""
    return isinstance(exc, MapClipError)


def bar_error(iface, what: str, exc: Optional[BaseException] = None,
              details: Optional[str] = None, names: Optional[Dict[str, str]] = None) -> str:
    """Show ``what`` failed in the message bar; log the full story. Returns the text whole
    (for the dock's status line).

    The bar keeps the whole text and the details one click away ("Show more")."""
    text = what if exc is None else f"{what}: {error_text(exc, names)}"
    full = text
    if _is_user_error(exc):
        pass  # the user's input or environment: the message and its fix say it all
    elif details:
        full += "\n" + details
    elif exc is not None and exc.__traceback__ is not None:
        full += "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    critical(full)
    _push(iface, TAG, text, Qgis.Critical, ERROR_SECONDS, full[len(text):].strip())
    return text
