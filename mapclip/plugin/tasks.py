"""QgsTask wrappers around engine jobs.

:class:`EngineTask` runs any callable ``fn(progress, cancel)`` in QGIS's task
manager (a worker thread) and bridges the engine's job protocol to QgsTask:

- ``progress(done, total)`` from the engine becomes ``setProgress`` (percent)
  plus the :attr:`EngineTask.stepped` signal (done, total) for rate displays;
- ``cancel()`` (the task manager's cancel button or ours) sets a
  ``threading.Event`` that the engine polls once per batch through
  ``engine.core.jobs.Job``, so a run stops within one batch;
- the result or the exception is delivered in ``finished()``, which QGIS calls
  on the main thread: that is where layers are created. A cancelled run calls
  only ``on_cancel``; an exception calls ``on_error`` (default: a message-bar
  error with the traceback in the log panel, tag "MapCLIP").

Dialogs and the Processing provider reuse :class:`EngineTask` for their jobs.
"""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from qgis.core import QgsApplication, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from . import log, runtime

ProgressFn = Callable[[int, int], None]
JobFn = Callable[[ProgressFn, threading.Event], Any]

#: tasks alive in the task manager; QGIS holds no Python reference to them
_RUNNING: "set[EngineTask]" = set()


def _is_cancelled_error(exc: BaseException) -> bool:
    from ..engine.core.errors import Cancelled
    return isinstance(exc, Cancelled)


class EngineTask(QgsTask):
    """Run ``fn(progress, cancel)`` in a worker thread; deliver results on the main thread."""

    stepped = pyqtSignal(int, int)  # done, total; emitted from the worker thread
    previewed = pyqtSignal(object, int, int)  # boxes so far, done, total; from the worker thread

    def __init__(self, description: str, fn: JobFn,
                 on_done: Optional[Callable[[Any], None]] = None,
                 on_error: Optional[Callable[[BaseException, str], None]] = None,
                 on_cancel: Optional[Callable[[], None]] = None,
                 iface=None, can_cancel: bool = True):
        flags = QgsTask.CanCancel if can_cancel else QgsTask.Flags()
        super().__init__(description, flags)
        self._fn = fn
        self.on_done = on_done
        self.on_error = on_error
        self.on_cancel = on_cancel
        self.iface = iface
        self.cancel_event = threading.Event()
        self.result: Any = None
        self.exception: Optional[BaseException] = None
        self.details: str = ""
        self.started_at: Optional[float] = None
        self.seconds: float = 0.0
        self.done_units = 0
        self.total_units = 0
        self.outcome: Optional[str] = None  # "done" | "error" | "cancelled", set in finished()

    # -- worker thread -----------------------------------------------------
    def run(self) -> bool:  # noqa: D401 (QGIS's name)
        self.started_at = time.perf_counter()
        try:
            if self.cancel_event.is_set():
                return False
            self.result = self._fn(self._progress, self.cancel_event)
            return not self.cancel_event.is_set()
        except BaseException as exc:  # noqa: BLE001 - everything goes to finished()
            if not (_is_cancelled_error(exc) or self.cancel_event.is_set()):
                self.exception = exc
                self.details = traceback.format_exc()
            return False
        finally:
            self.seconds = time.perf_counter() - self.started_at

    def _progress(self, done: int, total: int) -> None:
        self.done_units, self.total_units = int(done), int(total)
        if total:
            self.setProgress(100.0 * min(done, total) / total)
        self.stepped.emit(int(done), int(total))

    def rate(self) -> float:
        """Units (tiles, images, steps) per second so far."""
        if not self.started_at:
            return 0.0
        elapsed = time.perf_counter() - self.started_at
        return self.done_units / elapsed if elapsed > 0 else 0.0

    # -- any thread --------------------------------------------------------
    def cancel(self) -> None:
        self.cancel_event.set()
        super().cancel()

    # -- main thread -------------------------------------------------------
    def finished(self, ok: bool) -> None:  # noqa: D401 (QGIS's name)
        try:
            if ok:
                self.outcome = "done"
                if self.on_done is not None:
                    self.on_done(self.result)
            elif self.exception is not None:
                self.outcome = "error"
                if self.on_error is not None:
                    self.on_error(self.exception, self.details)
                else:
                    log.bar_error(self.iface, f"{self.description()} failed", self.exception,
                                  self.details)
            else:
                self.outcome = "cancelled"
                log.info(f"{self.description()}: cancelled")
                if self.on_cancel is not None:
                    self.on_cancel()
        except Exception as exc:  # a failing callback must not take QGIS down
            self.outcome = "error"
            self.exception = exc
            log.bar_error(self.iface, f"{self.description()}: showing the result failed", exc,
                          traceback.format_exc())
        finally:
            _RUNNING.discard(self)

    @property
    def is_finished(self) -> bool:
        return self.outcome is not None


def start(task: EngineTask) -> EngineTask:
    """Hand ``task`` to QGIS's task manager and keep it alive until it finishes.

    Called on the main thread: the heavy packages are imported here first
    (mapclip/plugin/runtime.py), so no worker thread imports torch for the first time.
    A package that cannot be imported is left for the job to report (jobs that
    need no torch, such as de-duplication, still run).
    """
    try:
        runtime.preload()
    except ImportError as exc:
        log.warning(f"packages not loaded before '{task.description()}': {exc}")
    _RUNNING.add(task)
    QgsApplication.taskManager().addTask(task)
    return task


def running() -> List[EngineTask]:
    return list(_RUNNING)


def cancel_all() -> None:
    for task in list(_RUNNING):
        task.cancel()


# --------------------------------------------------------------------------- #
# Models, loaded once per (spec, device) and shared by tasks.
# --------------------------------------------------------------------------- #
_MODELS: Dict[Tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def get_model(model: Any, device: Optional[str] = None):
    """A LoadedModel for a spec (cached), or ``model`` itself if already loaded."""
    if not isinstance(model, str):
        return model
    dev = None if device in (None, "", "auto") else device
    key = (model, dev or "auto")
    with _MODELS_LOCK:
        if key not in _MODELS:
            from ..engine.model.models import load_model
            _MODELS[key] = load_model(model, device=dev)
        return _MODELS[key]


def model_for_index(index: Any, fallback: str, device: Optional[str] = None):
    """The model an index was built with (its recorded spec), else ``fallback``.

    The engine checks that the model embeds into the index's space and says so
    when it does not.
    """
    spec = (getattr(index, "model", None) or {}).get("spec")
    dev = None if device in (None, "", "auto") else device
    if spec and (spec, dev or "auto") in _MODELS:
        return _MODELS[(spec, dev or "auto")]
    if spec and spec != fallback:
        try:
            return get_model(spec, device)
        except Exception as exc:  # not loadable here (moved checkpoint, no network)
            log.warning(f"index model {spec} cannot be loaded ({exc}); using {fallback}")
    return get_model(fallback, device)


def forget_models() -> None:
    with _MODELS_LOCK:
        _MODELS.clear()


# --------------------------------------------------------------------------- #
# The search jobs the dock runs.
# --------------------------------------------------------------------------- #
@dataclass
class DetectRequest:
    """One text search over a raster file, in plain values (safe to pass to a thread).

    ``options`` is the engine's DetectOptions as the dock built it: what the user
    left at the model's default is None, and the engine fills it in.
    """

    raster: str
    prompts: List[str]
    model: Any                       # spec string or LoadedModel
    model_name: str
    options: Any                     # engine.core.options.DetectOptions
    extent: Optional[Tuple[float, float, float, float]] = None
    extent_crs: Optional[str] = None
    #: filled by the job for the status line: "device" once the model is loaded
    info: Dict[str, str] = field(default_factory=dict)
    #: preview(boxes, done, total): the best boxes so far during the pass (engine.detect)
    preview: Optional[Callable[[Any, int, int], None]] = None
    #: marked places (engine.data.examples.Example) that refine the ranking, in ``examples_crs``
    examples: Optional[List[Any]] = None
    examples_crs: Optional[str] = None


def _loaded(model: Any, device: Optional[str], info: Dict[str, str], cancel: threading.Event):
    lm = get_model(model, device)
    info["device"] = str(lm.device)
    if cancel.is_set():
        from ..engine.core.errors import Cancelled
        raise Cancelled()
    return lm


def run_detect(req: DetectRequest, progress: ProgressFn, cancel: threading.Event):
    """The detect job: load the model (cached), then engine.detect.detect."""
    from ..engine.detect import detect
    lm = _loaded(req.model, req.options.device, req.info, cancel)
    return detect(req.raster, req.prompts, lm, extent=req.extent, extent_crs=req.extent_crs,
                  options=req.options, progress=progress, cancel=cancel, preview=req.preview,
                  examples=req.examples, examples_crs=req.examples_crs)


@dataclass
class CountRequest:
    """One count over a raster file (engine.count), in plain values."""

    raster: str
    object_name: str
    model: Any
    model_name: str
    options: Any                     # engine.core.options.CountOptions
    method: str = "both"
    extent: Optional[Tuple[float, float, float, float]] = None
    extent_crs: Optional[str] = None
    info: Dict[str, str] = field(default_factory=dict)


def run_count(req: CountRequest, progress: ProgressFn, cancel: threading.Event):
    """The count job: load the model (cached), then engine.count.count."""
    from ..engine.count import count
    lm = _loaded(req.model, req.options.device, req.info, cancel)
    return count(req.raster, req.object_name, lm, extent=req.extent, extent_crs=req.extent_crs,
                 method=req.method, options=req.options, progress=progress, cancel=cancel)


@dataclass
class ClassifyRequest:
    """One land-cover map over a raster file (engine.classify), in plain values."""

    raster: str
    classes: List[str]
    model: Any
    model_name: str
    options: Any                     # engine.core.options.ClassifyOptions
    out: str                         # the class map GeoTIFF (a .qml style is written beside it)
    extent: Optional[Tuple[float, float, float, float]] = None
    extent_crs: Optional[str] = None
    within: Optional[List[Dict[str, Any]]] = None   # GeoJSON polygons (selected features)
    within_crs: Optional[str] = None
    info: Dict[str, str] = field(default_factory=dict)


def run_classify(req: ClassifyRequest, progress: ProgressFn, cancel: threading.Event):
    """The classify job: load the model (cached), then engine.classify.classify to a file."""
    from ..engine.classify import classify
    lm = _loaded(req.model, req.options.device, req.info, cancel)
    return classify(req.raster, req.classes, lm, extent=req.extent, extent_crs=req.extent_crs,
                    options=req.options, progress=progress, cancel=cancel, out=req.out,
                    within=req.within, within_crs=req.within_crs)


# --------------------------------------------------------------------------- #
# Describe: a caption for a place (a result box, an archive hit, a map click).
# --------------------------------------------------------------------------- #
@dataclass
class CaptionRequest:
    """Captions for places of a raster file (engine.caption), in plain values.

    A captioning model (CoCa) writes the caption; any other model ranks the
    captions of ``bank`` (a file path), which it then needs.
    """

    raster: str
    places: List[Tuple[float, float, float, float]]
    model: Any
    model_name: str
    options: Any                     # engine.options.CaptionOptions
    extent_crs: Optional[str] = None
    bank: Optional[str] = None
    info: Dict[str, str] = field(default_factory=dict)


def run_caption(req: CaptionRequest, progress: ProgressFn, cancel: threading.Event):
    """The describe job: load the model (cached); a CoCa generates, another model retrieves
    from the bank (engine.caption.caption, which refuses a model without a bank)."""
    from ..engine.caption import caption, can_generate
    lm = _loaded(req.model, req.options.device, req.info, cancel)
    gen = can_generate(lm)
    req.info["method"] = "generation" if gen else "retrieval"
    return caption(req.raster, lm, req.places, extent_crs=req.extent_crs,
                   bank=None if gen else (req.bank or None), options=req.options,
                   generate=True if gen else None, progress=progress, cancel=cancel)
