"""EngineTask in QGIS's real task manager, and search runs from the dock end to end."""
from __future__ import annotations

import threading
import time

import pytest
from qgis.core import QgsApplication


def _wait(qtbot, task, timeout=60000):
    qtbot.waitUntil(lambda: task.is_finished, timeout=timeout)


def test_engine_task_reports_progress_and_delivers_result_on_main_thread(qtbot, iface, mapclip):
    from mapclip.plugin.tasks import EngineTask, start
    from qgis.PyQt.QtCore import QThread
    seen, where = [], {}

    def job(progress, cancel):
        where["job"] = QThread.currentThread()
        for i in range(1, 5):
            progress(i, 4)
        return {"answer": 42}

    def done(result):
        where["done"] = QThread.currentThread()
        seen.append(result)

    task = EngineTask("test job", job, on_done=done, iface=iface)
    steps, percents = [], []
    task.stepped.connect(lambda d, t: steps.append((d, t)))
    task.progressChanged.connect(percents.append)
    start(task)
    _wait(qtbot, task)
    assert task.outcome == "done" and seen == [{"answer": 42}]
    assert where["done"] is QgsApplication.instance().thread()
    assert where["job"] is not where["done"]          # ran in a worker thread
    qtbot.waitUntil(lambda: steps and steps[-1] == (4, 4), timeout=5000)
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert percents and percents[-1] == pytest.approx(100.0)


def test_cancel_stops_the_job_within_a_batch_and_calls_only_on_cancel(qtbot, iface, mapclip):
    from mapclip.engine.core.jobs import Job
    from mapclip.plugin.tasks import EngineTask, start
    began = threading.Event()
    batches = []

    def job(progress, cancel):
        j = Job(progress, cancel, total=10000)
        for i in range(10000):
            began.set()
            time.sleep(0.005)      # one "batch"
            batches.append(i)
            j.step()
        return "finished"

    calls = []
    task = EngineTask("long job", job, on_done=lambda r: calls.append("done"),
                      on_cancel=lambda: calls.append("cancel"), iface=iface)
    start(task)
    assert began.wait(10)
    task.cancel()
    n_at_cancel = len(batches)
    _wait(qtbot, task)
    assert task.outcome == "cancelled" and calls == ["cancel"]
    assert len(batches) <= n_at_cancel + 1      # stopped within one batch
    assert task.result is None


def _run_logged(qtbot, iface, title, job):
    """Run ``job`` as an EngineTask; the task and the (tag, message) pairs QGIS logged."""
    from mapclip.plugin.tasks import EngineTask, start
    logged = []

    def on_log(message, tag, level):
        logged.append((tag, message))

    QgsApplication.messageLog().messageReceived.connect(on_log)
    try:
        task = EngineTask(title, job, iface=iface)
        start(task)
        _wait(qtbot, task)
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(on_log)
    return task, logged


def test_engine_error_becomes_message_bar_error_and_log_entry(qtbot, iface, mapclip):
    from mapclip.engine.core.errors import UsageError

    def job(progress, cancel):
        raise UsageError("raster /nope.tif does not exist", "choose an existing file")

    task, logged = _run_logged(qtbot, iface, "failing job", job)
    assert task.outcome == "error"
    texts = iface.bar_texts()
    assert any("raster /nope.tif does not exist" in t and "choose an existing file" in t
               for t in texts), texts
    # the user's mistake is logged in words, without a traceback
    mine = [msg for tag, msg in logged if tag == "MapCLIP"]
    assert any("raster /nope.tif does not exist" in m and "choose an existing file" in m
               for m in mine), mine
    assert not any("Traceback" in m for m in mine), mine


def test_a_bug_keeps_its_traceback_for_the_log(qtbot, iface, mapclip):
    def job(progress, cancel):
        return {}["missing"]

    task, logged = _run_logged(qtbot, iface, "buggy job", job)
    assert task.outcome == "error"
    assert any(tag == "MapCLIP" and "Traceback" in msg and "KeyError" in msg
               for tag, msg in logged)


def test_missing_package_at_run_time_points_to_the_installer(qtbot, iface, mapclip):
    from mapclip.plugin.tasks import EngineTask, start

    def job(progress, cancel):
        raise ModuleNotFoundError("No module named 'open_clip'", name="open_clip")

    task = EngineTask("search", job, iface=iface)
    start(task)
    _wait(qtbot, task)
    assert task.outcome == "error"
    assert any("open_clip" in t and "Install dependencies" in t for t in iface.bar_texts())


# --------------------------------------------------------------------------- #
# Real searches from the dock (rigged model: responds to red squares)
# --------------------------------------------------------------------------- #
from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer, QgsRectangle  # noqa: E402

from .conftest import make_geotiff, make_xyz_tiles  # noqa: E402

RIGGED = "rigged-test-model"


@pytest.fixture(scope="module")
def rigged(mapclip):
    # tests.rigged builds it with the top-level ``engine``; the plugin runs
    # ``mapclip.engine``, whose LoadedModel class is another object: re-wrap.
    import dataclasses
    from mapclip.engine.model.models import LoadedModel
    from tests.rigged import rigged_model
    lm = rigged_model()
    return LoadedModel(**{f.name: getattr(lm, f.name) for f in dataclasses.fields(lm)})


@pytest.fixture
def search_dock(iface, mapclip, qgis_settings, clean_project, rigged):
    from mapclip.plugin import tasks
    from mapclip.plugin.dock.shell import MapClipDock
    tasks._MODELS[(RIGGED, "auto")] = rigged        # the dock's model cache holds the rigged model
    tasks._MODELS[(rigged.spec, "auto")] = rigged   # and under its own spec (what an index records)
    dock = MapClipDock(iface, iface.main_window)
    dock.select_model(RIGGED)
    dock.tile_spin.setValue(32)
    dock.window_spin.setValue(1)
    dock.stride_spin.setValue(1)
    dock.batch_spin.setValue(16)
    dock.topk_spin.setValue(3)
    dock.prompt_combo.setEditText("red roof")
    yield dock
    dock.shutdown()
    dock.deleteLater()
    tasks._MODELS.pop((RIGGED, "auto"), None)
    tasks._MODELS.pop((rigged.spec, "auto"), None)


def _run(qtbot, dock, timeout=60000):
    outcomes = []
    dock.run_finished.connect(outcomes.append)
    assert dock.run()
    qtbot.waitUntil(lambda: bool(outcomes), timeout=timeout)
    if outcomes[0] == "error":
        print("status:", dock.status_label.text(), dock.iface.bar_texts())
    return outcomes[0]


def _group_layers(project):
    root = project.layerTreeRoot()
    groups = root.findGroups()
    return groups, [l for l in project.mapLayers().values()]


def test_detect_run_adds_boxes_layer_with_fields_crs_and_the_red_square(qtbot, search_dock, tmp_path,
                                                                          clean_project):
    tif = make_geotiff(tmp_path / "scene.tif", squares=((96, 64, 32, "red"),))
    raster = QgsRasterLayer(tif, "scene", "gdal")
    clean_project.addMapLayer(raster)
    search_dock.layer_combo.setLayer(raster)
    search_dock.area_combo.setCurrentIndex(search_dock.area_combo.findData("layer"))
    assert _run(qtbot, search_dock) == "done"
    groups, layers = _group_layers(clean_project)
    assert len(groups) == 1 and groups[0].name().startswith("MapCLIP")
    boxes = [l for l in layers if l.name() == "red roof"]
    assert len(boxes) == 1
    layer = boxes[0]
    assert groups[0].findLayer(layer.id()) is not None
    # kept in the results GeoPackage (its "fid" first)
    assert [f.name() for f in layer.fields()] == ["fid", "prompt", "score", "cosine", "rank",
                                                  "model", "run_time"]
    assert layer.crs().authid() == "EPSG:32633"
    feats = sorted(layer.getFeatures(), key=lambda f: f["rank"])
    assert 1 <= len(feats) <= 3
    best = feats[0]
    assert best["prompt"] == "red roof" and best["model"] == RIGGED and best["rank"] == 1
    assert best["run_time"] is not None and not best["run_time"].isNull()
    # the red square spans x 500096..500128, y 3999904..3999936
    bb = best.geometry().boundingBox()
    assert bb.intersects(QgsRectangle(500096, 3999904, 500128, 3999936))
    assert bb.contains(QgsRectangle(500100, 3999908, 500124, 3999932)) or \
        QgsRectangle(500096, 3999904, 500128, 3999936).contains(bb.center())
    assert type(layer.renderer()).__name__ == "QgsGraduatedSymbolRenderer"
    assert layer.renderer().classAttribute() == "score" and layer.labelsEnabled()
    # the results list zooms to a box on double-click
    item = search_dock.results.topLevelItem(0)
    assert item.text(1) == "red roof"
    canvas = search_dock.iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    assert search_dock.zoom_to_item(item)
    assert canvas.extent().contains(bb.center())
    assert "tiles/s" in search_dock.status_label.text()


def test_extent_in_map_crs_limits_the_search(qtbot, search_dock, tmp_path, clean_project):
    tif = make_geotiff(tmp_path / "two.tif", squares=((16, 16, 32, "red"), (200, 200, 32, "red")))
    raster = QgsRasterLayer(tif, "two", "gdal")
    clean_project.addMapLayer(raster)
    search_dock.layer_combo.setLayer(raster)
    canvas = search_dock.iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    # the lower-right quarter of the raster, in web mercator
    from qgis.core import QgsCoordinateTransform
    quarter = QgsRectangle(500128, 3999744, 500256, 3999872)
    tr = QgsCoordinateTransform(raster.crs(), canvas.mapSettings().destinationCrs(), clean_project)
    canvas.setExtent(tr.transformBoundingBox(quarter))
    search_dock.area_combo.setCurrentIndex(search_dock.area_combo.findData("extent"))
    assert _run(qtbot, search_dock) == "done"
    layer = next(l for l in clean_project.mapLayers().values() if l.name() == "red roof")
    best = min(layer.getFeatures(), key=lambda f: f["rank"])
    c = best.geometry().boundingBox().center()
    assert c.x() > 500128 and c.y() < 3999872           # the square inside the view, not the other


def test_cancel_adds_no_layer(qtbot, search_dock, tmp_path, clean_project, monkeypatch):
    from mapclip.plugin import tasks
    tif = make_geotiff(tmp_path / "scene.tif", width=512, height=512)
    raster = QgsRasterLayer(tif, "scene", "gdal")
    clean_project.addMapLayer(raster)
    search_dock.layer_combo.setLayer(raster)
    search_dock.area_combo.setCurrentIndex(search_dock.area_combo.findData("layer"))
    search_dock.batch_spin.setValue(1)
    real = tasks.run_detect

    calls = []

    def slow(req, progress, cancel):
        def prog(done, total):
            progress(done, total)
            calls.append((done, total))
            time.sleep(0.05)                # slow batches, so the click lands mid-run
        return real(req, prog, cancel)

    monkeypatch.setattr(tasks, "run_detect", slow)
    import mapclip.engine.detect as engine_detect
    monkeypatch.setattr(engine_detect, "PREVIEW_SECONDS", 1e9)   # no preview before the click
    before = set(clean_project.mapLayers())
    outcomes = []
    search_dock.run_finished.connect(outcomes.append)
    assert search_dock.run()
    qtbot.waitUntil(lambda: any(0 < d < t for d, t in calls), timeout=30000)
    assert search_dock.cancel_button.isEnabled()
    search_dock.cancel_button.click()
    qtbot.waitUntil(lambda: bool(outcomes), timeout=30000)
    assert outcomes == ["cancelled"]
    done_at_end = max(d for d, t in calls)
    assert done_at_end < calls[-1][1]               # stopped before the end
    assert set(clean_project.mapLayers()) == before
    assert clean_project.layerTreeRoot().findGroups() == []
    assert search_dock.results.topLevelItemCount() == 0
    assert search_dock.run_button.isEnabled() and not search_dock.cancel_button.isEnabled()


def test_the_best_boxes_so_far_show_in_one_layer_during_the_pass_and_cancel_keeps_them(
        qtbot, search_dock, tmp_path, clean_project, monkeypatch):
    """A long first pass: one preview layer, refilled in place, shows the boxes found so far;
    a finished search replaces it with its result; Cancel keeps it, named as partial."""
    import mapclip.engine.detect as engine_detect
    from mapclip.plugin import tasks
    monkeypatch.setattr(engine_detect, "PREVIEW_SECONDS", 0.0)
    # the square in the first tile row: the first windows scored find it
    tif = make_geotiff(tmp_path / "scene.tif", width=512, height=512, squares=((96, 0, 32, "red"),))
    raster = QgsRasterLayer(tif, "scene", "gdal")
    clean_project.addMapLayer(raster)
    search_dock.layer_combo.setLayer(raster)
    search_dock.area_combo.setCurrentIndex(search_dock.area_combo.findData("layer"))
    search_dock.batch_spin.setValue(4)
    search_dock.cache_check.setChecked(False)          # every run makes a pass over the raster
    real = tasks.run_detect
    seen = []                                          # (layer ids, names) at each progress step

    def slow(req, progress, cancel):
        def prog(done, total):
            progress(done, total)
            time.sleep(0.03)
        return real(req, prog, cancel)
    monkeypatch.setattr(tasks, "run_detect", slow)

    def previews():
        return [l for l in clean_project.mapLayers().values() if "so far" in l.name()]
    outcomes = []
    search_dock.run_finished.connect(outcomes.append)
    assert search_dock.run()
    search_dock.task.previewed.connect(lambda *a: seen.append([(l.id(), l.featureCount())
                                                               for l in previews()]))
    qtbot.waitUntil(lambda: len(seen) >= 3, timeout=30000)
    ids = {i for step in seen[1:] for i, _ in step}
    assert len(ids) == 1                                # one layer, updated in place
    assert "boxes so far" in search_dock.status_label.text()
    qtbot.waitUntil(lambda: bool(outcomes), timeout=60000)
    assert outcomes == ["done"] and not previews()      # the result replaced the preview
    boxes = [l for l in clean_project.mapLayers().values() if l.name() == "red roof"]
    assert len(boxes) == 1 and boxes[0].featureCount() >= 1
    # cancelled mid-pass: the boxes so far stay, as a partial result
    outcomes.clear()
    seen.clear()
    search_dock.prompt_combo.setEditText("red roof")
    assert search_dock.run()
    search_dock.task.previewed.connect(lambda *a: seen.append(1))
    qtbot.waitUntil(lambda: len(seen) >= 2, timeout=30000)
    search_dock.cancel_button.click()
    qtbot.waitUntil(lambda: bool(outcomes), timeout=30000)
    assert outcomes == ["cancelled"]
    partial = [l for l in clean_project.mapLayers().values() if "partial" in l.name()]
    assert len(partial) == 1 and partial[0].featureCount() >= 1 and not previews()
    best = min(partial[0].getFeatures(), key=lambda f: -f["score"])
    assert best.geometry().boundingBox().intersects(QgsRectangle(500096, 3999968, 500128, 4000000))
    assert "kept the" in search_dock.status_label.text() and "partial" in search_dock.status_label.text()


def test_a_second_prompt_in_the_dock_is_answered_from_the_kept_embeddings(
        qtbot, search_dock, tmp_path, clean_project):
    tif = make_geotiff(tmp_path / "scene.tif", squares=((96, 64, 32, "red"), (200, 200, 32, "blue")))
    raster = QgsRasterLayer(tif, "scene", "gdal")
    clean_project.addMapLayer(raster)
    search_dock.layer_combo.setLayer(raster)
    search_dock.area_combo.setCurrentIndex(search_dock.area_combo.findData("layer"))
    assert _run(qtbot, search_dock) == "done"
    assert not search_dock.last_result.from_cache and "tiles/s" in search_dock.status_label.text()
    search_dock.prompt_combo.setEditText("blue pool")
    assert _run(qtbot, search_dock) == "done"
    assert search_dock.last_result.from_cache
    assert "from the kept embeddings" in search_dock.status_label.text()
    layer = next(l for l in clean_project.mapLayers().values() if l.name() == "blue pool")
    best = min(layer.getFeatures(), key=lambda f: f["rank"])
    assert best.geometry().boundingBox().intersects(QgsRectangle(500200, 3999768, 500232, 3999800))
    # a mode switch on the same area (boxes -> heatmap) reuses the same pass
    search_dock.mode_combo.setCurrentIndex(search_dock.mode_combo.findData("heatmap"))
    assert _run(qtbot, search_dock) == "done"
    assert search_dock.last_result.from_cache


def test_xyz_basemap_is_rendered_then_searched(qtbot, search_dock, tmp_path, clean_project):
    uri, tile = make_xyz_tiles(str(tmp_path / "tiles"), squares=((160, 32, 40, "red"),))
    xyz = QgsRasterLayer(uri, "basemap", "wms")
    assert xyz.isValid()
    from mapclip.plugin import render
    assert render.raster_source(xyz) is None          # QGIS must render it
    clean_project.addMapLayer(xyz)
    search_dock.layer_combo.setLayer(xyz)
    canvas = search_dock.iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    canvas.setExtent(tile)
    search_dock.area_combo.setCurrentIndex(search_dock.area_combo.findData("extent"))
    gsd = tile.width() / 256
    search_dock.gsd_spin.setValue(gsd)
    assert _run(qtbot, search_dock) == "done"
    layer = next(l for l in clean_project.mapLayers().values() if l.name() == "red roof")
    assert layer.crs().authid() == "EPSG:3857"
    best = min(layer.getFeatures(), key=lambda f: f["rank"])
    red = QgsRectangle(tile.xMinimum() + 160 * gsd, tile.yMaximum() - 72 * gsd,
                       tile.xMinimum() + 200 * gsd, tile.yMaximum() - 32 * gsd)
    assert best.geometry().boundingBox().intersects(red)
    assert red.contains(best.geometry().boundingBox().center()) or \
        best.geometry().boundingBox().contains(red.center())
    assert search_dock._temp_files == []               # the rendered GeoTIFF is cleaned up


def test_heatmap_mode_adds_a_styled_heat_layer(qtbot, search_dock, tmp_path, clean_project):
    tif = make_geotiff(tmp_path / "scene.tif")
    raster = QgsRasterLayer(tif, "scene", "gdal")
    clean_project.addMapLayer(raster)
    search_dock.layer_combo.setLayer(raster)
    search_dock.area_combo.setCurrentIndex(search_dock.area_combo.findData("layer"))
    search_dock.mode_combo.setCurrentIndex(search_dock.mode_combo.findData("heatmap"))
    assert _run(qtbot, search_dock) == "done"
    heat = [l for l in clean_project.mapLayers().values() if l.name().endswith("(heatmap)")]
    assert len(heat) == 1
    h = heat[0]
    assert h.crs().authid() == "EPSG:32633"
    assert type(h.renderer()).__name__ == "QgsSingleBandPseudoColorRenderer"
    items = h.renderer().shader().rasterShaderFunction().colorRampItemList()
    assert items[0].color.alpha() == 0 and items[-1].color.alpha() > 150
    # the heat is highest over the red square
    ident = h.dataProvider().identify
    from qgis.core import QgsPointXY, QgsRaster
    hot = ident(QgsPointXY(500112, 3999920), QgsRaster.IdentifyFormatValue).results()[1]
    cold = ident(QgsPointXY(500230, 3999780), QgsRaster.IdentifyFormatValue).results()[1]
    assert hot is not None and cold is not None and hot > cold


def test_saving_to_geopackage(qtbot, search_dock, tmp_path, clean_project):
    tif = make_geotiff(tmp_path / "scene.tif")
    raster = QgsRasterLayer(tif, "scene", "gdal")
    clean_project.addMapLayer(raster)
    search_dock.layer_combo.setLayer(raster)
    search_dock.area_combo.setCurrentIndex(search_dock.area_combo.findData("layer"))
    gpkg = tmp_path / "out.gpkg"
    search_dock.save_check.setChecked(True)
    search_dock.gpkg_widget.setFilePath(str(gpkg))
    assert _run(qtbot, search_dock) == "done"
    layer = next(l for l in clean_project.mapLayers().values() if l.name() == "red roof")
    assert layer.providerType() == "ogr" and gpkg.is_file()
    assert layer.featureCount() >= 1 and layer.crs().authid() == "EPSG:32633"


def test_count_mode_shows_counts_per_method_in_dock_and_layer_metadata(qtbot, search_dock, tmp_path,
                                                                        clean_project):
    # three red squares, far apart, planted on grey: dense counting must find three
    planted = ((32, 32, 24, "red"), (160, 160, 24, "red"), (176, 24, 24, "red"))
    tif = make_geotiff(tmp_path / "scene.tif", squares=planted)
    raster = QgsRasterLayer(tif, "scene", "gdal")
    clean_project.addMapLayer(raster)
    search_dock.layer_combo.setLayer(raster)
    search_dock.area_combo.setCurrentIndex(search_dock.area_combo.findData("layer"))
    search_dock.mode_combo.setCurrentIndex(search_dock.mode_combo.findData("count"))
    search_dock.count_method_combo.setCurrentIndex(search_dock.count_method_combo.findData("both"))
    assert search_dock.count_method_combo.isVisibleTo(search_dock)
    assert _run(qtbot, search_dock) == "done"
    text = search_dock.last_count
    result = search_dock.last_result
    assert result.dense.count == len(planted) == 3
    # the text says which method's number is the count (dense, as it localises), then the other's
    assert text == result.summary()
    assert text.startswith("count: 3 red roofs (dense method") and "also run: " in text
    assert f"{result.prompt.count} red roof" in text.split("also run: ")[1]
    assert text in search_dock.status_label.text()
    # the results list holds the counted objects, each zooming to its box
    from mapclip.plugin.dock.widgets import ROLE_BOUNDS
    items = [search_dock.results.topLevelItem(i) for i in range(search_dock.results.topLevelItemCount())]
    assert [it.text(0) for it in items] == ["1", "2", "3"]
    assert sorted(tuple(it.data(0, ROLE_BOUNDS)) for it in items) == sorted(b.bounds for b in result.boxes)
    layer = next(l for l in clean_project.mapLayers().values() if "(count" in l.name())
    assert text in layer.metadata().abstract()
    assert layer.crs().authid() == "EPSG:32633"
    assert layer.featureCount() == len(result.boxes) == 3
    # one box on each planted square (map y falls from the top edge, 4000000, at 1 m a pixel)
    for col, row, size, _ in planted:
        square = QgsRectangle(500000 + col, 4000000 - row - size, 500000 + col + size, 4000000 - row)
        assert sum(f.geometry().boundingBox().intersects(square) for f in layer.getFeatures()) == 1, \
            (col, row)


def archive_in_dock(qtbot, dock, folder, index, query: str, top_k: int) -> list:
    """Build an index of ``folder`` in the Archive tab, then search it for ``query``; the
    outcomes of both runs (more are appended as the test runs the tab again)."""
    dock.tabs.setCurrentIndex(1)
    dock.build_sources.setFilePath(str(folder))
    dock.index_widget.setFilePath(str(index))
    outcomes = []
    dock.run_finished.connect(outcomes.append)
    assert dock.build_index()
    qtbot.waitUntil(lambda: bool(outcomes), timeout=60000)
    assert outcomes == ["done"], dock.archive_status.text()
    dock.archive_query.setText(query)
    dock.archive_topk.setValue(top_k)
    assert dock.search_archive()
    qtbot.waitUntil(lambda: len(outcomes) == 2, timeout=60000)
    assert outcomes[1] == "done", dock.archive_status.text()
    return outcomes


def test_archive_tab_builds_an_index_and_finds_the_red_place_by_text_and_by_click(
        qtbot, search_dock, tmp_path, clean_project):
    folder = tmp_path / "archive"
    folder.mkdir()
    make_geotiff(folder / "a.tif", squares=((64, 128, 64, "red"),))
    make_geotiff(folder / "b.tif", origin=(600000.0, 4000000.0), squares=((0, 0, 64, "blue"),))
    dock = search_dock
    outcomes = archive_in_dock(qtbot, dock, folder, tmp_path / "idx", "red roof", 3)
    assert (tmp_path / "idx" / "manifest.json").is_file()
    assert dock.archive_results.topLevelItemCount() == 3
    top = dock.archive_results.topLevelItem(0)
    assert top.text(1) == "a.tif"
    layer = next(l for l in clean_project.mapLayers().values() if l.name().endswith("(archive)"))
    assert layer.featureCount() == 3 and layer.crs().authid() == "EPSG:32633"
    best = min(layer.getFeatures(), key=lambda f: f["rank"])
    red = QgsRectangle(500064, 3999808, 500128, 3999872)
    assert best.geometry().boundingBox().intersects(red)

    # "more like this": click the blue place of b.tif on the map
    from qgis.core import QgsPointXY
    canvas = dock.iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    dock.pick_button.setChecked(True)
    assert canvas.mapTool() is dock.pick_tool
    dock.pick_tool.picked.emit(QgsPointXY(600032, 3999968), canvas.mapSettings().destinationCrs())
    qtbot.waitUntil(lambda: len(outcomes) == 3, timeout=60000)
    assert outcomes[2] == "done", dock.archive_status.text()
    assert not dock.pick_button.isChecked() and canvas.mapTool() is not dock.pick_tool
    assert dock.archive_results.topLevelItem(0).text(1) == "b.tif"


def test_unloading_the_plugin_mid_run_cancels_and_adds_nothing(qtbot, iface, mapclip, rigged, tmp_path,
                                                               clean_project, qgis_settings, monkeypatch):
    from mapclip.plugin import tasks
    tasks._MODELS[(RIGGED, "auto")] = rigged
    try:
        plugin = mapclip.classFactory(iface)
        plugin.initGui()
        plugin.dock_action.trigger()
        dock = plugin.dock
        raster = QgsRasterLayer(make_geotiff(tmp_path / "s.tif", width=512, height=512), "s", "gdal")
        clean_project.addMapLayer(raster)
        dock.layer_combo.setLayer(raster)
        dock.select_model(RIGGED)
        dock.tile_spin.setValue(32)
        dock.batch_spin.setValue(1)
        dock.prompt_combo.setEditText("red roof")
        dock.area_combo.setCurrentIndex(dock.area_combo.findData("layer"))
        real, calls = tasks.run_detect, []

        def slow(req, progress, cancel):
            def prog(done, total):
                progress(done, total)
                calls.append(done)
                time.sleep(0.05)
            return real(req, prog, cancel)

        monkeypatch.setattr(tasks, "run_detect", slow)
        before = set(clean_project.mapLayers())
        assert dock.run()
        qtbot.waitUntil(lambda: len(calls) >= 2, timeout=30000)
        plugin.unload()
        qtbot.waitUntil(lambda: not tasks.running(), timeout=30000)
        assert set(clean_project.mapLayers()) == before
        assert clean_project.layerTreeRoot().findGroups() == []
    finally:
        tasks._MODELS.pop((RIGGED, "auto"), None)


def test_classes_mode_adds_a_paletted_land_cover_layer_named_by_class(qtbot, iface, mapclip,
                                                                     qgis_settings, clean_project,
                                                                     tmp_path):
    """Classes mode: a land-cover map from words, as a paletted layer whose legend names them."""
    from qgis.core import QgsPalettedRasterRenderer
    from mapclip.engine.data.synthetic.scene import make_scene
    from mapclip.plugin.dock.shell import MapClipDock
    path = tmp_path / "scene.tif"
    make_scene(str(path), width=256, seed=3, mask_path=None, coco_path=None)
    raster = QgsRasterLayer(str(path), "scene", "gdal")
    clean_project.addMapLayer(raster)
    dock = MapClipDock(iface, iface.main_window)
    try:
        dock.layer_combo.setLayer(raster)
        dock.select_model("demo")
        dock._set_combo_data(dock.mode_combo, "classes")
        dock._set_combo_data(dock.area_combo, "layer")
        dock.prompt_combo.setEditText("water; forest; farmland")
        # as a box search leaves it: the score column fitted to "0.525"
        dock.results.setColumnWidth(2, dock.results.fontMetrics().horizontalAdvance("0.525"))
        assert _run(qtbot, dock, timeout=120000) == "done", dock.status_label.text()
        (layer,) = dock.last_layers
        assert layer.isValid() and isinstance(layer.renderer(), QgsPalettedRasterRenderer)
        labels = [c.label for c in layer.renderer().classes()]
        assert {"water", "forest", "farmland"} <= set(labels), labels
        assert layer.crs().authid() == "EPSG:32633"
        rows = [dock.results.topLevelItem(i).text(1) for i in range(dock.results.topLevelItemCount())]
        assert {"water", "forest", "farmland"} <= set(rows)
        # each share is shown whole, not cut to "48...." by a narrow column
        fm = dock.results.fontMetrics()
        for i in range(dock.results.topLevelItemCount()):
            text = dock.results.topLevelItem(i).text(2)
            assert text.endswith("%")
            assert dock.results.columnWidth(2) >= fm.horizontalAdvance(text), text
    finally:
        dock.shutdown()
        dock.deleteLater()


def test_a_long_error_is_never_cut_where_it_is_kept(qtbot, iface, mapclip):
    """The default model offline: a message of many hundred characters ending in the path to
    put the file at keeps that path in the log, the status line and behind "Show more"."""
    from qgis.gui import QgsMessageViewer
    from qgis.PyQt.QtWidgets import QApplication, QPushButton
    from mapclip.engine.core.errors import ModelError
    from mapclip.plugin import log
    path = "/home/analyst/.cache/mapclip/models/remoteclip/RemoteCLIP-ViT-B-32.pt"
    tries = " ".join(f"try {k}: connection to huggingface.co timed out after 10 s;" for k in range(8))
    exc = ModelError(f"the model remoteclip-vit-b-32 could not be downloaded ({tries})",
                     f"download it on a machine with internet access and put it at {path}")

    def job(progress, cancel):
        raise exc

    task, logged = _run_logged(qtbot, iface, "offline search", job)
    assert task.outcome == "error"
    assert any(path in msg for tag, msg in logged if tag == "MapCLIP")          # the log: whole
    item = iface.bar.items()[-1]
    assert len(item.text()) <= log.MAX_BAR_TEXT + 2 and item.text().endswith("…")
    button = item.findChild(QPushButton, log.SHOW_MORE)
    assert button is not None and button.text() == "Show more"
    assert path in item.property("mapclipText")
    button.click()
    viewers = [w for w in QApplication.topLevelWidgets()
               if isinstance(w, QgsMessageViewer) and w.isVisible()]
    assert viewers
    for w in viewers:
        w.close()
    status = log.bar_error(iface, "search failed", exc)                       # the status line
    assert path in status and "try 7" in status


def test_the_default_gsd_of_a_basemap_is_the_maps_pixel_in_ground_metres(search_dock, clean_project):
    """Left empty, the GSD follows the map's pixel: in Web Mercator at 60 degrees north a
    map pixel of 2 CRS units is 1 ground metre (engine and dock speak ground metres)."""
    import math
    from qgis.core import QgsCoordinateTransform, QgsPointXY
    canvas = search_dock.iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    centre = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:4326"),
                                    QgsCoordinateReferenceSystem("EPSG:3857"),
                                    clean_project).transform(QgsPointXY(10.0, 60.0))
    width = 2.0 * max(1, canvas.width())
    canvas.setExtent(QgsRectangle(centre.x() - width / 2, centre.y() - width / 2,
                                  centre.x() + width / 2, centre.y() + width / 2))
    layer = QgsRasterLayer("type=xyz&url=http://127.0.0.1:9/{z}/{x}/{y}.png&zmax=19&zmin=0",
                           "osm", "wms")
    per_px = canvas.extent().width() / max(1, canvas.width())     # CRS units per map pixel
    lat = math.radians(60.0)
    assert search_dock._canvas_gsd(layer) == pytest.approx(per_px * math.cos(lat), rel=0.02)


def test_archive_tab_indexes_a_stac_catalogue_of_served_cogs(qtbot, search_dock, tmp_path, clean_project):
    """Sources may be a STAC catalogue's URL: its items' visual COGs are indexed as URLs (served
    over loopback), and a text search finds the red one."""
    import json

    import numpy as np
    from tests.engine.test_remote import _catalogue
    from tests.rangeserver import RangeServer, write_cog
    from tests.raster_fixtures import noise
    www = tmp_path / "www"
    red = noise(3, 192, 256, seed=5)
    red[:, 140:180, 200:240] = np.array((255, 0, 0), np.uint8)[:, None, None]
    write_cog(www / "scene_cog.tif", red)
    write_cog(www / "other_cog.tif", noise(3, 128, 128, seed=6))
    write_cog(www / "third_cog.tif", noise(3, 128, 128, seed=7))
    dock = search_dock
    dock.tabs.setCurrentIndex(1)
    outcomes = []
    dock.run_finished.connect(outcomes.append)
    with RangeServer(www) as server:
        catalogue = _catalogue(www, server.url)
        dock.build_sources.setFilePath(catalogue)
        dock.index_widget.setFilePath(str(tmp_path / "idx"))
        assert dock.build_index()
        qtbot.waitUntil(lambda: bool(outcomes), timeout=120000)
        assert outcomes == ["done"], dock.archive_status.text()
        manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
        assert sorted(r["path"] for r in manifest["rasters"]) == sorted(
            f"/vsicurl/{server.url}/{n}" for n in ("scene_cog.tif", "other_cog.tif", "third_cog.tif"))
        dock.archive_query.setText("red roof")
        assert dock.search_archive()
        qtbot.waitUntil(lambda: len(outcomes) == 2, timeout=60000)
    assert outcomes[1] == "done", dock.archive_status.text()
    assert dock.archive_results.topLevelItem(0).text(1) == "scene_cog.tif"
    # something that is none of a folder, a catalogue or a URL is refused in the dock's words
    dock.build_sources.setFilePath(str(tmp_path / "missing"))
    assert not dock.build_index()
    assert any("STAC catalogue" in t for t in dock.iface.bar_texts())


def test_archive_tab_indexes_the_items_of_a_stac_api_search_url(qtbot, search_dock, tmp_path,
                                                                 clean_project):
    """Sources may be a STAC API's search URL, its filters in the query: every page is read,
    the filters reach the server, the items' COGs are indexed as URLs; a server that does not
    answer is named in the dock's words."""
    import json
    from urllib.parse import parse_qsl, urlsplit

    from tests.engine.test_remote import _stac_api
    from tests.rangeserver import RangeServer, dead_port, write_cog
    from tests.raster_fixtures import noise
    www = tmp_path / "www"
    for seed, name in enumerate(("scene_cog.tif", "other_cog.tif", "third_cog.tif")):
        write_cog(www / name, noise(3, 128, 128, seed=seed))
    dock = search_dock
    dock.tabs.setCurrentIndex(1)
    outcomes = []
    dock.run_finished.connect(outcomes.append)
    with RangeServer(www) as server:
        _stac_api(www, server.url, page_size=1)
        dock.build_sources.setFilePath(f"{server.url}/search?collections=summer")
        dock.index_widget.setFilePath(str(tmp_path / "idx"))
        assert dock.build_index()
        qtbot.waitUntil(lambda: bool(outcomes), timeout=120000)
        assert outcomes == ["done"], dock.archive_status.text()
        searches = [dict(parse_qsl(urlsplit(p).query)) for m, p, _ in server.requests
                    if m == "GET" and urlsplit(p).path == "/search"]
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert sorted(r["path"] for r in manifest["rasters"]) == sorted(
        f"/vsicurl/{server.url}/{n}" for n in ("scene_cog.tif", "other_cog.tif"))
    assert [s.get("token") for s in searches] == [None, "1"]       # two pages of one item
    assert all(s["collections"] == "summer" for s in searches)
    dead = f"http://127.0.0.1:{dead_port()}/search"
    dock.build_sources.setFilePath(dead)
    dock.index_widget.setFilePath(str(tmp_path / "idx2"))
    assert dock.build_index()
    qtbot.waitUntil(lambda: len(outcomes) == 2, timeout=60000)
    assert outcomes[1] == "error"
    status = dock.archive_status.text()
    assert f"cannot reach the STAC API search {dead}" in status and "Sources:" in status
    assert not (tmp_path / "idx2").exists()
