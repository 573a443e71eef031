"""The Archive tab: build or open an index, query it by text or a place on the map, the hits."""
from __future__ import annotations

import os
from typing import Any, Sequence

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import (QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                                 QPushButton, QSpinBox, QTreeWidgetItem, QVBoxLayout, QWidget)

from ...engine.archive.build import build_index
from ...engine.archive.search import search_index
from ...engine.archive.store import open_index
from ...engine.core.options import IndexOptions, ReadOptions, SearchOptions
from ...engine.raster.stac import is_search_url
from .. import layers, log, marks, tasks
from ..layers import crs_text
from ..maptool import PickPlaceTool
from ..settings import FIELD_LABELS
from .widgets import (RESULTS_MIN_HEIGHT, ROLE_BOUNDS, ROLE_CRS, ROLE_FEATURE, ROLE_RASTER,
                      FieldsScroll, ResultsList, features_by)


class ArchiveTab:
    """The Archive tab (a part of :class:`~.shell.MapClipDock`)."""

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
        self.build_sources.setToolTip("a folder of rasters or images to index; or type a STAC "
                                      "catalogue (catalog.json: a file or an http(s) URL), a STAC "
                                      "API's search URL (https://.../search, filters such as "
                                      "?collections=ID&bbox=W,S,E,N&datetime=A/B in its query; "
                                      "every page is read) - their items' visual COG assets are "
                                      "indexed - or a raster's URL")
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

    # ------------------------------------------------------------- archive --
    def index_path(self) -> str:
        return self.index_widget.filePath().strip()

    def build_index(self) -> bool:
        folder = self.build_sources.filePath().strip()
        out = self.index_path()
        web = folder.lower().startswith(("http://", "https://", "/vsi"))
        stac = (folder.lower().endswith(".json") and (web or os.path.isfile(folder))
                or is_search_url(folder))
        if not folder or not (stac or web or os.path.isdir(folder)):
            log.bar_warning(self.iface, "Sources: choose a folder of rasters or images, or give a "
                                        "STAC catalogue (.json file or URL), a STAC API's search "
                                        "URL or a raster's URL")
            return False
        if stac or web:
            folder_for_dialog = os.path.expanduser("~")
        else:
            folder_for_dialog = folder
        if not out:
            out = QFileDialog.getExistingDirectory(self, "Folder for the new index", folder_for_dialog)
            if not out:
                return False
            self.index_widget.setFilePath(out)
        if not self._packages_ready():
            return False
        model = self.current_model()
        device = None if self.device_combo.currentText() == "auto" else self.device_combo.currentText()
        readers = self.params().read_workers

        stac_notes: list = []

        def job(progress, cancel):
            options = IndexOptions(device=device,
                                   read=None if readers == "auto" else ReadOptions(workers=readers))
            sources = [folder]
            if stac:      # the catalogue's or search's COG assets (engine.raster.stac), this thread
                from ...engine.raster.stac import stac_sources
                sources, notes = stac_sources(folder)
                stac_notes.extend(notes)
            return build_index(sources, out, tasks.get_model(model, device), options,
                               progress=progress, cancel=cancel)

        def done(info):
            self.archive_status.setText(f"Index written: {out}")
            self.settings.set("index_path", out)
            log.bar_success(self.iface, f"index built: {out}")
            self._notes(stac_notes + list(info.warnings))

        return self._start_archive_task(f"MapCLIP: index {folder}", job, done)

    def search_archive(self, like=None) -> bool:
        index = self.index_path()
        text = self.archive_query.text().strip()
        if not index or not os.path.exists(index):
            log.bar_warning(self.iface, "open or build an index first")
            return False
        try:
            examples, examples_crs = self.marked_examples(True)
        except ValueError as exc:
            log.bar_warning(self.iface, str(exc))
            return False
        if like is None and not text and not examples:
            log.bar_warning(self.iface, "type a query, or click a place on the map")
            return False
        if not self._packages_ready():
            return False
        self.save_settings()
        model = self.current_model()
        device = None if self.device_combo.currentText() == "auto" else self.device_combo.currentText()
        top_k = self.archive_topk.value()
        query = text if like is None else "like ({:.1f}, {:.1f})".format(like[0], like[1])
        if examples:
            query = (query + " " if query else "") + f"({marks.refined_text(examples)})"

        def job(progress, cancel):
            idx = open_index(index)
            options = SearchOptions(top_k=top_k, device=device)
            kwargs = {"model": tasks.model_for_index(idx, model, device), "options": options,
                      "progress": progress, "cancel": cancel, "examples": examples,
                      "examples_crs": examples_crs}
            if like is None:
                return search_index(idx, text=text or None, **kwargs)
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
        features = features_by([layer], ("rank",)) if layer.featureCount() else {}
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
