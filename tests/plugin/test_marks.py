"""Marks in the dock and Processing (issue 26): "Yes, like this" / "Not this" on a result or a
place on the map, kept in the MapCLIP examples layer, refine the search from the kept
embeddings; Processing's detect takes the same layer."""
from __future__ import annotations

import pytest
from qgis.core import QgsCoordinateTransform, QgsFeature, QgsGeometry, QgsPointXY, QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtWidgets import QMenu

from mapclip.plugin.dock.widgets import ROLE_BOUNDS

from .conftest import make_geotiff
from .test_processing import rigged_folder  # noqa: F401 (fixture)
from .test_tasks import _run, archive_in_dock, rigged, search_dock  # noqa: F401 (fixtures)

ORIGIN = (500000.0, 4000000.0)
# three red squares and a blue one (tests.rigged: "red roof" answers red, blue answers "blue")
SQUARES = ((0, 0, 32, "red"), (96, 96, 32, "red"), (192, 0, 32, "red"), (192, 192, 32, "blue"))


def _centre(col, row, size=32):
    return QgsPointXY(ORIGIN[0] + col + size / 2, ORIGIN[1] - row - size / 2)


def _scene(tmp_path, project):
    raster = QgsRasterLayer(make_geotiff(tmp_path / "scene.tif", squares=SQUARES), "scene", "gdal")
    project.addMapLayer(raster)
    return raster


def _ready(dock, raster, top_k=4):
    dock.layer_combo.setLayer(raster)
    dock.area_combo.setCurrentIndex(dock.area_combo.findData("layer"))
    dock.topk_spin.setValue(top_k)


def _boxes(dock):
    return [(dock.results.topLevelItem(i).data(0, ROLE_BOUNDS),
             float(dock.results.topLevelItem(i).text(2))) for i in range(dock.results.topLevelItemCount())]


def _holds(bounds, point):
    return bounds[0] <= point.x() <= bounds[2] and bounds[1] <= point.y() <= bounds[3]


def _wait_refresh(qtbot, dock, outcomes, n):
    qtbot.waitUntil(lambda: len(outcomes) >= n, timeout=60000)
    return outcomes[n - 1]


def test_marking_a_result_not_this_refreshes_the_search_from_the_kept_embeddings(
        qtbot, search_dock, tmp_path, clean_project):
    from mapclip.plugin import marks
    raster = _scene(tmp_path, clean_project)
    _ready(search_dock, raster)
    assert _run(qtbot, search_dock) == "done"
    first_layers = [l.id() for l in search_dock.last_layers]
    top = search_dock.results.topLevelItem(0)
    marked_bounds, marked_score = top.data(0, ROLE_BOUNDS), float(top.text(2))
    outcomes = []
    search_dock.run_finished.connect(outcomes.append)
    assert search_dock.mark_item(top, False)                      # "Not this" on the best box
    assert _wait_refresh(qtbot, search_dock, outcomes, 1) == "done"
    layer = marks.examples_layer(create=False)
    assert layer is not None and layer.name() == marks.LAYER_NAME and layer.featureCount() == 1
    f = next(layer.getFeatures())
    assert f["label"] == 0 and f["prompt"] == "red roof"
    back = QgsCoordinateTransform(layer.crs(), raster.crs(), QgsProject.instance())
    assert _holds(marked_bounds, back.transform(f.geometry().asPoint()))   # at the box's centre
    assert search_dock.examples_check.isChecked()
    assert "0 yes · 1 not" in search_dock.marks_label.text()
    req = search_dock.last_request
    assert req.examples and not req.examples[0].positive
    status = search_dock.status_label.text()
    assert "refined by 0 yes / 1 not" in status and "from the kept embeddings" in status
    assert not any("refined by" in t for t in search_dock.iface.bar_texts())   # said once, above
    # the box marked "not this" scores lower now; the earlier run's layers left the map
    again = [s for b, s in _boxes(search_dock) if b == marked_bounds]
    assert not again or again[0] < marked_score
    assert not any(QgsProject.instance().mapLayer(i) for i in first_layers)
    root = QgsProject.instance().layerTreeRoot()
    assert all(g.children() for g in root.findGroups())         # no empty run group left behind
    # the layer draws yes and no in their own colours, with the dock's words
    cats = {c.value(): c.label() for c in layer.renderer().categories()}
    assert cats == {1: "Yes, like this", 0: "Not this"}


def test_a_place_marked_yes_on_the_map_brings_what_looks_like_it_into_the_results(
        qtbot, search_dock, tmp_path, clean_project, iface):
    from mapclip.plugin import marks
    raster = _scene(tmp_path, clean_project)
    _ready(search_dock, raster, top_k=6)
    search_dock._show_threshold(0.5)                   # the prompt alone keeps the red squares
    assert _run(qtbot, search_dock) == "done"
    blue = _centre(192, 192)
    assert not any(_holds(b, blue) for b, _ in _boxes(search_dock))   # the prompt alone: red only
    # the map's right-click menu, at the blue square (the canvas in the raster's CRS)
    iface.canvas.setDestinationCrs(raster.crs())

    class Click:
        def mapPoint(self):  # noqa: N802
            return blue

    menu = QMenu()
    search_dock._canvas_menu(menu, Click())
    actions = {a.text(): a for a in menu.actions() if a.text()}
    assert set(actions) >= {"MapCLIP: Yes, like this", "MapCLIP: Not this"}
    outcomes = []
    search_dock.run_finished.connect(outcomes.append)
    actions["MapCLIP: Yes, like this"].trigger()
    assert _wait_refresh(qtbot, search_dock, outcomes, 1) == "done"
    f = next(marks.examples_layer(create=False).getFeatures())
    back = QgsCoordinateTransform(marks.examples_layer(create=False).crs(), raster.crs(),
                                  QgsProject.instance())
    assert f["label"] == 1 and back.transform(f.geometry().asPoint()).distance(blue) < 1e-3
    assert any(_holds(b, blue) for b, _ in _boxes(search_dock))       # found by its likeness
    # "Refine with marked examples" off: the prompt alone again
    search_dock.examples_check.setChecked(False)
    assert _run(qtbot, search_dock) == "done"
    assert search_dock.last_request.examples is None
    assert not any(_holds(b, blue) for b, _ in _boxes(search_dock))


def test_a_layer_without_labels_is_refused_in_the_docks_words(mapclip, clean_project):
    from mapclip.plugin import marks
    layer = QgsVectorLayer("Point?crs=EPSG:32633&field=kind:string", "mine", "memory")
    with pytest.raises(ValueError, match="has no 'label' field.*\nFix: add a 'label' field"):
        marks.read_layer(layer)
    layer = QgsVectorLayer("Point?crs=EPSG:32633&field=label:string", "mine", "memory")
    f = QgsFeature(layer.fields())
    f.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(1, 2)))
    f.setAttribute("label", "maybe")
    layer.dataProvider().addFeatures([f])
    with pytest.raises(ValueError, match="'maybe' is neither 1/true nor 0/false"):
        marks.read_layer(layer)
    assert marks.counts(layer) == (0, 0)


def test_processing_detect_takes_an_examples_layer(provider, tmp_path, rigged_folder):
    import processing
    from qgis.core import QgsProcessingException
    raster = make_geotiff(tmp_path / "scene.tif", squares=SQUARES)
    blue = _centre(192, 192)
    layer = QgsVectorLayer("Point?crs=EPSG:32633&field=label:integer", "marks", "memory")
    f = QgsFeature(layer.fields())
    f.setGeometry(QgsGeometry.fromPointXY(blue))
    f.setAttribute("label", 1)
    layer.dataProvider().addFeatures([f])
    params = {"INPUT": raster, "PROMPTS": "red roof", "MODEL": rigged_folder, "MODE": 0, "TILE": 32,
              "WINDOW": 1, "STRIDE": 1, "TOP_K": 6, "THRESHOLD": 0.5, "DEVICE": "cpu"}

    def boxes(extra, name):
        out = str(tmp_path / f"{name}.gpkg")
        processing.run("mapclip:detect", dict(params, OUTPUT=out, **extra))
        got = QgsVectorLayer(out, name, "ogr")
        return [ft.geometry().boundingBox() for ft in got.getFeatures()]

    assert not any(b.contains(blue) for b in boxes({}, "alone"))
    assert any(b.contains(blue) for b in boxes({"EXAMPLES": layer}, "refined"))
    bad = QgsVectorLayer("Point?crs=EPSG:32633&field=kind:string", "bad", "memory")
    bad.dataProvider().addFeatures([QgsFeature(bad.fields())])
    with pytest.raises(QgsProcessingException, match="EXAMPLES: layer 'bad' has no 'label' field"):
        processing.run("mapclip:detect", dict(params, OUTPUT=str(tmp_path / "x.gpkg"), EXAMPLES=bad))


def test_the_fine_tune_dialog_trains_on_the_examples_layer(qtbot, mapclip, clean_project, tmp_path):
    from mapclip.plugin import marks
    from mapclip.plugin.dialogs.finetune_dialog import FinetuneDialog
    raster = make_geotiff(tmp_path / "scene.tif", squares=SQUARES)
    dlg = FinetuneDialog()
    qtbot.addWidget(dlg)
    assert not dlg.use_marks_layer() and "no marks yet" in dlg.status.text()
    crs = QgsRasterLayer(raster, "scene", "gdal").crs()
    for (col, row, _, colour), positive in zip(SQUARES, (True, True, True, False)):
        marks.add_mark(_centre(col, row), crs, positive, "red roof", raster)
    assert dlg.use_marks_layer()
    assert dlg.data.filePath().endswith(".gpkg") and dlg.marks_raster.filePath() == raster
    assert dlg.marks_raster.isEnabled() and not dlg.images.isEnabled()
    assert "3 'like this' and 1 'not this' marks saved" in dlg.status.text()
    dlg.marks_raster.setFilePath("")
    dlg.out.setFilePath(str(tmp_path / "run"))
    assert any(p.startswith("Raster of the marks") for p in dlg.validate()), dlg.validate()
    dlg.marks_raster.setFilePath(raster)
    dlg.model.setCurrentText("test-tiny")
    dlg.epochs.setValue(1)
    dlg.batch_size.setValue(4)
    dlg.lr.setText("1e-4")
    dlg.val_split.setValue(0.0)
    dlg.device.setText("cpu")
    assert dlg.validate() == []
    assert dlg.options_kwargs()["raster"] == raster
    assert dlg.start() is not None
    qtbot.waitUntil(lambda: dlg.task is not None and dlg.task.is_finished, timeout=120_000)
    assert dlg.task.outcome == "done", dlg.last_error
    made = (tmp_path / "run" / "marks" / "captions_0.csv").read_text().splitlines()
    assert made[1:] == [f"m0_{k:05d}.png,red roof" for k in range(3)]     # "not this" without words: out
    assert dlg.add_button.isEnabled()


def test_marking_an_archive_hit_refreshes_the_archive_search(qtbot, search_dock, tmp_path, clean_project):
    from mapclip.plugin import marks
    folder = tmp_path / "archive"
    folder.mkdir()
    make_geotiff(folder / "a.tif", squares=((64, 128, 64, "red"), (160, 0, 64, "red")))
    make_geotiff(folder / "b.tif", origin=(600000.0, 4000000.0), squares=((0, 0, 64, "blue"),))
    dock = search_dock
    outcomes = archive_in_dock(qtbot, dock, folder, tmp_path / "idx", "red roof", 3)
    hits = [dock.archive_results.topLevelItem(i) for i in range(3)]
    assert [h.text(1) for h in hits[:2]] == ["a.tif", "a.tif"]
    # "Yes, like this" on the blue place in b.tif: the refreshed hits bring it to the top
    point = QgsPointXY(600032, 3999968)
    crs = QgsRasterLayer(str(folder / "b.tif"), "b", "gdal").crs()
    assert dock._mark((point, crs), True, archive=True)
    qtbot.waitUntil(lambda: len(outcomes) == 3, timeout=60000)
    assert outcomes[2] == "done", dock.archive_status.text()
    assert dock.archive_results.topLevelItem(0).text(1) == "b.tif"
    assert "(refined by 1 yes / 0 not)" in dock.archive_status.text()
    assert marks.counts(marks.examples_layer(create=False)) == (1, 0)
