"""The Search tab's form: layer, model, prompts, mode, area, the Advanced group, and
the values stored per model."""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsMapLayerProxyModel, QgsRectangle
from qgis.gui import QgsCollapsibleGroupBox, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QDoubleSpinBox,
                                 QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QMenu,
                                 QProgressBar, QPushButton, QSpinBox, QToolButton, QVBoxLayout,
                                 QWidget)

from ...engine.core.options import parse_read_workers
from ...engine.model.presets import list_presets
from .. import log
from ..dialogs.model_manager import ask_checkpoint
from ..settings import DEVICES, METHODS, SearchParams, model_defaults
from .widgets import AREAS, COUNT_METHODS, MODES, RESULTS_MIN_HEIGHT, FieldsScroll, ResultsList


class SearchForm:
    """The Search tab's fields and what they hold (a part of :class:`~.shell.MapClipDock`)."""

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

        form.addRow("Examples", self._build_marks_row())

        self._build_advanced()
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
        self.results.setToolTip("double-click a result to zoom to it; right-click to describe it "
                                "or mark it \"Yes, like this\" / \"Not this\"")
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

    def _build_advanced(self) -> None:
        """The Advanced group (collapsed): the values stored per model."""
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

    # ------------------------------------------------------------ settings --
    def _fill_models(self) -> None:
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
