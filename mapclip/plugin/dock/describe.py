"""The Describe panel: the caption model and bank, describing a result or a place."""
from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from typing import Optional

from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRectangle
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtWidgets import (QComboBox, QFormLayout, QHBoxLayout, QLabel, QMenu, QPushButton,
                                 QTreeWidget, QTreeWidgetItem, QWidget)

from ...engine.core.options import CaptionOptions
from .. import log, render, tasks
from ..describe_tool import DescribePlaceTool, write_caption
from ..layers import crs_text
from ..settings import FIELD_LABELS, model_defaults
from .widgets import CAPTION_COLUMN, ROLE_BOUNDS, ROLE_CRS, ROLE_FEATURE, ROLE_RASTER


class DescribePanel:
    """The Describe panel under the tabs (a part of :class:`~.shell.MapClipDock`)."""

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
            menu.addSeparator()                # a box or a hit: mark it
            self._add_mark_actions(menu, lambda: self._item_place(item), archive=tree is not self.results)
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
