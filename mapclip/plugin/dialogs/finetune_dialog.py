"""The fine-tuning dialog: data, base model, schedule, freezing; a live loss/recall plot.

The job is ``engine.finetune.finetune`` (the function behind ``python -m engine
finetune``) in a :class:`plugin.tasks.EngineTask`: progress per step, Cancel
within one step, Resume continues the run in the output folder. Metrics the
engine reports (``on_metrics``, from the worker thread) travel to the plot by
a queued Qt signal. When the run finishes, "Add to model picker" emits
:attr:`FinetuneDialog.model_ready` with the path of ``RUN_DIR/best``, which the
plugin connects to the dock's model picker.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import QPointF, Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QPainter, QPen, QPolygonF
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QPushButton,
                                 QSizePolicy, QSpinBox, QWidget)

from .base import JobDialog, file_widget, need_file

FREEZE_CHOICES = ("none", "text", "vision")
LOSS_COLOR = QColor(200, 60, 40)
RECALL_COLOR = QColor(40, 110, 200)


class MetricsPlot(QWidget):
    """Two lines on one small chart against the optimizer step: training loss
    (its own range) and validation mean recall (0..100 %), painted with QPainter."""

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.loss: List[Tuple[float, float]] = []
        self.recall: List[Tuple[float, float]] = []
        self.last_step = 0.0
        self.setMinimumSize(320, 140)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)

    def clear(self) -> None:
        self.loss.clear()
        self.recall.clear()
        self.last_step = 0.0
        self.update()

    def add(self, metrics: Dict[str, Any]) -> None:
        """Take one record of the engine's metrics log.

        Step records (``type`` "step": ``step``, ``loss``) extend the loss line;
        evaluation records (``type`` "eval": ``mean_recall`` in percent) extend
        the recall line at the last step seen.
        """
        if _finite(metrics.get("step")):
            self.last_step = float(metrics["step"])
        kind = metrics.get("type")
        loss = metrics.get("loss")
        if kind in (None, "step") and _finite(loss):
            self.loss.append((self.last_step, float(loss)))
        recall = metrics.get("mean_recall")
        if kind in (None, "eval") and _finite(recall):
            self.recall.append((self.last_step, float(recall)))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        p.fillRect(self.rect(), QColor(255, 255, 255))
        m = 24
        w, h = self.width() - 2 * m, self.height() - 2 * m
        p.setPen(QPen(QColor(160, 160, 160), 1))
        p.drawRect(m, m, w, h)
        p.setPen(LOSS_COLOR)
        p.drawText(m, m - 6, "loss")
        p.setPen(RECALL_COLOR)
        p.drawText(m + w - 60, m - 6, "recall")
        xs = [x for x, _ in self.loss + self.recall]
        if not xs:
            p.setPen(QColor(120, 120, 120))
            p.drawText(self.rect(), Qt.AlignCenter, "no metrics yet")
            p.end()
            return
        x0, x1 = min(xs), max(xs)
        span = (x1 - x0) or 1.0

        def line(points, lo, hi, color):
            if not points:
                return
            rng = (hi - lo) or 1.0
            poly = QPolygonF([QPointF(m + w * (x - x0) / span, m + h * (1.0 - (y - lo) / rng))
                              for x, y in points])
            p.setPen(QPen(color, 2))
            if len(points) == 1:
                p.drawEllipse(poly[0], 2.5, 2.5)
            else:
                p.drawPolyline(poly)

        if self.loss:
            ys = [y for _, y in self.loss]
            line(self.loss, min(ys), max(ys), LOSS_COLOR)
            p.setPen(LOSS_COLOR)
            p.drawText(2, m + h + 16, f"{ys[-1]:.3g}")
        line(self.recall, 0.0, 100.0, RECALL_COLOR)
        if self.recall:
            p.setPen(RECALL_COLOR)
            p.drawText(m + w - 40, m + h + 16, f"{self.recall[-1][1]:.1f}%")
        p.end()


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def model_choices() -> List[str]:
    """Preset names for the base-model picker (the engine's registry)."""
    from ...engine.model.presets import list_presets
    return [p.name for p in list_presets()]


class FinetuneDialog(JobDialog):
    """Fine-tune a CLIP model on image-caption pairs."""

    TITLE = "MapCLIP: fine-tune a model"
    RUN_TEXT = "Start"
    #: (path of the best model folder, display name) when the user accepts the offer
    model_ready = pyqtSignal(str, str)
    #: metrics records from the worker thread, delivered on the main thread
    metrics_arrived = pyqtSignal(object)

    def __init__(self, iface=None, parent=None, on_model_ready: Optional[Callable[[str, str], None]] = None):
        super().__init__(iface, parent)
        from ...engine.model.presets import DEFAULT_MODEL
        self.data = file_widget(QgsFileWidget.GetFile,
                                "Caption files (*.csv *.tsv *.txt *.jsonl *.ndjson *.json);;All files (*)")
        self.images = file_widget(QgsFileWidget.GetDirectory)
        self.images.lineEdit().setPlaceholderText("the data file's folder")
        self.model = QComboBox()
        self.model.setEditable(True)
        self.model.addItems(model_choices())
        self.model.setCurrentText(DEFAULT_MODEL)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 1000)
        self.batch_size = QSpinBox()
        self.batch_size.setRange(2, 4096)
        self.lr = QLineEdit()
        self.val_split = QDoubleSpinBox()
        self.val_split.setRange(0.0, 0.9)
        self.val_split.setSingleStep(0.05)
        self.freeze = QComboBox()
        self.freeze.addItems(FREEZE_CHOICES)
        self.unlock_last = QSpinBox()
        self.unlock_last.setRange(0, 48)
        self.resume = QCheckBox("Resume the run in the output folder")
        self.device = QLineEdit()
        self.device.setPlaceholderText("best available (cuda, mps, cpu)")
        self.out = file_widget(QgsFileWidget.GetDirectory)
        self.set_defaults()
        self.form.addRow("Image-caption file", self.data)
        self.form.addRow("Images folder (relative paths)", self.images)
        self.form.addRow("Base model", self.model)
        self.form.addRow("Epochs", self.epochs)
        self.form.addRow("Batch size", self.batch_size)
        self.form.addRow("Learning rate", self.lr)
        self.form.addRow("Validation fraction", self.val_split)
        self.form.addRow("Freeze", self.freeze)
        self.form.addRow("Unlock last blocks", self.unlock_last)
        self.form.addRow("Device", self.device)
        self.form.addRow("Output folder", self.out)
        self.form.addRow("", self.resume)
        self.plot = MetricsPlot()
        self.body.addWidget(self.plot)
        self.add_button = QPushButton("Add to model picker")
        self.add_button.setEnabled(False)
        self.add_button.clicked.connect(self.add_to_picker)
        self.buttons.addButton(self.add_button, self.buttons.ActionRole)
        self.metrics_arrived.connect(self.plot.add)
        self.best_path: Optional[str] = None
        if on_model_ready is not None:
            self.model_ready.connect(on_model_ready)

    def set_defaults(self) -> None:
        """Defaults from the engine's FinetuneOptions (one place for them)."""
        defaults = finetune_defaults()
        self.epochs.setValue(int(defaults.get("epochs", 10)))
        self.batch_size.setValue(int(defaults.get("batch_size", 64)))
        self.lr.setText(f"{defaults.get('lr', 1e-5):g}")
        self.val_split.setValue(float(defaults.get("val_split", 0.1)))
        freeze = str(defaults.get("freeze", "none"))
        if freeze in FREEZE_CHOICES:
            self.freeze.setCurrentText(freeze)
        self.unlock_last.setValue(int(defaults.get("unlock_last", 0) or 0))

    # -- checks --------------------------------------------------------------
    def learning_rate(self) -> Optional[float]:
        try:
            value = float(self.lr.text().strip())
        except ValueError:
            return None
        return value if value > 0 and math.isfinite(value) else None

    def validate(self) -> List[str]:
        problems: List[str] = []
        need_file(problems, "Image-caption file", self.data.filePath())
        if self.images.filePath().strip():
            need_file(problems, "Images folder", self.images.filePath(), folder=True)
        if not self.model.currentText().strip():
            problems.append("Base model: empty (choose a preset or give a model folder)")
        if self.learning_rate() is None:
            problems.append(f"Learning rate: '{self.lr.text()}' is not a positive number (e.g. 1e-5)")
        out = self.out.filePath().strip()
        if not out:
            problems.append("Output folder: none chosen (choose a folder for the run)")
        elif self.resume.isChecked() and not os.path.isdir(out):
            problems.append(f"Output folder: {out} does not exist, nothing to resume "
                            f"(untick Resume or choose the interrupted run's folder)")
        return problems

    # -- the job -------------------------------------------------------------
    def options_kwargs(self) -> Dict[str, Any]:
        return dict(model=self.model.currentText().strip(), data=self.data.filePath().strip(),
                    out=self.out.filePath().strip(), epochs=self.epochs.value(),
                    batch_size=self.batch_size.value(), lr=self.learning_rate(),
                    val_split=self.val_split.value(), freeze=self.freeze.currentText(),
                    unlock_last=self.unlock_last.value(), resume=self.resume.isChecked(),
                    device=self.device.text().strip() or None,
                    image_root=self.images.filePath().strip() or None)

    def make_job(self) -> Callable:
        kwargs = self.options_kwargs()
        emit = self.metrics_arrived.emit
        self.plot.clear()
        self.add_button.setEnabled(False)
        self.best_path = None

        def job(progress, cancel):
            from ...engine.finetune import FinetuneOptions, finetune
            return finetune(FinetuneOptions(**kwargs), progress=progress, cancel=cancel,
                            on_metrics=lambda m: emit(dict(m)))
        return job

    def job_description(self) -> str:
        return "MapCLIP fine-tuning"

    def job_done(self, result: Any) -> None:
        self.best_path = best_model_path(result, self.out.filePath().strip())
        self.add_button.setEnabled(bool(self.best_path))
        self.status.setText(f"done: best model in {self.best_path}. "
                            f"Add it to the model picker?")

    def add_to_picker(self) -> None:
        if self.best_path:
            name = os.path.basename(os.path.dirname(self.best_path.rstrip("/\\"))) or "fine-tuned"
            self.model_ready.emit(self.best_path, name)
            self.add_button.setEnabled(False)
            self.status.setText(f"added {name} to the model picker")


def finetune_defaults() -> Dict[str, Any]:
    """FinetuneOptions' defaults, or {} where the engine cannot be imported."""
    try:
        import dataclasses
        from ...engine.finetune import FinetuneOptions
        return {f.name: f.default for f in dataclasses.fields(FinetuneOptions)
                if f.default is not dataclasses.MISSING}
    except ImportError:
        return {}


def best_model_path(result: Any, out: str) -> str:
    best = getattr(result, "best_path", None)
    return str(best) if best else ""
