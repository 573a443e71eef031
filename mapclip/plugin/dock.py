"""The MapCLIP dock: text search over a raster layer, and the archive tab.

Search tab: raster layer, model, prompts (several, one per line or separated by
";", with history), mode (boxes / heatmap / count), area (visible extent,
whole layer, selected polygons), an Advanced group (collapsed) whose values
are stored per model, Run / Cancel, progress and a status line, and the
results list (double-click zooms to a box).

Archive tab: build or open an index, query it by text or by clicking a place
on the map, hits as a layer and a list.

The dock only gathers plain values and hands them to an engine job in a
:class:`~.tasks.EngineTask`; layers are made in the task's ``finished()``.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import replace
from functools import partial
from typing import Any, List, Optional, Sequence, Tuple

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsGeometry,
                       QgsMapLayerProxyModel, QgsProject, QgsRasterLayer, QgsRectangle)
from qgis.gui import (QgsCollapsibleGroupBox, QgsDockWidget, QgsFileWidget,
                      QgsMapLayerComboBox)
from qgis.PyQt.QtCore import QEvent, QSize, Qt, QTimer, pyqtSignal
from qgis.PyQt.QtWidgets import (QAbstractItemView, QApplication, QCheckBox, QComboBox, QDoubleSpinBox,
                                 QFileDialog, QFormLayout, QFrame, QHBoxLayout, QLabel,
                                 QLineEdit, QMenu, QProgressBar, QPushButton,
                                 QScrollArea, QSpinBox, QTabWidget, QToolButton, QTreeWidget,
                                 QTreeWidgetItem, QVBoxLayout, QWidget)

from ..engine.core.errors import renamed
from ..engine.core.options import parse_read_workers, split_prompts
from . import deps, layers, log, render, runtime, tasks
from .layers import crs_text
from .preview import SearchPreview
from .settings import DEVICES, FIELD_LABELS, METHODS, SearchParams, Settings, model_defaults

MODES = (("boxes", "Boxes"), ("heatmap", "Heatmap (and boxes)"), ("count", "Count"),
         ("classes", "Classes (land-cover map)"))
AREAS = (("extent", "Visible map extent"), ("layer", "Whole layer"),
         ("selection", "Selected features of a polygon layer"))
COUNT_METHODS = ("both", "prompt", "dense")
ROLE_BOUNDS = Qt.UserRole + 1
ROLE_CRS = Qt.UserRole + 2
#: Describe: the raster a result row was found in, and its feature ([layer id, feature id])
ROLE_RASTER = Qt.UserRole + 3
ROLE_FEATURE = Qt.UserRole + 4
#: the results lists' caption column (Describe)
CAPTION_COLUMN = 3
#: the results lists keep at least this height however tall the fields above them grow
RESULTS_MIN_HEIGHT = 120


class FieldsScroll(QScrollArea):
    """A tab's fields in a frameless vertical scroll area. It asks for at most
    ``HINT_HEIGHT`` pixels (the dock fits a small screen, whatever is expanded), grows no
    taller than its fields need, and scrolls when the dock is shorter than they are."""

    HINT_HEIGHT = 220

    def __init__(self, inner: QWidget):
        super().__init__()
        self.setWidget(inner)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        inner.installEventFilter(self)
        self._fit()

    def _fit(self) -> None:
        self.setMaximumHeight(self.widget().sizeHint().height())
        self.updateGeometry()

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt's name)
        if obj is self.widget() and event.type() == QEvent.LayoutRequest:
            self._fit()      # Advanced opened or closed: as tall as the fields now need
        return super().eventFilter(obj, event)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        hint = self.widget().sizeHint()
        return QSize(hint.width() + self.verticalScrollBar().sizeHint().width(),
                     min(hint.height(), self.HINT_HEIGHT))

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(self.widget().minimumSizeHint().width(),
                     min(self.widget().sizeHint().height(), RESULTS_MIN_HEIGHT))


class ResultsList(QTreeWidget):
    """A results list that asks for no more height than it needs to be useful (the dock
    fits a small screen) and takes whatever the dock has left."""

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(super().sizeHint().width(), RESULTS_MIN_HEIGHT + 20)


class MapClipDock(QgsDockWidget):
    """The search dock. ``run_finished(outcome)`` fires after every run ("done", "error", "cancelled")."""

    run_finished = pyqtSignal(str)
    #: the user asked, from the dock's banner, to install the missing packages
    install_requested = pyqtSignal()

    def __init__(self, iface, parent=None):
        super().__init__("MapCLIP", parent)
        self.setObjectName("MapClipDock")
        self.iface = iface
        self.settings = Settings()
        self.task: Optional[tasks.EngineTask] = None
        self.renderer: Optional[render.AsyncRender] = None
        self.last_layers: List[Any] = []
        self.last_result: Any = None
        self.last_count: Optional[str] = None
        self.last_request: Any = None
        self.pick_tool = None
        self.describe_tool = None
        self.last_caption: Optional[str] = None
        self._prev_tool = None
        self._temp_files: List[str] = []
        self._run_unit = "tiles"      # what the running job's progress counts
        self._status: QLabel = QLabel()
        self._preview: Optional[SearchPreview] = None   # the boxes so far of the search running
        self.tabs = QTabWidget()
        self.tabs.addTab(self._build_search_tab(), "Search")
        self.tabs.addTab(self._build_archive_tab(), "Archive")
        page = QWidget()
        box = QVBoxLayout(page)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self._build_deps_banner())
        box.addWidget(self.tabs, 1)
        box.addWidget(self._build_describe_box())
        self.setWidget(page)
        self._load_settings()
        self.refresh_deps()

    def _build_deps_banner(self) -> QWidget:
        self.deps_banner = QWidget()
        self.deps_banner.setObjectName("mapclipDepsBanner")
        row = QHBoxLayout(self.deps_banner)
        self.deps_label = QLabel()
        self.deps_label.setWordWrap(True)
        self.deps_install_button = QPushButton("Install…")
        self.deps_install_button.setObjectName("mapclipDockInstall")
        self.deps_install_button.clicked.connect(lambda _checked=False: self.install_requested.emit())
        row.addWidget(self.deps_label, 1)
        row.addWidget(self.deps_install_button)
        return self.deps_banner

    def _packages_ready(self) -> bool:
        """True when the engine's packages import; else say what is missing in the bar."""
        missing = deps.missing_modules()
        if missing:
            log.bar_warning(self.iface, deps.missing_message(missing))
        return not missing

    def refresh_deps(self) -> List[str]:
        """Show what is missing, with an Install button, at the top of the dock."""
        missing = deps.missing_modules()
        self.deps_label.setText(deps.missing_message(missing) if missing else "")
        self.deps_banner.setVisible(bool(missing))
        return missing

    # ------------------------------------------------------------------ UI --
    def _build_search_tab(self) -> QWidget:
        page = QWidget()
        outer = QVBoxLayout(page)
        form = QFormLayout()
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.layer_combo.setToolTip("the raster layer to search (files are read directly, "
                                    "basemaps are rendered first)")
        form.addRow("Layer", self.layer_combo)

        model_row = QHBoxLayout()
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("the CLIP model that scores tiles")
        self.add_model_button = QToolButton()
        self.add_model_button.setText("…")
        self.add_model_button.setToolTip("add a checkpoint or model folder")
        self.add_model_button.setPopupMode(QToolButton.InstantPopup)
        menu = QMenu(self.add_model_button)
        menu.addAction("Add checkpoint…", self.add_checkpoint)
        menu.addAction("Add model folder…", self.add_model_folder)
        menu.addAction("Remove this model from the list", self.remove_current_model)
        self.add_model_button.setMenu(menu)
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.add_model_button)
        form.addRow("Model", model_row)

        self.prompt_combo = QComboBox()
        self.prompt_combo.setEditable(True)
        self.prompt_combo.setInsertPolicy(QComboBox.NoInsert)
        self.prompt_combo.lineEdit().setPlaceholderText("storage tanks; a harbor with ships")
        self.prompt_combo.setToolTip("what to look for; several prompts separated by ';'")
        self.prompt_combo.lineEdit().returnPressed.connect(self.run)
        form.addRow("Prompts", self.prompt_combo)

        mode_row = QHBoxLayout()
        self.mode_combo = QComboBox()
        for key, label in MODES:
            self.mode_combo.addItem(label, key)
        self.count_method_combo = QComboBox()
        for m in COUNT_METHODS:
            self.count_method_combo.addItem(m, m)
        self.count_method_combo.setToolTip("count by prompt scores, dense patch features, or both")
        mode_row.addWidget(self.mode_combo, 1)
        mode_row.addWidget(self.count_method_combo)
        form.addRow("Mode", mode_row)

        self.area_combo = QComboBox()
        for key, label in AREAS:
            self.area_combo.addItem(label, key)
        form.addRow("Area", self.area_combo)
        self.polygon_combo = QgsMapLayerComboBox()
        self.polygon_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.polygon_combo.setAllowEmptyLayer(True)
        self.polygon_label = QLabel("Polygons")
        form.addRow(self.polygon_label, self.polygon_combo)

        self.advanced = QgsCollapsibleGroupBox("Advanced")
        self.advanced.setObjectName("mapclipAdvanced")
        adv = QFormLayout(self.advanced)
        self.method_combo = QComboBox()
        self.method_combo.addItems(list(METHODS))
        self.method_combo.setToolTip("window: score windows of tiles; dense: patch-level scores in one pass")
        adv.addRow("Method", self.method_combo)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(16, 4096)
        self.tile_spin.setSuffix(" px")
        adv.addRow("Tile size", self.tile_spin)
        self.window_spin = QSpinBox()
        self.window_spin.setRange(1, 16)
        self.window_spin.setSuffix(" tiles")
        adv.addRow("Window", self.window_spin)
        self.stride_spin = QSpinBox()
        self.stride_spin.setRange(1, 16)
        self.stride_spin.setSuffix(" tiles")
        adv.addRow("Stride", self.stride_spin)
        self.gsd_spin = QDoubleSpinBox()
        self.gsd_spin.setRange(0.0, 10000.0)
        self.gsd_spin.setDecimals(3)
        self.gsd_spin.setSpecialValueText("native")
        self.gsd_spin.setSuffix(" m/px")
        self.gsd_spin.setToolTip("Metres on the ground per pixel; basemaps (EPSG:3857) are rendered at it, converted to map units at the area's latitude")
        adv.addRow("GSD", self.gsd_spin)
        self.topk_spin = QSpinBox()
        self.topk_spin.setRange(1, 10000)
        adv.addRow("Top-k", self.topk_spin)
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(-1.0, 1.0)
        self.threshold_spin.setDecimals(3)
        self.threshold_spin.setSingleStep(0.01)
        self.threshold_spin.setSpecialValueText("off")
        adv.addRow("Threshold", self.threshold_spin)
        self.bands_edit = QLineEdit()
        self.bands_edit.setPlaceholderText("auto (RGB), or e.g. 4,3,2")
        adv.addRow("Bands", self.bands_edit)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        adv.addRow("Device", self.device_combo)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 4096)
        adv.addRow("Batch size", self.batch_spin)
        self.readers_spin = QSpinBox()
        self.readers_spin.setRange(-1, 64)
        self.readers_spin.setSpecialValueText("auto")
        self.readers_spin.setToolTip("Processes that read and decode tiles: auto (one per core but "
                                     "one, for large searches), 0 (read in QGIS's own threads) or "
                                     "a number")
        adv.addRow("Reader processes", self.readers_spin)
        self.compile_check = QCheckBox("Compile the model on CUDA (slower first search, then cached)")
        adv.addRow("Compile (CUDA)", self.compile_check)
        self.cache_check = QCheckBox("Embed the area once; later prompts reuse it")
        self.cache_check.setToolTip("A second prompt, or another mode's search, on the same area "
                                    "and model is answered from the embeddings kept by the first "
                                    "one (in memory, and on disk under the MapCLIP cache folder) "
                                    "instead of another pass over the raster")
        adv.addRow("Reuse embeddings", self.cache_check)
        save_row = QHBoxLayout()
        self.save_check = QCheckBox("Save to GeoPackage")
        self.gpkg_widget = QgsFileWidget()
        self.gpkg_widget.setStorageMode(QgsFileWidget.SaveFile)
        self.gpkg_widget.setFilter("GeoPackage (*.gpkg)")
        save_row.addWidget(self.save_check)
        save_row.addWidget(self.gpkg_widget, 1)
        adv.addRow(save_row)
        self.reset_button = QPushButton("Defaults for this model")
        self.reset_button.clicked.connect(self.reset_params)
        adv.addRow(self.reset_button)
        self.advanced.setCollapsed(True)
        fields_box = QWidget()
        fields = QVBoxLayout(fields_box)
        fields.setContentsMargins(0, 0, 0, 0)
        fields.addLayout(form)
        fields.addWidget(self.advanced)
        fields.addStretch(0)
        self.search_scroll = FieldsScroll(fields_box)
        outer.addWidget(self.search_scroll, 1)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        outer.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        outer.addWidget(self.progress)
        self.status_label = QLabel("Ready")
        self.status_label.setWordWrap(True)
        outer.addWidget(self.status_label)
        self._status = self.status_label

        self.results = ResultsList()
        self.results.setHeaderLabels(["#", "Prompt", "Score", "Caption"])
        self.results.setRootIsDecorated(False)
        self.results.setSelectionMode(QAbstractItemView.SingleSelection)
        self.results.setToolTip("double-click a result to zoom to it; right-click to describe it")
        self.results.itemDoubleClicked.connect(self.zoom_to_item)
        self.results.setMinimumHeight(RESULTS_MIN_HEIGHT)
        self._results_menu(self.results)
        outer.addWidget(self.results, 1)

        self.mode_combo.currentIndexChanged.connect(self._mode_changed)
        self.area_combo.currentIndexChanged.connect(self._area_changed)
        self.model_combo.currentIndexChanged.connect(self._model_changed)
        self.method_combo.currentTextChanged.connect(self._method_changed)
        self._shown_method = self.method_combo.currentText()
        return page

    def _build_archive_tab(self) -> QWidget:
        page = QWidget()
        outer = QVBoxLayout(page)
        form = QFormLayout()
        self.index_widget = QgsFileWidget()
        self.index_widget.setStorageMode(QgsFileWidget.GetDirectory)
        self.index_widget.setToolTip("an index folder built by MapCLIP (`python -m engine index`)")
        form.addRow("Index", self.index_widget)
        build_row = QHBoxLayout()
        self.build_sources = QgsFileWidget()
        self.build_sources.setStorageMode(QgsFileWidget.GetDirectory)
        self.build_sources.setToolTip("a folder of rasters or images to index")
        self.build_button = QPushButton("Build index")
        self.build_button.clicked.connect(self.build_index)
        build_row.addWidget(self.build_sources, 1)
        build_row.addWidget(self.build_button)
        form.addRow("Sources", build_row)
        self.archive_query = QLineEdit()
        self.archive_query.setPlaceholderText("an airport with parked planes")
        self.archive_query.returnPressed.connect(lambda: self.search_archive())
        form.addRow("Query", self.archive_query)
        self.archive_topk = QSpinBox()
        self.archive_topk.setRange(1, 10000)
        self.archive_topk.setValue(int(self.settings.get("archive_top_k", 20)))
        form.addRow("Top-k", self.archive_topk)
        form_box = QWidget()
        form_box.setLayout(form)
        form.setContentsMargins(0, 0, 0, 0)
        self.archive_scroll = FieldsScroll(form_box)
        outer.addWidget(self.archive_scroll, 1)
        row = QHBoxLayout()
        self.archive_search_button = QPushButton("Search")
        self.archive_search_button.clicked.connect(lambda _checked=False: self.search_archive())
        self.pick_button = QPushButton("More like a place…")
        self.pick_button.setCheckable(True)
        self.pick_button.setToolTip("click a place on the map to find similar places in the archive")
        self.pick_button.toggled.connect(self._pick_toggled)
        row.addWidget(self.archive_search_button)
        row.addWidget(self.pick_button)
        outer.addLayout(row)
        self.archive_status = QLabel("")
        self.archive_status.setWordWrap(True)
        outer.addWidget(self.archive_status)
        self.archive_results = ResultsList()
        self.archive_results.setHeaderLabels(["#", "Source", "Score", "Caption"])
        self.archive_results.setRootIsDecorated(False)
        self.archive_results.itemDoubleClicked.connect(self.zoom_to_item)
        self.archive_results.setMinimumHeight(RESULTS_MIN_HEIGHT)
        self._results_menu(self.archive_results)
        outer.addWidget(self.archive_results, 1)
        return page

    # ------------------------------------------------------------ settings --
    def _fill_models(self) -> None:
        from ..engine.model.models import list_presets
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for preset in list_presets(dev=self.settings.get("show_test_models", False)):
            name = preset.name
            self.model_combo.addItem(name, name)
            self.model_combo.setItemData(self.model_combo.count() - 1, preset.description,
                                         Qt.ToolTipRole)
        for item in self.settings.custom_models():
            self.model_combo.addItem(item["label"], item["spec"])
            self.model_combo.setItemData(self.model_combo.count() - 1, item["spec"], Qt.ToolTipRole)
        self.model_combo.blockSignals(False)
        current = self.caption_model() if self.caption_model_combo.count() else None
        self.caption_model_combo.clear()
        for i in range(self.model_combo.count()):
            self.caption_model_combo.addItem(self.model_combo.itemText(i), self.model_combo.itemData(i))
            self.caption_model_combo.setItemData(i, self.model_combo.itemData(i, Qt.ToolTipRole),
                                                 Qt.ToolTipRole)
        if current is not None:
            self._pick(self.caption_model_combo, current)

    def show_demo(self, layer, prompt: str) -> None:
        """Set the search up for the demo: this layer, the demo model, a prompt, the whole layer."""
        self.layer_combo.setLayer(layer)
        self.select_model("demo")
        self.prompt_combo.setEditText(prompt)
        self._set_combo_data(self.mode_combo, "boxes")
        self._set_combo_data(self.area_combo, "layer")
        self.tabs.setCurrentIndex(0)
        self.status_label.setText("Demo ready: press Run to search the scene with the demo model "
                                  "(trained on synthetic scenes; use a RemoteCLIP model on real imagery).")

    @staticmethod
    def _pick(combo: QComboBox, spec: str) -> None:
        """Make ``spec`` current in a model picker, adding it if unknown."""
        idx = combo.findData(spec)
        if idx < 0:
            combo.addItem(spec, spec)
            idx = combo.count() - 1
        combo.setCurrentIndex(idx)

    def select_model(self, spec: str) -> None:
        """Make ``spec`` current in the picker, adding it if unknown."""
        self._pick(self.model_combo, spec)
        self._model_changed()

    def select_caption_model(self, spec: str) -> None:
        """Make ``spec`` Describe's model (the Caption model field), adding it if unknown."""
        self._pick(self.caption_model_combo, spec)

    def refresh_models(self) -> None:
        """Re-read presets and added models (after the fine-tune dialog adds one)."""
        current = self.current_model()
        self._fill_models()
        self.select_model(current)

    def _load_settings(self) -> None:
        self._fill_models()
        model = self.settings.model
        if self.model_combo.findData(model) < 0:  # a spec used before, not in the list
            self.model_combo.addItem(model, model)
        self.model_combo.setCurrentIndex(max(0, self.model_combo.findData(model)))
        self.prompt_combo.addItems(self.settings.prompt_history())
        self.prompt_combo.setEditText("")
        self._set_combo_data(self.mode_combo, self.settings.get("mode", "boxes"))
        self._set_combo_data(self.area_combo, self.settings.get("area", "extent"))
        self._set_combo_data(self.count_method_combo, self.settings.get("count_method", "both"))
        self.index_widget.setFilePath(self.settings.get("index_path", ""))
        self.bank_widget.setFilePath(self.settings.get("caption_bank", ""))
        self._pick(self.caption_model_combo, self.settings.caption_model)
        self.show_params(self.settings.params(self.current_model()))
        self._mode_changed()
        self._area_changed()

    @staticmethod
    def _set_combo_data(combo: QComboBox, value: Any) -> None:
        idx = combo.findData(value)
        if idx >= 0:
            combo.setCurrentIndex(idx)

    def current_model(self) -> str:
        return str(self.model_combo.currentData() or self.model_combo.currentText())

    def show_params(self, p: SearchParams) -> None:
        self.method_combo.blockSignals(True)
        self.method_combo.setCurrentText(p.method)
        self.method_combo.blockSignals(False)
        self._shown_method = p.method
        self.tile_spin.setValue(int(p.tile_px))
        self.window_spin.setValue(int(p.window))
        self.stride_spin.setValue(int(p.stride))
        self.gsd_spin.setValue(float(p.gsd or 0.0))
        self.topk_spin.setValue(int(p.top_k))
        self._show_threshold(p.threshold)
        self.bands_edit.setText(p.bands or "")
        self.device_combo.setCurrentText(p.device or "auto")
        self.batch_spin.setValue(int(p.batch_size))
        readers = parse_read_workers(p.read_workers)
        self.readers_spin.setValue(readers if isinstance(readers, int) else -1)
        self.compile_check.setChecked(bool(p.compile))
        self.cache_check.setChecked(bool(p.cache))

    def params(self) -> SearchParams:
        return SearchParams(tile_px=self.tile_spin.value(), window=self.window_spin.value(),
                            stride=self.stride_spin.value(), gsd=self.gsd_spin.value(),
                            top_k=self.topk_spin.value(), threshold=self._threshold(),
                            bands=self.bands_edit.text().strip(),
                            device=self.device_combo.currentText(),
                            batch_size=self.batch_spin.value(),
                            read_workers=("auto" if self.readers_spin.value() < 0
                                          else self.readers_spin.value()),
                            compile=self.compile_check.isChecked(),
                            cache=self.cache_check.isChecked(),
                            method=self.method_combo.currentText())

    def save_settings(self) -> None:
        model = self.current_model()
        self.settings.model = model
        self.settings.set_params(model, self.params())
        self.settings.set("mode", self.mode_combo.currentData())
        self.settings.set("area", self.area_combo.currentData())
        self.settings.set("count_method", self.count_method_combo.currentData())
        self.settings.set("index_path", self.index_widget.filePath())
        self.settings.set("archive_top_k", self.archive_topk.value())
        self.settings.set("caption_bank", self.caption_bank() or "")
        self.settings.caption_model = self.caption_model()

    def reset_params(self) -> None:
        self.settings.reset_params(self.current_model())
        self.show_params(self.settings.params(self.current_model()))

    def _model_changed(self, *_):
        self.show_params(self.settings.params(self.current_model()))

    def _method_changed(self, method: str) -> None:
        """Tile size and threshold have their own defaults per method: follow them
        unless the user changed them."""
        old = model_defaults(self.current_model(), self._shown_method)
        new = model_defaults(self.current_model(), method)
        self._shown_method = method
        if self.tile_spin.value() == old.tile_px:
            self.tile_spin.setValue(int(new.tile_px))
        if self._threshold() == old.threshold:
            self._show_threshold(new.threshold)

    def _threshold(self) -> Optional[float]:
        thr = self.threshold_spin.value()
        return None if thr <= self.threshold_spin.minimum() else thr

    def _show_threshold(self, value: Optional[float]) -> None:
        self.threshold_spin.setValue(self.threshold_spin.minimum() if value is None else float(value))

    def _mode_changed(self, *_):
        mode = self.mode_combo.currentData()
        self.count_method_combo.setVisible(mode == "count")
        self.prompt_combo.lineEdit().setPlaceholderText(
            "water; forest; farmland; urban; bare ground" if mode == "classes"
            else "storage tanks; a harbor with ships")

    def _area_changed(self, *_):
        on = self.area_combo.currentData() == "selection"
        self.polygon_combo.setEnabled(on)
        self.polygon_combo.setVisible(on)
        self.polygon_label.setVisible(on)

    # -------------------------------------------------------------- models --
    def add_checkpoint(self) -> Optional[str]:
        """Add a checkpoint file to the picker (published files need no architecture)."""
        from .dialogs.model_manager import ask_checkpoint
        picked = ask_checkpoint(self)
        return None if picked is None else self.add_model(*picked)

    def add_model_folder(self) -> Optional[str]:
        folder = QFileDialog.getExistingDirectory(self, "Add a model folder (open_clip_config.json)")
        if not folder:
            return None
        if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
            log.bar_warning(self.iface, f"{folder} has no open_clip_config.json: not a model folder")
            return None
        return self.add_model(folder, os.path.basename(folder.rstrip("/\\")) or folder)

    def add_model(self, spec: str, label: Optional[str] = None) -> str:
        self.settings.add_custom_model(spec, label)
        self._fill_models()
        self.select_model(spec)
        return spec

    def remove_current_model(self) -> None:
        spec = self.current_model()
        if any(m["spec"] == spec for m in self.settings.custom_models()):
            self.settings.remove_custom_model(spec)
            self._fill_models()

    # ---------------------------------------------------------------- area --
    def canvas(self):
        return self.iface.mapCanvas() if self.iface is not None else None

    def area(self) -> Tuple[Optional[QgsRectangle], Optional[QgsCoordinateReferenceSystem]]:
        """The search area as (rectangle, its CRS); (None, None) for the whole layer.
        With selected polygons, their union and CRS are kept in ``_selection`` too
        (a land-cover map is made inside them, not in their bounding box)."""
        mode = self.area_combo.currentData()
        self._selection = None
        if mode == "layer":
            return None, None
        if mode == "selection":
            layer = self.polygon_combo.currentLayer()
            if layer is None or layer.selectedFeatureCount() == 0:
                raise ValueError("select one or more polygons in the polygon layer "
                                 "(or choose another area)")
            geom = QgsGeometry.unaryUnion([f.geometry() for f in layer.selectedFeatures()])
            self._selection = (geom, layer.crs())
            return geom.boundingBox(), layer.crs()
        canvas = self.canvas()
        if canvas is None:
            return None, None
        return canvas.extent(), canvas.mapSettings().destinationCrs()

    # ----------------------------------------------------------------- run --
    def prompts(self) -> List[str]:
        return split_prompts(self.prompt_combo.currentText())

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress.setValue(0)

    def _refuse(self, text: str, bar: bool = True) -> bool:
        """A run that does not start: say why in the message bar and in the status line (no
        earlier run's result is left there to be taken for this one's). False."""
        if bar:
            log.bar_warning(self.iface, text)
        self.status_label.setText(f"Not started: {text}")
        self.progress.setValue(0)
        return False

    def run(self) -> bool:
        """Start a search with the dock's values; False (and a message) if it cannot start."""
        if self.task is not None or self.renderer is not None:
            return False
        layer = self.layer_combo.currentLayer()
        prompts = self.prompts()
        if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
            return self._refuse("choose a raster layer to search")
        if not prompts:
            return self._refuse("type what to look for in the prompt field")
        if not self._packages_ready():
            return self._refuse("MapCLIP's packages are missing (see the top of the dock)",
                                bar=False)
        try:
            params = self.params()
            bands = params.band_list()
            rect, rect_crs = self.area()
        except ValueError as exc:
            return self._refuse(str(exc))
        self.caption_view.clear()          # the caption of an earlier result is not this run's
        self.caption_view.setToolTip("")
        self.last_caption = None
        self.save_settings()
        self.settings.add_prompt("; ".join(prompts))
        self._refresh_history("; ".join(prompts))
        model = self.current_model()
        mode = self.mode_combo.currentData()
        source = render.raster_source(layer)
        self.results.clear()
        self.last_layers, self.last_result, self.last_count = [], None, None
        self._set_running(True)
        if source is not None:
            extent = None if rect is None else (rect.xMinimum(), rect.yMinimum(),
                                                rect.xMaximum(), rect.yMaximum())
            self._start_job(source, prompts, model, mode, params, bands, extent,
                            crs_text(rect_crs) if rect is not None else None, layer.crs(),
                            gsd=params.gsd or None)
            return True
        # not a file: QGIS renders it at the GSD first
        try:
            plan = render.plan_render(layer, rect, rect_crs,
                                      params.gsd or self._canvas_gsd(layer))
        except ValueError as exc:
            self._set_running(False)
            return self._refuse(str(exc))
        self.status_label.setText(f"Rendering {layer.name()} at {plan.ground_gsd or plan.gsd:.2f} m/px (ground) "
                                  f"({plan.width}×{plan.height} px)…")
        self.renderer = render.AsyncRender(layer, plan, parent=self)
        self._temp_files.append(self.renderer.path)
        self.renderer.done.connect(partial(self._rendered, prompts, model, mode, params, bands, plan))
        self.renderer.failed.connect(self._render_failed)
        self.renderer.start()
        return True

    def _canvas_gsd(self, layer) -> Optional[float]:
        """The map's current pixel size, as a default GSD for basemaps."""
        canvas = self.canvas()
        if canvas is None:
            return None
        crs = render.render_crs(layer, canvas.mapSettings().destinationCrs())
        ext = canvas.extent()
        src = canvas.mapSettings().destinationCrs()
        if src != crs:
            ext = QgsCoordinateTransform(src, crs, QgsProject.instance()).transformBoundingBox(ext)
        width = max(1, canvas.width())
        if ext.width() <= 0:
            return None
        return ext.width() / width / render.units_per_metre(crs, ext)   # ground metres per pixel

    def _rendered(self, prompts, model, mode, params, bands, plan, path: str) -> None:
        self.renderer = None
        # the rendered image is the area: search all of it, at its own pixel size
        self._start_job(path, prompts, model, mode, params, bands, None, None, plan.crs, gsd=None)

    def _render_failed(self, message: str) -> None:
        self.renderer = None
        self._set_running(False)
        if message == "cancelled":
            self.status_label.setText("Cancelled")
            self.run_finished.emit("cancelled")
        else:
            log.bar_error(self.iface, f"rendering failed: {message}")
            self.status_label.setText("Rendering failed")
            self.run_finished.emit("error")

    def _start_job(self, source: str, prompts: List[str], model: str, mode: str,
                   params: SearchParams, bands, extent, extent_crs, layer_crs, gsd) -> None:
        run_time = _dt.datetime.now(_dt.timezone.utc)
        if mode == "classes":
            import json
            options = params.classify_options()
            options = replace(options, read=replace(options.read, gsd=gsd))
            within = within_crs = None
            if getattr(self, "_selection", None) is not None and extent is not None:
                geom, sel_crs = self._selection
                within, within_crs = [json.loads(geom.asJson())], crs_text(sel_crs)
            out = layers.unique_path(layers.results_place()[1],
                                     f"classes_{run_time.astimezone():%Y%m%d_%H%M%S}", ".tif")
            req = tasks.ClassifyRequest(raster=source, classes=prompts, model=model,
                                        model_name=model, options=options, out=out,
                                        extent=extent, extent_crs=extent_crs, within=within,
                                        within_crs=within_crs)
            fn = partial(tasks.run_classify, req)
            title = f"MapCLIP: land cover '{'; '.join(prompts)[:40]}'"
            on_done = partial(self._classes_done, req, layer_crs)
        elif mode == "count":
            options = params.count_options(model)
            options = replace(options, read=replace(options.read, gsd=gsd))
            req = tasks.CountRequest(raster=source, object_name=prompts[0], model=model,
                                     model_name=model, options=options,
                                     method=self.count_method_combo.currentData(),
                                     extent=extent, extent_crs=extent_crs)
            fn = partial(tasks.run_count, req)
            title = f"MapCLIP: count '{prompts[0]}'"
            on_done = partial(self._count_done, req, layer_crs, run_time)
        else:
            options = params.detect_options(model, heatmap=(mode == "heatmap"))
            options = replace(options, read=replace(options.read, gsd=gsd))
            req = tasks.DetectRequest(raster=source, prompts=prompts, model=model, model_name=model,
                                      options=options, extent=extent, extent_crs=extent_crs)
            fn = partial(tasks.run_detect, req)
            title = f"MapCLIP: search '{'; '.join(prompts)[:40]}'"
            gpkg = self.gpkg_widget.filePath() if self.save_check.isChecked() else None
            if not gpkg:     # results are kept: the project's results GeoPackage
                gpkg = layers.results_place()[0]
            else:
                from ..engine.core.errors import MapClipError
                from ..engine.core.jobs import check_outputs
                from ..engine.raster.reader import raster_files
                try:  # the engine's output guard: never an input, writable (layers are added)
                    check_outputs([("Save to GeoPackage", gpkg)],
                                  [("Layer", f) for f in raster_files(source)], overwrite=True)
                except MapClipError as exc:
                    log.bar_warning(self.iface, log.error_text(exc, FIELD_LABELS))
                    self._finish("error")
                    return
            on_done = partial(self._detect_done, req, layer_crs, run_time, gpkg, mode)
        self.last_request = req
        if not self._preload(self.status_label):
            self._finish("error")
            return
        self.status_label.setText(f"Loading {model}…")
        self._run_info = req.info
        # window mode counts windows (tiles x tiles, stride apart) as it scores them, not tiles
        self._run_unit = ("windows" if isinstance(req, tasks.DetectRequest)
                          and req.options.mode == "window" else "tiles")
        self._status = self.status_label
        self.task = tasks.EngineTask(title, fn, on_done=on_done, on_error=self._job_error,
                                     on_cancel=self._job_cancelled, iface=self.iface)
        self.task.stepped.connect(self._stepped)
        if isinstance(req, tasks.DetectRequest):   # the best boxes so far, during the pass
            self._preview = SearchPreview(req.prompts, model, layer_crs)
            req.preview = self.task.previewed.emit
            self.task.previewed.connect(self._show_preview)
        tasks.start(self.task)

    def _show_preview(self, boxes, done: int, total: int) -> None:
        if self._preview is None or self.task is None:
            return
        self._preview.show(boxes, done, total)

    def _drop_preview(self) -> None:
        if self._preview is not None:
            self._preview.discard()
            self._preview = None

    def _preload(self, status: QLabel) -> bool:
        """Import torch and friends on the main thread before the first job (never in a
        worker thread; see mapclip/plugin/runtime.py). False, with the reason shown, if they fail."""
        if runtime.preloaded():
            return True
        # the import holds the GUI for seconds: say why before it, painted, with Run off
        run_was_on = self.run_button.isEnabled()
        self.run_button.setEnabled(False)
        status.setText("Loading PyTorch (first search only)…")
        status.repaint()
        self.run_button.repaint()
        QApplication.processEvents()
        QApplication.setOverrideCursor(Qt.WaitCursor)
        try:
            runtime.preload()
        except ImportError as exc:
            text = log.bar_error(self.iface, "search failed", exc)
            status.setText(text)
            self.run_button.setEnabled(run_was_on)
            return False
        finally:
            QApplication.restoreOverrideCursor()
        return True

    def _stepped(self, done: int, total: int) -> None:
        task = self.task
        if task is None:
            return
        self.progress.setValue(int(100 * done / total) if total else 0)
        device = getattr(self, "_run_info", {}).get("device") or self.device_combo.currentText()
        so_far = ""
        if self._preview is not None and self._preview.layer is not None:
            so_far = f" · {self._preview.boxes} boxes so far"
        unit = getattr(self, "_run_unit", "tiles")
        self._status.setText(f"{done}/{total} {unit} · {task.rate():.1f} {unit}/s · {device}{so_far}")

    def _finish(self, outcome: str) -> None:
        self.task = None
        self._set_running(False)
        self._cleanup_temp()
        self.run_finished.emit(outcome)

    def _detect_done(self, req: tasks.DetectRequest, layer_crs, run_time, gpkg, mode, result) -> None:
        self.last_result = result
        self._drop_preview()
        try:
            _, made = layers.add_detect_result(result, req.prompts, req.model_name, crs=layer_crs,
                                               gpkg=gpkg, boxes=True,
                                               heatmap=(mode == "heatmap"), run_time=run_time,
                                               folder=layers.results_place()[1])
        except Exception as exc:
            log.bar_error(self.iface, "adding the result layers failed", exc)
            self._finish("error")
            return
        self.last_layers = made
        self._notes(getattr(result, "warnings", None))
        crs = layers.result_crs(result.crs, layer_crs)
        features = _features_by(made, ("prompt", "rank"))
        raster = req.raster if req.raster not in self._temp_files else None  # rendered: deleted
        for box in sorted(result.boxes, key=lambda b: (-b.score, b.prompt)):
            item = QTreeWidgetItem([str(box.rank), box.prompt, f"{box.score:.3f}"])
            item.setData(0, ROLE_BOUNDS, list(box.bounds))
            item.setData(0, ROLE_CRS, crs)
            item.setData(0, ROLE_RASTER, raster)
            item.setData(0, ROLE_FEATURE, features.get((box.prompt, int(box.rank))))
            self.results.addTopLevelItem(item)
        self._fit_result_columns()
        rate = result.tiles / result.seconds if result.seconds else 0.0
        self.progress.setValue(100)
        if getattr(result, "from_cache", False):   # no pass over the raster: no tile rate
            how = f"{result.tiles} tiles from the kept embeddings in {result.seconds:.2f} s"
        else:
            how = f"{result.tiles} tiles in {result.seconds:.1f} s ({rate:.1f} tiles/s)"
        self.status_label.setText(f"{len(result.boxes)} boxes · {how} · {result.device} · "
                                  f"saved in {gpkg}")
        self._finish("done")

    def _notes(self, notes) -> None:
        """A job's notes in the message bar, the options named as the dock names them."""
        for note in notes or []:
            log.bar_warning(self.iface, renamed(str(note), FIELD_LABELS.get))

    def _fit_result_columns(self) -> None:
        for col in range(3):
            self.results.resizeColumnToContents(col)

    def _classes_done(self, req: tasks.ClassifyRequest, layer_crs, result) -> None:
        self.last_result = result
        try:
            layer = layers.classes_layer(result, layer_crs)
            group = layers.run_group(f"MapCLIP land cover: {'; '.join(req.classes)[:50]}")
            layers.add_to_group(layer, group)
            self.last_layers = [layer]
        except Exception as exc:
            log.bar_error(self.iface, "adding the land-cover layer failed", exc)
            self._finish("error")
            return
        self._notes(result.warnings)
        for name, share in result.shares.items():
            item = QTreeWidgetItem(["", name, f"{share:.1%}"])
            self.results.addTopLevelItem(item)
        self._fit_result_columns()      # shares read whole ("48.2%", not "48....")
        self.progress.setValue(100)
        self.status_label.setText(f"Land cover: {len(result.classes)} classes · {result.tiles} tiles "
                                  f"in {result.seconds:.1f} s · {result.device}")
        self._finish("done")

    def _count_done(self, req: tasks.CountRequest, layer_crs, run_time, result) -> None:
        self.last_result = result
        text = result.summary()      # which method's number is the count, and the other's
        self.last_count = text
        crs = layers.result_crs(result.crs, layer_crs)
        # the counted objects (dense), else the counted area: a double-click zooms to each
        rows = [(str(i), b.bounds, f"{b.score:.3f}") for i, b in enumerate(result.boxes, 1)]
        for rank, bounds, score in rows or [("", result.extent, str(result.count))]:
            item = QTreeWidgetItem([rank, req.object_name, score])
            item.setData(0, ROLE_BOUNDS, list(bounds) if bounds else None)
            item.setData(0, ROLE_CRS, crs)
            self.results.addTopLevelItem(item)
        self._fit_result_columns()
        try:
            layer = layers.count_layer(result, req.model_name, layer_crs, run_time)
            group = layers.run_group(f"MapCLIP count: {req.object_name}")
            layers.add_to_group(layer, group)
            self.last_layers = [layer]
        except Exception as exc:
            log.bar_error(self.iface, "adding the count layer failed", exc)
        self.progress.setValue(100)
        self.status_label.setText(f"Count of '{req.object_name}': {text}")
        log.bar_success(self.iface, f"count of '{req.object_name}': {text}")
        self._finish("done")

    def _job_error(self, exc: BaseException, details: str) -> None:
        self._drop_preview()
        text = log.bar_error(self.iface, "search failed", exc, details, names=FIELD_LABELS)
        self.status_label.setText(text)
        self._finish("error")

    def _job_cancelled(self) -> None:
        kept = self._preview.keep_partial() if self._preview is not None else 0
        self._preview = None
        if kept:
            self._status.setText(f"Cancelled: kept the {kept} boxes found so far (partial, not fitted)")
        else:
            self._status.setText("Cancelled: nothing added")
        self.progress.setValue(0)
        self._finish("cancelled")

    def cancel(self) -> None:
        if self.renderer is not None:
            self.renderer.cancel()
        if self.task is not None:
            self.task.cancel()
        self._status.setText("Cancelling…")

    def _cleanup_temp(self) -> None:
        for path in self._temp_files:
            try:
                os.remove(path)
            except OSError:
                pass
        self._temp_files = []

    def _refresh_history(self, current: str) -> None:
        self.prompt_combo.blockSignals(True)
        self.prompt_combo.clear()
        self.prompt_combo.addItems(self.settings.prompt_history())
        self.prompt_combo.setEditText(current)
        self.prompt_combo.blockSignals(False)

    # ------------------------------------------------------------- results --
    def zoom_to_item(self, item: QTreeWidgetItem, column: int = 0) -> bool:
        bounds = item.data(0, ROLE_BOUNDS)
        crs = item.data(0, ROLE_CRS)
        canvas = self.canvas()
        if not bounds or canvas is None:
            return False
        rect = QgsRectangle(*[float(v) for v in bounds])
        dest = canvas.mapSettings().destinationCrs()
        if isinstance(crs, QgsCoordinateReferenceSystem) and crs.isValid() and crs != dest:
            rect = QgsCoordinateTransform(crs, dest, QgsProject.instance()).transformBoundingBox(rect)
        canvas.setExtent(rect.buffered(max(rect.width(), rect.height()) * 0.5))
        canvas.refresh()
        try:
            canvas.flashGeometries([QgsGeometry.fromRect(rect)], dest)
        except Exception:
            pass
        return True

    # ------------------------------------------------------------- archive --
    def index_path(self) -> str:
        return self.index_widget.filePath().strip()

    def build_index(self) -> bool:
        folder = self.build_sources.filePath().strip()
        out = self.index_path()
        if not folder or not os.path.isdir(folder):
            log.bar_warning(self.iface, "choose a folder of rasters or images to index")
            return False
        if not out:
            out = QFileDialog.getExistingDirectory(self, "Folder for the new index", folder)
            if not out:
                return False
            self.index_widget.setFilePath(out)
        if not self._packages_ready():
            return False
        model = self.current_model()
        device = None if self.device_combo.currentText() == "auto" else self.device_combo.currentText()
        readers = self.params().read_workers

        def job(progress, cancel):
            from ..engine.archive.build import build_index
            from ..engine.core.options import IndexOptions, ReadOptions
            options = IndexOptions(device=device,
                                   read=None if readers == "auto" else ReadOptions(workers=readers))
            return build_index([folder], out, tasks.get_model(model, device), options,
                                      progress=progress, cancel=cancel)

        def done(info):
            self.archive_status.setText(f"Index written: {out}")
            self.settings.set("index_path", out)
            log.bar_success(self.iface, f"index built: {out}")
            self._notes(info.warnings)

        return self._start_archive_task(f"MapCLIP: index {folder}", job, done)

    def search_archive(self, like=None) -> bool:
        index = self.index_path()
        text = self.archive_query.text().strip()
        if not index or not os.path.exists(index):
            log.bar_warning(self.iface, "open or build an index first")
            return False
        if like is None and not text:
            log.bar_warning(self.iface, "type a query, or click a place on the map")
            return False
        if not self._packages_ready():
            return False
        self.save_settings()
        model = self.current_model()
        device = None if self.device_combo.currentText() == "auto" else self.device_combo.currentText()
        top_k = self.archive_topk.value()
        query = text if like is None else "like ({:.1f}, {:.1f})".format(like[0], like[1])

        def job(progress, cancel):
            from ..engine.archive.search import search_index
            from ..engine.archive.store import open_index
            from ..engine.core.options import SearchOptions
            idx = open_index(index)
            options = SearchOptions(top_k=top_k, device=device)
            kwargs = {"model": tasks.model_for_index(idx, model, device), "options": options,
                      "progress": progress, "cancel": cancel}
            if like is None:
                return search_index(idx, text=text, **kwargs)
            return search_index(idx, like=(like[0], like[1]), like_crs=like[2], **kwargs)

        def done(hits):
            self._show_hits(hits or [], query, model)

        return self._start_archive_task(f"MapCLIP: archive search '{query}'", job, done)

    def _start_archive_task(self, title, job, done) -> bool:
        if self.task is not None:
            return False
        if not self._preload(self.archive_status):
            return False
        self.archive_status.setText(title + "…")
        self._status = self.archive_status

        def on_done(result):
            try:
                done(result)
            finally:
                self._finish("done")

        self._run_info, self._run_unit = {}, "tiles"
        self.task = tasks.EngineTask(title, job, on_done=on_done, on_error=self._archive_error,
                                     on_cancel=self._job_cancelled, iface=self.iface)
        self.task.stepped.connect(self._stepped)
        self._set_running(True)
        tasks.start(self.task)
        return True

    def _archive_error(self, exc, details) -> None:
        self.archive_status.setText(log.bar_error(self.iface, "archive job failed", exc, details,
                                                  names=FIELD_LABELS))
        self._finish("error")

    def _show_hits(self, hits: Sequence[Any], query: str, model: str) -> None:
        self.archive_results.clear()
        layer = layers.hits_layer(hits, query, model)
        if layer.featureCount():
            group = layers.run_group(f"MapCLIP archive: {query[:50]}")
            layers.add_to_group(layer, group)
            self.last_layers = [layer]
        features = _features_by([layer], ("rank",)) if layer.featureCount() else {}
        for i, hit in enumerate(hits):
            src = str(getattr(hit, "raster", getattr(hit, "path", "")))
            item = QTreeWidgetItem([str(getattr(hit, "rank", i + 1)), os.path.basename(src),
                                    f"{float(getattr(hit, 'score', 0.0)):.3f}"])
            item.setToolTip(1, src)
            bounds = layers.hit_bounds(hit, layer)
            if bounds is not None:
                item.setData(0, ROLE_BOUNDS, list(bounds))
                item.setData(0, ROLE_CRS, layer.crs())
            item.setData(0, ROLE_RASTER, src or None)
            if layer.featureCount():
                item.setData(0, ROLE_FEATURE, features.get((int(getattr(hit, "rank", i + 1)),)))
            self.archive_results.addTopLevelItem(item)
        self.archive_status.setText(f"{len(hits)} hits for {query}")

    def _pick_toggled(self, on: bool) -> None:
        canvas = self.canvas()
        if canvas is None:
            return
        if on:
            from .maptool import PickPlaceTool
            if self.pick_tool is None:
                self.pick_tool = PickPlaceTool(canvas)
                self.pick_tool.picked.connect(self._place_picked)
            self._prev_tool = canvas.mapTool()
            canvas.setMapTool(self.pick_tool)
        elif self.pick_tool is not None and canvas.mapTool() is self.pick_tool:
            canvas.unsetMapTool(self.pick_tool)
            if self._prev_tool is not None:
                canvas.setMapTool(self._prev_tool)

    def _place_picked(self, point, crs) -> None:
        # put the previous map tool back after this click has been handled, so the
        # click does not reach it (the pan tool would recentre the map on it)
        QTimer.singleShot(0, lambda: self.pick_button.setChecked(False))
        self.search_archive(like=(point.x(), point.y(), crs_text(crs)))

    # ------------------------------------------------------------ describe --
    def _build_describe_box(self) -> QWidget:
        """Describe: caption a result row or a clicked place (engine.caption). A captioning
        model (CoCa, e.g. demo-captioner) writes the caption; another model ranks the
        captions of the caption bank."""
        box = QWidget()
        box.setObjectName("mapclipDescribe")
        form = QFormLayout(box)
        margins = form.contentsMargins()
        form.setContentsMargins(margins.left(), 0, margins.right(), 0)
        self.caption_model_combo = QComboBox()
        self.caption_model_combo.setToolTip("the model that describes: a captioning model (CoCa, "
                                            "e.g. demo-captioner) writes the caption; another "
                                            "model ranks the captions of the caption bank")
        form.addRow(FIELD_LABELS["caption_model"], self.caption_model_combo)
        self.bank_widget = QgsFileWidget()
        self.bank_widget.setStorageMode(QgsFileWidget.GetFile)
        self.bank_widget.setFilter("Caption banks (*.csv *.tsv *.txt *.json *.jsonl)")
        self.bank_widget.setToolTip("captions to choose from, for models that cannot write "
                                    "(a CSV with one caption a line or a caption column, an "
                                    "RSICD-style JSON, Box-to-Caption output); a captioning "
                                    "model (CoCa) writes its own")
        form.addRow(FIELD_LABELS["bank"], self.bank_widget)
        row = QHBoxLayout()
        self.describe_button = QPushButton("Describe")
        self.describe_button.setToolTip("caption the selected result of the tab shown (a box, "
                                        "an archive hit), in the raster it was found in; the "
                                        "caption goes into the list and into the layer's "
                                        "caption field")
        self.describe_button.clicked.connect(
            lambda _checked=False: self.describe_item(self._shown_results().currentItem()))
        self.describe_place_button = QPushButton("Describe a place…")
        self.describe_place_button.setCheckable(True)
        self.describe_place_button.setToolTip("click the map: the tile around the point "
                                              "(Tile size x Window pixels of the layer) is "
                                              "captioned")
        self.describe_place_button.toggled.connect(self._describe_toggled)
        row.addWidget(self.describe_button)
        row.addWidget(self.describe_place_button)
        form.addRow(row)
        self.caption_view = QLabel("")
        self.caption_view.setObjectName("mapclipCaption")
        self.caption_view.setWordWrap(True)
        self.caption_view.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form.addRow("Caption", self.caption_view)
        return box

    def _results_menu(self, tree: QTreeWidget) -> None:
        tree.setContextMenuPolicy(Qt.CustomContextMenu)

        def show(pos):
            item = tree.itemAt(pos)
            if item is None:
                return
            menu = QMenu(tree)
            menu.addAction("Describe", lambda: self.describe_item(item))
            menu.addAction("Zoom to", lambda: self.zoom_to_item(item))
            menu.exec_(tree.viewport().mapToGlobal(pos))

        tree.customContextMenuRequested.connect(show)

    def _shown_results(self) -> QTreeWidget:
        """The results list of the tab shown (Search: boxes; Archive: hits)."""
        return self.archive_results if self.tabs.currentIndex() == 1 else self.results

    def caption_model(self) -> str:
        return str(self.caption_model_combo.currentData() or self.caption_model_combo.currentText())

    def _caption_tile_px(self) -> int:
        """Describe a place: the caption model's own window (tile size x window), in pixels."""
        d = model_defaults(self.caption_model())
        return int(d.tile_px) * int(d.window)

    def caption_bank(self) -> Optional[str]:
        path = self.bank_widget.filePath().strip()
        return path or None

    def describe_item(self, item: Optional[QTreeWidgetItem]) -> bool:
        """Caption a result row (a box, an archive hit) through the engine; the caption goes
        into the row, the dock and the row's feature (field ``caption``). False, with a
        message, if it cannot start."""
        if item is None:
            log.bar_warning(self.iface, "select a result to describe")
            return False
        bounds, raster = item.data(0, ROLE_BOUNDS), item.data(0, ROLE_RASTER)
        if not bounds:
            log.bar_warning(self.iface, "this result has no place to describe")
            return False
        if not raster or not os.path.isfile(raster):
            log.bar_warning(self.iface, "this result's raster is not a file that can be read "
                                        "again (a rendered basemap, or moved): describe a place "
                                        "of a raster file instead")
            return False
        crs = item.data(0, ROLE_CRS)
        crs = crs_text(crs) if isinstance(crs, QgsCoordinateReferenceSystem) and crs.isValid() else None
        status = self.archive_status if item.treeWidget() is self.archive_results else self.status_label
        return self._start_describe(raster, tuple(float(v) for v in bounds), crs, status, item)

    def _describe_toggled(self, on: bool) -> None:
        canvas = self.canvas()
        if canvas is None:
            return
        if on:
            from .describe_tool import DescribePlaceTool
            if self.describe_tool is None:
                self.describe_tool = DescribePlaceTool(
                    canvas, self.layer_combo.currentLayer, self._caption_tile_px)
                self.describe_tool.place.connect(self._describe_place)
                self.describe_tool.failed.connect(self._describe_refused)
            self._prev_tool = canvas.mapTool()
            canvas.setMapTool(self.describe_tool)
        elif self.describe_tool is not None and canvas.mapTool() is self.describe_tool:
            canvas.unsetMapTool(self.describe_tool)
            if self._prev_tool is not None:
                canvas.setMapTool(self._prev_tool)

    def _describe_refused(self, message: str) -> None:
        QTimer.singleShot(0, lambda: self.describe_place_button.setChecked(False))
        log.bar_warning(self.iface, message)

    def _describe_place(self, rect: QgsRectangle, crs, layer) -> bool:
        """The map tool's tile (in the layer's CRS) of ``layer``, captioned."""
        QTimer.singleShot(0, lambda: self.describe_place_button.setChecked(False))
        source = render.raster_source(layer)
        if source is None:
            log.bar_warning(self.iface, f"{layer.name()} is not a raster file (a basemap): "
                                        "Describe reads raster files")
            return False
        bounds = (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
        return self._start_describe(source, bounds, crs_text(crs), self.status_label, None)

    def _start_describe(self, raster: str, bounds, extent_crs: Optional[str], status: QLabel,
                        item: Optional[QTreeWidgetItem]) -> bool:
        if self.task is not None or self.renderer is not None:
            log.bar_warning(self.iface, "a job is running: wait for it, or cancel it")
            return False
        if not self._packages_ready():
            return False
        from ..engine.core.options import CaptionOptions
        self.save_settings()
        model = self.caption_model()
        device = self.device_combo.currentText()
        # the caption model's own reading of the raster: nothing of the Search tab's bands or GSD
        options = replace(CaptionOptions(), device=None if device in ("", "auto") else device)
        req = tasks.CaptionRequest(raster=raster, places=[tuple(bounds)], model=model,
                                   model_name=model, options=options, extent_crs=extent_crs,
                                   bank=self.caption_bank())
        if not self._preload(status):
            return False
        status.setText(f"Describing with {model}…")
        self._status = status
        self._run_info, self._run_unit = req.info, "tiles"
        feature = item.data(0, ROLE_FEATURE) if item is not None else None
        self.task = tasks.EngineTask(f"MapCLIP: describe ({os.path.basename(raster)})",
                                     partial(tasks.run_caption, req),
                                     on_done=partial(self._described, req, status, item, feature),
                                     on_error=partial(self._describe_error, status),
                                     on_cancel=self._job_cancelled, iface=self.iface)
        self.task.stepped.connect(self._stepped)
        self._set_running(True)
        tasks.start(self.task)
        return True

    def _described(self, req, status: QLabel, item, feature, result) -> None:
        place = result.places[0] if result.places else None
        text = place.best if place is not None else None
        if not text:
            status.setText("Describe: no caption")
            self._finish("error")
            return
        best = place.captions[0]
        self.last_caption = text
        how = "written by" if result.method == "generation" else "ranked by"
        self.caption_view.setText(text)
        self.caption_view.setToolTip("\n".join(f"{c.rank}. {c.text} ({c.cosine:.3f})"
                                                for c in place.captions)
                                     if result.method == "retrieval" else f"{how} {result.model}")
        status.setText(f"Caption ({how} {result.model}): {text}")
        if item is not None:
            item.setText(CAPTION_COLUMN, text)
            item.setToolTip(CAPTION_COLUMN, text)
        if feature:
            from .describe_tool import write_caption
            layer = QgsProject.instance().mapLayer(feature[0])
            if not write_caption(layer, int(feature[1]), text,
                                 None if result.method == "generation" else best.cosine):
                log.bar_warning(self.iface, "the caption could not be written into the result "
                                            "layer (read-only?)")
        self.progress.setValue(100)
        self._finish("done")

    def _describe_error(self, status: QLabel, exc: BaseException, details: str) -> None:
        status.setText(log.bar_error(self.iface, "describe failed", exc, details,
                                     names=FIELD_LABELS))
        self._finish("error")

    # ------------------------------------------------------------- cleanup --
    def shutdown(self) -> None:
        """Stop what runs and release the map tool (plugin unload)."""
        if self.task is not None:
            self.task.on_done = self.task.on_error = self.task.on_cancel = None
            self.task.cancel()
            self.task = None
        if self.renderer is not None:
            self.renderer.cancel()
            self.renderer = None
        canvas = self.canvas()
        if canvas is not None and self.pick_tool is not None:
            if canvas.mapTool() is self.pick_tool:
                canvas.unsetMapTool(self.pick_tool)
            self.pick_tool.deleteLater()
            self.pick_tool = None
        if canvas is not None and self.describe_tool is not None:
            if canvas.mapTool() is self.describe_tool:
                canvas.unsetMapTool(self.describe_tool)
            self.describe_tool.deleteLater()
            self.describe_tool = None
        self._cleanup_temp()


def _features_by(made: Sequence[Any], keys: Tuple[str, ...]) -> dict:
    """{(values of ``keys``): [layer id, feature id]} over the vector layers in ``made`` that
    have those fields (a result row finds its feature by prompt and rank, or rank)."""
    out = {}
    for layer in made:
        fields = getattr(layer, "fields", None)
        if fields is None or any(layer.fields().indexOf(k) < 0 for k in keys):
            continue
        for f in layer.getFeatures():
            key = tuple(int(f[k]) if k == "rank" else f[k] for k in keys)
            out.setdefault(key, [layer.id(), int(f.id())])
    return out
