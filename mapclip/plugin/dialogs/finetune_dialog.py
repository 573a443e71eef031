"""The fine-tuning dialog: data, base model, recipe, schedule, freezing; a live loss/recall plot.

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

from ...engine.core.options import FREEZE, PIR_LABELS, RECIPES
from ...engine.data.examples import is_marks_file
from .base import JobDialog, file_widget, need_file

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
                                "Caption files (*.csv *.tsv *.txt *.jsonl *.ndjson *.json);;"
                                "Marked places (*.gpkg *.geojson *.shp);;All files (*)")
        self.data.fileChanged.connect(lambda *_: self._data_changed())
        self.marks_button = QPushButton("Use the MapCLIP examples layer")
        self.marks_button.setToolTip("train on the places marked \"Yes, like this\" / \"Not this\" "
                                     "in the dock: they are saved to a GeoPackage and their chips "
                                     "cut from the raster they were marked on")
        self.marks_button.clicked.connect(self.use_marks_layer)
        self.marks_raster = file_widget(QgsFileWidget.GetFile,
                                        "Rasters (*.tif *.tiff *.vrt *.jp2 *.img);;All files (*)")
        self.marks_caption = QLineEdit()
        self.marks_caption.setPlaceholderText("the mark's prompt")
        self.marks_caption.setToolTip("caption of a \"like this\" mark that has no prompt or caption "
                                      "field; \"not this\" marks train only where a caption says "
                                      "what they are")
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
        self.recipe = QComboBox()
        self.recipe.addItems(RECIPES)
        self.recipe.setToolTip("clip: symmetric InfoNCE (RemoteCLIP). pir: PIR-CLIP, a scene "
                               "classifier instructs the image tower, InfoNCE plus the cluster-wise "
                               "affiliation loss; the caption file needs a label (or class) column "
                               "with each image's scene class")
        self.pir_prior = file_widget(QgsFileWidget.GetFile,
                                     "Prior checkpoints (*.safetensors *.pt *.pth);;All files (*)")
        self.pir_prior.lineEdit().setPlaceholderText("trained first on the same data")
        self.pir_labels = QComboBox()
        self.pir_labels.addItems(PIR_LABELS)
        self.pir_labels.setToolTip("column: the caption file's label (or class) column; filename: "
                                   "the file name's part before the first _ (airport_12.tif)")
        self.recipe.currentTextChanged.connect(self._recipe_changed)
        self.freeze = QComboBox()
        self.freeze.addItems(FREEZE)
        self.unlock_last = QSpinBox()
        self.unlock_last.setRange(0, 48)
        self.resume = QCheckBox("Resume the run in the output folder")
        self.device = QLineEdit()
        self.device.setPlaceholderText("best available (cuda, mps, cpu)")
        self.out = file_widget(QgsFileWidget.GetDirectory)
        self.set_defaults()
        self.form.addRow("Image-caption file", self.data)
        self.form.addRow("", self.marks_button)
        self.form.addRow("Raster of the marks", self.marks_raster)
        self.form.addRow("Caption of marks", self.marks_caption)
        self.form.addRow("Images folder (relative paths)", self.images)
        self.form.addRow("Base model", self.model)
        self.form.addRow("Recipe", self.recipe)
        self.form.addRow("PIR scene labels", self.pir_labels)
        self.form.addRow("PIR prior checkpoint", self.pir_prior)
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
        if freeze in FREEZE:
            self.freeze.setCurrentText(freeze)
        labels = str(defaults.get("pir_labels", PIR_LABELS[0]))
        if labels in PIR_LABELS:
            self.pir_labels.setCurrentText(labels)
        recipe = str(defaults.get("recipe", RECIPES[0]))
        if recipe in RECIPES:
            self.recipe.setCurrentText(recipe)
        self._recipe_changed(self.recipe.currentText())
        self.unlock_last.setValue(int(defaults.get("unlock_last", 0) or 0))
        self._data_changed()

    def _data_changed(self) -> None:
        """A file of marked places needs its raster (and may give a caption)."""
        marked = is_marks_file(self.data.filePath().strip())
        self.marks_raster.setEnabled(marked)
        self.marks_caption.setEnabled(marked)
        self.images.setEnabled(not marked)

    def use_marks_layer(self) -> bool:
        """The project's MapCLIP examples layer as the data: saved to a GeoPackage beside the
        results, its raster the one it was marked on. False, with the reason, without marks."""
        from .. import layers, marks
        layer = marks.examples_layer(create=False)
        if layer is None or not layer.featureCount():
            self.status.setText("no marks yet: right-click a search result or a place on the map "
                                "and choose \"Yes, like this\" or \"Not this\"")
            return False
        path = layers.unique_path(layers.results_place()[1], "marks", ".gpkg")
        marks.save_layer(layer, path)
        self.data.setFilePath(path)
        raster = marks.marked_raster(layer)
        if raster:
            self.marks_raster.setFilePath(raster)
        self._data_changed()
        yes, no = marks.counts(layer)
        self.status.setText(f"{yes} 'like this' and {no} 'not this' marks saved to {path}")
        return True

    def _recipe_changed(self, recipe: str) -> None:
        """The prior checkpoint and the scene labels are PIR's alone."""
        self.pir_prior.setEnabled(recipe == "pir")
        self.pir_labels.setEnabled(recipe == "pir")

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
        if is_marks_file(self.data.filePath().strip()):
            need_file(problems, "Raster of the marks", self.marks_raster.filePath())
        if self.images.filePath().strip():
            need_file(problems, "Images folder", self.images.filePath(), folder=True)
        if self.recipe.currentText() == "pir" and self.pir_prior.filePath().strip():
            need_file(problems, "PIR prior checkpoint", self.pir_prior.filePath())
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
                    recipe=self.recipe.currentText(), pir_labels=self.pir_labels.currentText(),
                    pir_prior=(self.pir_prior.filePath().strip() or None
                               if self.recipe.currentText() == "pir" else None),
                    unlock_last=self.unlock_last.value(), resume=self.resume.isChecked(),
                    device=self.device.text().strip() or None,
                    image_root=(self.images.filePath().strip() or None
                                if self.images.isEnabled() else None),
                    **self._marks_kwargs())

    def _marks_kwargs(self) -> Dict[str, Any]:
        if not is_marks_file(self.data.filePath().strip()):
            return {}
        return dict(raster=self.marks_raster.filePath().strip() or None,
                    marks_caption=self.marks_caption.text().strip() or None)

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
        from ...engine.core.options import FinetuneOptions
        return {f.name: f.default for f in dataclasses.fields(FinetuneOptions)
                if f.default is not dataclasses.MISSING}
    except ImportError:
        return {}


def best_model_path(result: Any, out: str) -> str:
    best = getattr(result, "best_path", None)
    return str(best) if best else ""
