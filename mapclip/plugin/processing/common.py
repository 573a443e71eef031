"""What every MapCLIP Processing algorithm shares.

The algorithms are thin: they turn Processing parameters into the same plain
values and options dataclasses the command line builds, call the same engine
function, and turn its result into Processing outputs. This module holds the
plumbing for that:

- :class:`FeedbackBridge` gives the engine its ``progress(done, total)``
  callback and its cancel flag (anything with ``is_set()``) from a
  ``QgsProcessingFeedback``, so the progress bar moves per batch and Cancel
  stops the job within one batch;
- :func:`engine_errors` turns an engine :class:`MapClipError` into a
  ``QgsProcessingException`` carrying the message and the fix;
- :func:`get_model` loads models through the plugin's cache, so batch mode and
  models that call an algorithm many times do not reload the weights every run;
- :class:`MapClipAlgorithm`, the base class (names, groups, help, icon).

Torch-heavy engine modules are imported inside ``processAlgorithm`` only, so
the provider loads (and lists its algorithms) where torch is missing.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional

from qgis.core import (QgsProcessingAlgorithm, QgsProcessingException,
                       QgsProcessingFeedback, QgsProcessingParameterDefinition,
                       QgsProcessingParameterString, QgsRasterLayer)
from qgis.PyQt.QtGui import QIcon

from ...engine.core.errors import Cancelled, MapClipError, from_foreign

ICON_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "resources", "icon.svg")

#: group id -> group name shown in the toolbox
GROUPS = {
    "search": "Search rasters",
    "archive": "Archive index",
    "training": "Training data",
}

class FeedbackBridge:
    """The engine's progress callback and cancel flag, backed by Processing feedback.

    ``start`` and ``span`` (percent) map one engine call onto part of the bar,
    for algorithms that make more than one call.
    """

    def __init__(self, feedback: Optional[QgsProcessingFeedback], start: float = 0.0,
                 span: float = 100.0):
        self.feedback = feedback
        self.start = start
        self.span = span

    def progress(self, done: int, total: int) -> None:
        if self.feedback is None:
            return
        frac = (done / total) if total else 0.0
        self.feedback.setProgress(self.start + self.span * min(max(frac, 0.0), 1.0))

    def is_set(self) -> bool:
        return bool(self.feedback is not None and self.feedback.isCanceled())


#: engine option -> the Processing parameter that sets it (errors name the parameter)
PARAMETERS = {"tile_px": "TILE", "window": "WINDOW", "stride": "STRIDE", "top_k": "TOP_K",
              "threshold": "THRESHOLD", "batch_size": "BATCH_SIZE", "bands": "BANDS",
              "read": "BANDS", "gsd": "GSD", "device": "DEVICE", "iou": "IOU", "mode": "MODE",
              "attention": "ATTENTION", "background": "BACKGROUND", "merge": "MERGE",
              "min_area": "MIN_AREA", "dense_tile_px": "TILE", "templates": "TEMPLATES",
              "epochs": "EPOCHS", "lr": "LR", "accum": "ACCUM", "val_split": "VAL_SPLIT",
              "read_workers": "READ_WORKERS", "compile": "COMPILE", "cache": "CACHE",
              "method": "METHOD", "out": "OUTPUT", "stac": "STAC", "stac_asset": "STAC_ASSET",
              "stac_bbox": "STAC_BBOX", "stac_datetime": "STAC_DATETIME",
              "stac_collection": "STAC_COLLECTIONS", "cls_token_lambda": "CLS_TOKEN_LAMBDA",
              "examples": "EXAMPLES", "examples_method": "EXAMPLES_METHOD", "raster": "RASTER",
              "marks_caption": "MARKS_CAPTION"}


def cls_token_lambda_param(name: str = "CLS_TOKEN_LAMBDA"):
    """The dense modes' class-token weight (SegEarth-OV's cls_token_lambda); empty: the mode's."""
    from qgis.core import QgsProcessingParameterNumber
    from ...engine.core.options import DEFAULT_CLS_TOKEN_LAMBDA
    modes = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_CLS_TOKEN_LAMBDA.items())
    return QgsProcessingParameterNumber(
        name, f"Dense mode: class-token weight (SegEarth-OV's cls_token_lambda; empty: the mode's, "
              f"{modes}, else 0)", QgsProcessingParameterNumber.Double, optional=True,
        minValue=-10.0, maxValue=10.0)


#: a template choice, as the Processing parameters word it
TEMPLATES_LABEL = "Prompt templates: {} (empty: the model's), one template with {{}}, or a text file of them"


def push_notes(feedback, notes) -> None:
    """A job's notes as warnings, the options named by their Processing parameter."""
    from ...engine.core.errors import renamed
    for note in notes or []:
        feedback.pushWarning(renamed(str(note), PARAMETERS.get))


def error_text(exc: MapClipError) -> str:
    """The message and the fix, with options named by their Processing parameter."""
    from ...engine.core.errors import worded
    message, hint = worded(exc, PARAMETERS.get)
    return f"{message}\nFix: {hint}" if hint else message


@contextmanager
def engine_errors() -> Iterator[None]:
    """Turn engine errors and missing packages into QgsProcessingException."""
    try:
        yield
    except Cancelled as exc:
        raise QgsProcessingException("Cancelled: nothing was written.") from exc
    except MapClipError as exc:
        raise QgsProcessingException(error_text(exc)) from exc
    except ImportError as exc:
        name = (getattr(exc, "name", None) or "").split(".")[0]
        if not name or name == __name__.split(".")[0]:
            raise  # a broken MapCLIP module is a bug, not a missing package
        from ..deps.missing import REQUIRED
        raise QgsProcessingException(
            f"MapCLIP needs the Python package '{REQUIRED.get(name, name)}', which QGIS's "
            f"Python cannot import ({exc}).\nFix: install it with Raster > MapCLIP > "
            f"Install dependencies, or with pip into QGIS's Python.") from exc
    except Exception as exc:  # noqa: BLE001 - only the user's file-system errors are caught
        error = from_foreign(exc)  # a full disk, a read-only folder, a name that is not UTF-8
        if error is None:
            raise
        raise QgsProcessingException(error_text(error)) from exc


# ------------------------------------------------------------------ models --
def get_model(spec: str, device: Optional[str] = None,
              feedback: Optional[QgsProcessingFeedback] = None):
    """The loaded model for ``spec``, through the plugin's model cache (mapclip/plugin/tasks.py),
    so the dock, the dialogs and Processing share one copy of the weights and batch
    runs load them once."""
    from ..tasks import get_model as cached_model
    spec = (spec or "").strip()
    if feedback is not None:
        feedback.pushInfo(f"Model: {spec} (device: {device or 'best available'})")
    return cached_model(spec, device or None)


def default_model() -> str:
    from ...engine.model.presets import DEFAULT_MODEL
    return DEFAULT_MODEL


# ------------------------------------------------------------------ inputs --
def split_prompts(text: str) -> List[str]:
    """Prompts typed one per line or separated by ';' (engine.core.options.split_prompts)."""
    from ...engine.core.options import split_prompts as split
    return split(text)


def parse_bands(text: str) -> Optional[List[int]]:
    """'1,2,3' -> [1, 2, 3]; empty -> None (engine.core.options.parse_bands), errors worded
    for Processing."""
    from ...engine.core.options import parse_bands as parse
    with engine_errors():
        return parse(text)


def read_workers_param(name: str) -> QgsProcessingParameterString:
    """The advanced READ_WORKERS parameter (ReadOptions.workers) of the algorithms that read
    rasters; empty is auto."""
    param = QgsProcessingParameterString(
        name, "Reader processes: auto, 0 (threads) or a number (empty: auto)", optional=True)
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return param


def read_workers_value(alg, parameters, name: str, context) -> Any:
    """READ_WORKERS as ReadOptions.workers (engine.core.options.parse_read_workers; the engine's
    check refuses anything else, naming the parameter)."""
    from ...engine.core.options import parse_read_workers
    if alg.parameterDefinition(name) is None:
        return "auto"
    return parse_read_workers(alg.parameterAsString(parameters, name, context))


def raster_path(layer: Optional[QgsRasterLayer], what: str = "raster") -> str:
    """The file (or GDAL name) behind a raster layer; non-file layers are refused with
    the fix (the algorithms that search one area render them instead)."""
    from ..render import raster_source
    if layer is None:
        raise QgsProcessingException(f"no {what} layer given\nFix: choose a raster layer or file")
    source = raster_source(layer)
    if source is not None:
        return source
    raise QgsProcessingException(
        f"layer '{layer.name()}' is not a raster file ({layer.providerType()} source)\n"
        f"Fix: export it first (Raster > Conversion > Translate) and use the GeoTIFF")


def optional_number(value: Any) -> Optional[float]:
    """Processing gives NULL/None for an empty optional number."""
    if value is None:
        return None
    try:
        from qgis.PyQt.QtCore import QVariant
        if isinstance(value, QVariant) and value.isNull():
            return None
    except ImportError:  # pragma: no cover
        pass
    return value


# -------------------------------------------------------------- algorithm --
class MapClipAlgorithm(QgsProcessingAlgorithm):
    """Base class: id, names, group, help and icon; subclasses fill in the rest."""

    ALG_NAME = ""
    DISPLAY = ""
    GROUP = "search"
    HELP = ""
    #: runs a model: torch and friends are imported in prepareAlgorithm (main thread)
    NEEDS_MODEL = True

    def prepareAlgorithm(self, parameters, context, feedback) -> bool:  # noqa: N802
        """QGIS calls this on the main thread before processAlgorithm runs in a worker
        thread: the heavy packages are imported here, never first in the worker
        (mapclip/plugin/runtime.py). A missing package is reported by processAlgorithm."""
        if self.NEEDS_MODEL:
            from .. import runtime
            try:
                runtime.preload()
            except ImportError:
                pass
        return True

    def name(self) -> str:
        return self.ALG_NAME

    def displayName(self) -> str:  # noqa: N802 (Qt names)
        return self.DISPLAY

    def group(self) -> str:
        return GROUPS[self.GROUP]

    def groupId(self) -> str:  # noqa: N802
        return self.GROUP

    def shortHelpString(self) -> str:  # noqa: N802
        return self.HELP

    def icon(self) -> QIcon:
        return QIcon(ICON_PATH)

    def createInstance(self):  # noqa: N802
        return type(self)()

    def optional_int(self, parameters, name: str, context) -> Optional[int]:
        """An optional integer parameter: None when left empty (the engine's default)."""
        if optional_number(parameters.get(name)) in (None, ""):
            return None
        return self.parameterAsInt(parameters, name, context)

    def optional_float(self, parameters, name: str, context) -> Optional[float]:
        """An optional number parameter: None when left empty (the engine's default)."""
        if optional_number(parameters.get(name)) in (None, ""):
            return None
        return self.parameterAsDouble(parameters, name, context)

    def tags(self) -> List[str]:
        return ["mapclip", "clip", "remote sensing", "deep learning"]
