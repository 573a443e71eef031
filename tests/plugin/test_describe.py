"""The dock's Describe: a result row or a clicked place captioned through engine.caption.

A result row: a real search with the rigged model (it sees red and blue) finds the
red square; Describe ranks a caption bank for that box, and the caption lands in
the dock and in the box layer's ``caption`` field. A clicked place: the
"Describe a place" map tool on a synthetic scene, captioned by the demo
captioning model, names the object under the click.
"""
from __future__ import annotations

import dataclasses

import pytest
from qgis.core import QgsCoordinateReferenceSystem, QgsPointXY, QgsRasterLayer
from qgis.PyQt.QtCore import Qt

from .conftest import make_geotiff

RIGGED = "rigged-describe-model"
BANK = ["a red roof on grey ground", "a blue pool in a garden", "a satellite image of grass"]


@pytest.fixture(scope="module")
def rigged(mapclip):
    from mapclip.engine.model.models import LoadedModel
    from tests.rigged import rigged_model
    lm = rigged_model()
    return LoadedModel(**{f.name: getattr(lm, f.name) for f in dataclasses.fields(lm)})


@pytest.fixture
def dock(iface, mapclip, qgis_settings, clean_project, rigged):
    from mapclip.plugin import tasks
    from mapclip.plugin.dock.shell import MapClipDock
    tasks._MODELS[(RIGGED, "auto")] = rigged
    d = MapClipDock(iface, iface.main_window)
    d.select_model(RIGGED)
    d.select_caption_model(RIGGED)          # Describe ranks the bank with the rigged model too
    d.tile_spin.setValue(32)
    d.window_spin.setValue(1)
    d.stride_spin.setValue(1)
    d.topk_spin.setValue(3)
    d.prompt_combo.setEditText("red roof")
    yield d
    d.shutdown()
    d.deleteLater()
    tasks._MODELS.pop((RIGGED, "auto"), None)


def _wait(qtbot, dock, start, timeout=120_000):
    outcomes = []
    dock.run_finished.connect(outcomes.append)
    assert start()
    qtbot.waitUntil(lambda: bool(outcomes), timeout=timeout)
    return outcomes[0]


def _scene_layer(tmp_path, project):
    tif = make_geotiff(tmp_path / "scene.tif", squares=((96, 64, 32, "red"), (180, 180, 32, "blue")))
    layer = QgsRasterLayer(tif, "scene", "gdal")
    project.addMapLayer(layer)
    return layer


def _searched(qtbot, dock, tmp_path, clean_project):
    """A "red roof" search of the whole scene layer from the dock; its boxes layer."""
    raster = _scene_layer(tmp_path, clean_project)
    dock.layer_combo.setLayer(raster)
    dock.area_combo.setCurrentIndex(dock.area_combo.findData("layer"))
    assert _wait(qtbot, dock, dock.run) == "done"
    return next(lyr for lyr in clean_project.mapLayers().values() if lyr.name() == "red roof")


def test_describe_a_result_row_writes_the_caption_in_the_dock_and_the_layer(
        qtbot, dock, tmp_path, clean_project):
    boxes = _searched(qtbot, dock, tmp_path, clean_project)
    assert boxes.fields().indexOf("caption") < 0           # added by Describe, not before
    bank = tmp_path / "bank.txt"
    bank.write_text("\n".join(BANK) + "\n", encoding="utf-8")
    dock.bank_widget.setFilePath(str(bank))
    item = dock.results.topLevelItem(0)
    assert item.text(1) == "red roof"
    dock.results.setCurrentItem(item)
    assert _wait(qtbot, dock, lambda: dock.describe_button.click() or True) == "done", \
        (dock.status_label.text(), dock.iface.bar_texts())
    assert dock.caption_view.text() == BANK[0]
    assert item.text(3) == BANK[0]
    assert BANK[0] in dock.status_label.text()
    # the caption is in the row's own feature (rank 1), with the retrieval cosine
    feats = {int(f["rank"]): f for f in boxes.getFeatures()}
    assert feats[int(item.text(0))]["caption"] == BANK[0]
    assert 0.0 < float(feats[int(item.text(0))]["caption_score"]) <= 1.0
    assert all(not f["caption"] for r, f in feats.items() if r != int(item.text(0)))
    # the bank is remembered
    from mapclip.plugin.settings import Settings
    assert Settings().get("caption_bank", "") == str(bank)


def test_describe_without_a_bank_for_a_model_that_cannot_write_says_so_in_dock_terms(
        qtbot, dock, tmp_path, clean_project):
    boxes = _searched(qtbot, dock, tmp_path, clean_project)
    dock.bank_widget.setFilePath("")
    assert _wait(qtbot, dock, lambda: dock.describe_item(dock.results.topLevelItem(0))) == "error"
    text = dock.status_label.text()
    assert "Caption bank" in text and "--bank" not in text, text
    assert boxes.fields().indexOf("caption") < 0           # nothing written
    # a bank that does not exist: the engine's message, in the dock's words
    dock.bank_widget.setFilePath(str(tmp_path / "missing.csv"))
    assert _wait(qtbot, dock, lambda: dock.describe_item(dock.results.topLevelItem(0))) == "error"
    assert "missing.csv" in dock.status_label.text() and "Caption bank" in dock.status_label.text()


def test_describe_an_archive_hit_captions_its_tile(qtbot, dock, tmp_path, clean_project):
    folder = tmp_path / "archive"
    folder.mkdir()
    make_geotiff(folder / "a.tif", squares=((64, 128, 64, "red"),))
    make_geotiff(folder / "b.tif", origin=(600000.0, 4000000.0), squares=((0, 0, 64, "blue"),))
    dock.tabs.setCurrentIndex(1)
    dock.build_sources.setFilePath(str(folder))
    dock.index_widget.setFilePath(str(tmp_path / "idx"))
    assert _wait(qtbot, dock, dock.build_index) == "done", dock.archive_status.text()
    dock.archive_query.setText("blue pool")
    dock.archive_topk.setValue(2)
    assert _wait(qtbot, dock, dock.search_archive) == "done", dock.archive_status.text()
    top = dock.archive_results.topLevelItem(0)
    assert top.text(1) == "b.tif"
    bank = tmp_path / "bank.csv"
    bank.write_text("caption\n" + "\n".join(BANK) + "\n", encoding="utf-8")
    dock.bank_widget.setFilePath(str(bank))
    dock.archive_results.setCurrentItem(top)
    assert _wait(qtbot, dock, lambda: dock.describe_button.click() or True) == "done", \
        (dock.archive_status.text(), dock.iface.bar_texts())
    assert top.text(3) == BANK[1] and dock.caption_view.text() == BANK[1]
    assert BANK[1] in dock.archive_status.text()
    hits = next(lyr for lyr in clean_project.mapLayers().values() if lyr.name().endswith("(archive)"))
    assert [f["caption"] for f in hits.getFeatures() if int(f["rank"]) == 1] == [BANK[1]]


def test_tile_around_is_the_tile_at_the_point_inside_the_layer(mapclip, tmp_path, clean_project):
    from mapclip.plugin.describe_tool import tile_around
    layer = _scene_layer(tmp_path, clean_project)      # 256 x 256 px of 1 m from (500000, 4000000)
    utm = QgsCoordinateReferenceSystem("EPSG:32633")
    r = tile_around(layer, QgsPointXY(500100, 3999900), utm, 64)
    assert (r.xMinimum(), r.yMinimum(), r.xMaximum(), r.yMaximum()) == (500068, 3999868, 500132, 3999932)
    r = tile_around(layer, QgsPointXY(500002, 3999999), utm, 64)   # at the corner: moved inside
    assert (r.xMinimum(), r.yMaximum(), r.width()) == (500000, 4000000, 64)
    with pytest.raises(ValueError, match="not on the layer"):
        tile_around(layer, QgsPointXY(600000, 3999900), utm, 64)


def test_describe_a_place_map_tool_captions_the_clicked_object_of_a_synthetic_scene(
        qtbot, iface, mapclip, qgis_settings, clean_project, tmp_path):
    """The map tool on a synthetic scene with the demo captioning model (CoCa: it writes)."""
    from mapclip.engine.data.synthetic.scene import make_scene
    from mapclip.plugin.describe_tool import DescribePlaceTool
    from mapclip.plugin.dock.shell import MapClipDock
    truth = make_scene(str(tmp_path / "scene.tif"), 512, seed=9303)
    layer = QgsRasterLayer(truth.path, "synthetic", "gdal")
    clean_project.addMapLayer(layer)
    dock = MapClipDock(iface, iface.main_window)
    try:
        dock.select_model("demo-captioner")
        assert dock.tile_spin.value() * dock.window_spin.value() == 96   # the model's own tile
        dock.layer_combo.setLayer(layer)
        canvas = iface.mapCanvas()
        canvas.setDestinationCrs(layer.crs())
        canvas.setExtent(layer.extent())
        ships = [b for b in truth.boxes if b.cls == "ship"]
        assert len(ships) >= 3
        captions = []
        for ship in ships[:3]:                   # one click on each ship, the tool each time
            dock.describe_place_button.setChecked(True)
            tool = canvas.mapTool()
            assert isinstance(tool, DescribePlaceTool)
            x0, y0, x1, y1 = ship.bounds
            point = QgsPointXY((x0 + x1) / 2, (y0 + y1) / 2)
            outcome = _wait(qtbot, dock, lambda: tool.canvasClicked.emit(point, Qt.LeftButton) or True)
            assert outcome == "done", (dock.status_label.text(), iface.bar_texts())
            text = dock.caption_view.text()
            assert text and text in dock.status_label.text()
            captions.append(text)
            qtbot.waitUntil(lambda: not dock.describe_place_button.isChecked())  # one click: off
        # the model names the object of about 4 chips in 5 (its model card)
        assert sum("ship" in c.lower() for c in captions) >= 2, captions
        assert not dock.describe_place_button.isChecked()       # one click, then the tool is off
        # a click off the layer: a message, no job
        dock.describe_place_button.setChecked(True)
        assert not canvas.mapTool().describe_at(QgsPointXY(0, 0), layer.crs())
        assert any("not on the layer" in t for t in iface.bar_texts())
    finally:
        dock.shutdown()
        dock.deleteLater()
