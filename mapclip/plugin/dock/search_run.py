"""The Search tab's runs: starting a job (rendering a basemap first), progress, the
preview, and the results: boxes, counts, classes, the results list."""
from __future__ import annotations

import datetime as _dt
from dataclasses import replace
from functools import partial
from typing import List, Optional

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsGeometry,
                       QgsProject, QgsRasterLayer, QgsRectangle)
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QApplication, QLabel, QTreeWidgetItem

from ...engine.core.errors import renamed
from ...engine.core.options import split_prompts
from .. import layers, log, marks, render, runtime, tasks
from ..layers import crs_text
from ..preview import SearchPreview
from ..settings import FIELD_LABELS, SearchParams
from .widgets import ROLE_BOUNDS, ROLE_CRS, ROLE_FEATURE, ROLE_RASTER, features_by


class SearchRun:
    """Starting searches and showing what they found (a part of :class:`~.shell.MapClipDock`)."""

    # ----------------------------------------------------------------- run --
    def prompts(self) -> List[str]:
        return split_prompts(self.prompt_combo.currentText())

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
            try:
                examples, examples_crs = self.marked_examples(options.mode == "window")
            except ValueError as exc:
                log.bar_warning(self.iface, str(exc))
                self._finish("error")
                return
            req = tasks.DetectRequest(raster=source, prompts=prompts, model=model, model_name=model,
                                      options=options, extent=extent, extent_crs=extent_crs,
                                      examples=examples, examples_crs=examples_crs)
            fn = partial(tasks.run_detect, req)
            title = f"MapCLIP: search '{'; '.join(prompts)[:40]}'"
            gpkg = self.gpkg_widget.filePath() if self.save_check.isChecked() else None
            if not gpkg:     # results are kept: the project's results GeoPackage
                gpkg = layers.results_place()[0]
            else:
                from ...engine.core.errors import MapClipError
                from ...engine.core.jobs import check_outputs
                from ...engine.raster.reader import raster_files
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
        # what the marks did is said in the status line ("refined by N yes / M not"), not the bar
        self._notes([n for n in getattr(result, "warnings", None) or []
                     if not (req.examples and str(n).startswith("refined by "))])
        crs = layers.result_crs(result.crs, layer_crs)
        features = features_by(made, ("prompt", "rank"))
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
        refined = ""
        if req.examples:
            refined = f" · {marks.refined_text(req.examples)}"
        self.status_label.setText(f"{len(result.boxes)} boxes · {how}{refined} · {result.device} · "
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
