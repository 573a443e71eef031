"""An analyst's day in the dock: a small screen, several prompts, results that stay, and
no stale state (issue 23)."""
from __future__ import annotations

import glob
import os
import tempfile

import pytest
from qgis.core import QgsExpression, QgsExpressionContext, QgsExpressionContextUtils, \
    QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import Qt

from .conftest import make_geotiff
from .test_tasks import RIGGED, _run, rigged, search_dock  # noqa: F401 (fixtures)


def _scene(tmp_path, project, squares=((96, 64, 32, "red"), (200, 200, 32, "blue"))):
    raster = QgsRasterLayer(make_geotiff(tmp_path / "scene.tif", squares=squares), "scene", "gdal")
    project.addMapLayer(raster)
    return raster


def _whole(dock, raster):
    dock.layer_combo.setLayer(raster)
    dock.area_combo.setCurrentIndex(dock.area_combo.findData("layer"))


# ------------------------------------------------------------------ 4: a small screen --
def test_with_advanced_open_the_dock_fits_a_1000_px_screen_and_every_control_is_reachable(
        qtbot, search_dock, qgis_app):
    dock, window = search_dock, search_dock.iface.main_window
    dock.iface.addDockWidget(Qt.RightDockWidgetArea, dock)
    window.resize(1600, 1000)
    window.show()
    dock.advanced.setCollapsed(False)
    qtbot.waitUntil(lambda: dock.advanced.isVisible() and dock.reset_button.isVisible())
    qgis_app.processEvents()
    assert dock.sizeHint().height() < 700 and dock.minimumSizeHint().height() < 700
    assert dock.height() <= window.height()
    assert dock.results.height() >= 120                  # a useful results list
    for w in (dock.run_button, dock.describe_button, dock.caption_model_combo):
        assert w.isVisible() and w.visibleRegion().boundingRect().height() == w.height(), w
    scroll = dock.search_scroll
    viewport = scroll.viewport().rect()
    for w in (dock.method_combo, dock.tile_spin, dock.readers_spin, dock.cache_check,
              dock.gpkg_widget, dock.reset_button):
        scroll.ensureWidgetVisible(w)
        qgis_app.processEvents()
        top_left = w.mapTo(scroll.viewport(), w.rect().topLeft())
        assert viewport.contains(top_left) and viewport.bottom() >= top_left.y() + w.height() - 1, w


# ------------------------------------------------------------- 5: several prompts --
def _label(layer):
    feat = min(layer.getFeatures(), key=lambda f: f["rank"])
    context = QgsExpressionContext(QgsExpressionContextUtils.globalProjectLayerScopes(layer))
    context.setFeature(feat)
    return QgsExpression(layer.labeling().settings().fieldName).evaluate(context)


def test_each_prompt_of_a_run_has_its_own_colour_and_its_labels_name_it(
        qtbot, search_dock, tmp_path, clean_project):
    _whole(search_dock, _scene(tmp_path, clean_project))
    search_dock.prompt_combo.setEditText("red roof; blue swimming pool in a back garden")
    assert _run(qtbot, search_dock) == "done"
    red = next(l for l in clean_project.mapLayers().values() if l.name() == "red roof")
    blue = next(l for l in clean_project.mapLayers().values() if l.name().startswith("blue"))
    top = [{r.symbol().color().name() for r in l.renderer().ranges()[-1:]} for l in (red, blue)]
    assert top[0] != top[1]
    assert _label(red).startswith("red roof #1 ")
    label = _label(blue)
    assert label.startswith("blue swimming pool…") and " #1 " in label and len(label) < 35


def test_the_preview_layer_keeps_its_labels_when_refilled(mapclip, clean_project):
    from types import SimpleNamespace
    from qgis.core import QgsCoordinateReferenceSystem
    from mapclip.plugin import layers
    box = SimpleNamespace(prompt="ships", score=0.95, cosine=0.3, rank=1,
                          bounds=(0.0, 0.0, 10.0, 10.0))
    layer = layers.boxes_layer([box], "ships", "m", QgsCoordinateReferenceSystem("EPSG:32633"),
                               index=1)
    layers.set_boxes(layer, [box, SimpleNamespace(**dict(vars(box), rank=2, score=0.5))], "m")
    assert _label(layer) == "ships #1 0.95"
    assert layer.renderer().ranges()[-1].symbol().color().name() == layers.PROMPT_COLOURS[1]


# --------------------------------------------------------------- 7: results stay --
def test_a_default_search_keeps_its_boxes_in_a_geopackage_and_leaves_no_temp_file(
        qtbot, search_dock, tmp_path, clean_project, monkeypatch, qgis_app):
    from mapclip.plugin import layers
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    _whole(search_dock, _scene(tmp_path, clean_project))
    search_dock.mode_combo.setCurrentIndex(search_dock.mode_combo.findData("heatmap"))
    assert not search_dock.save_check.isChecked()
    assert _run(qtbot, search_dock) == "done"
    gpkg, folder = layers.results_place()
    assert folder.startswith(qgis_app.qgisSettingsDirPath())
    first = next(l for l in clean_project.mapLayers().values() if l.name() == "red roof")
    assert first.providerType() == "ogr" and first.source().startswith(gpkg)
    assert os.path.isfile(gpkg) and first.featureCount() >= 1
    assert gpkg in search_dock.status_label.text()                     # the user is told where
    heat = next(l for l in clean_project.mapLayers().values() if l.name().endswith("(heatmap)"))
    assert os.path.dirname(heat.source()) == folder and os.path.isfile(heat.source())
    # a second run adds its own table: the first run's boxes are still there
    n = first.featureCount()
    assert _run(qtbot, search_dock) == "done"
    seconds = [l for l in clean_project.mapLayers().values() if l.name() == "red roof"]
    assert len({l.source() for l in seconds}) == 2
    first.reload()
    assert first.featureCount() == n
    search_dock.shutdown()
    assert not glob.glob(str(tmp / "**" / "*mapclip*"), recursive=True)


def test_a_saved_projects_results_go_beside_it(mapclip, tmp_path, clean_project):
    from mapclip.plugin import layers
    clean_project.write(str(tmp_path / "site.qgz"))
    assert layers.results_place() == (str(tmp_path / "site.mapclip.gpkg"),
                                      str(tmp_path / "site_mapclip"))


# ------------------------------------------------------------------ 10: stale state --
def test_a_refused_run_clears_the_last_result_from_the_status_line(qtbot, search_dock, tmp_path,
                                                                   clean_project):
    _whole(search_dock, _scene(tmp_path, clean_project))
    assert _run(qtbot, search_dock) == "done"
    assert "boxes" in search_dock.status_label.text()
    search_dock.prompt_combo.setEditText("")
    assert not search_dock.run()
    text = search_dock.status_label.text()
    assert "boxes" not in text and "prompt" in text


def test_a_new_search_clears_the_caption_of_an_earlier_result(qtbot, search_dock, tmp_path,
                                                             clean_project):
    _whole(search_dock, _scene(tmp_path, clean_project))
    search_dock.caption_view.setText("a red roof on grey ground")
    assert _run(qtbot, search_dock) == "done"
    assert search_dock.caption_view.text() == ""


def test_errors_time_out_and_a_new_one_replaces_the_last(iface, mapclip):
    from qgis.core import Qgis
    from mapclip.plugin import log
    log.bar_error(iface, "search failed: the first")
    log.bar_error(iface, "search failed: the second")
    errors = [i for i in iface.bar.items() if i.level() == Qgis.Critical]
    assert [i.text() for i in errors] == ["search failed: the second"]
    assert errors[0].duration() > 0


def test_progress_counts_windows_in_window_mode(qtbot, search_dock, tmp_path, clean_project):
    _whole(search_dock, _scene(tmp_path, clean_project))
    assert search_dock.method_combo.currentText() == "window"
    seen = []
    outcomes = []
    search_dock.run_finished.connect(outcomes.append)
    assert search_dock.run()
    search_dock.task.stepped.connect(lambda d, t: seen.append(search_dock.status_label.text()))
    qtbot.waitUntil(lambda: bool(outcomes), timeout=60000)
    assert seen and all(" windows · " in t and "windows/s" in t for t in seen), seen


@pytest.mark.parametrize("start", ["search", "describe"])
def test_loading_pytorch_is_said_before_the_wait_with_run_off(qtbot, search_dock, tmp_path,
                                                              clean_project, monkeypatch, start):
    from mapclip.plugin import runtime
    raster = _scene(tmp_path, clean_project)
    _whole(search_dock, raster)
    seen = {}

    def preload():
        seen.update(text=search_dock.status_label.text(), run=search_dock.run_button.isEnabled())
        raise ImportError("torch is being installed")   # stop here: what was shown is the point

    monkeypatch.setattr(runtime, "preloaded", lambda: False)
    monkeypatch.setattr(runtime, "preload", preload)
    if start == "search":
        search_dock.run()
    else:
        from qgis.core import QgsRectangle
        search_dock._describe_place(QgsRectangle(500000, 3999900, 500100, 4000000), raster.crs(),
                                    raster)
    assert seen["text"].startswith("Loading PyTorch (first search only)") and not seen["run"]
    assert search_dock.run_button.isEnabled()           # on again after the failure


def test_describe_uses_its_own_caption_model_remembered(qtbot, search_dock, tmp_path, clean_project,
                                                        monkeypatch):
    from mapclip.plugin import tasks
    from mapclip.plugin.dock.shell import MapClipDock
    from mapclip.plugin.settings import Settings
    assert search_dock.caption_model() == "demo-captioner"          # writes: no bank needed
    raster = _scene(tmp_path, clean_project)
    _whole(search_dock, raster)
    started = []
    monkeypatch.setattr(tasks, "start", lambda task: started.append(task))
    from qgis.core import QgsRectangle
    assert search_dock._describe_place(QgsRectangle(500000, 3999900, 500100, 4000000),
                                       raster.crs(), raster)
    req = started[0]._fn.args[0]
    assert req.model == "demo-captioner" and search_dock.current_model() == RIGGED
    assert Settings().caption_model == "demo-captioner"
    search_dock.task = None
    search_dock.select_caption_model("coca-vit-b-32")
    search_dock.save_settings()
    other = MapClipDock(search_dock.iface, search_dock.iface.main_window)
    try:
        assert other.caption_model() == "coca-vit-b-32"
    finally:
        other.shutdown()
        other.deleteLater()
