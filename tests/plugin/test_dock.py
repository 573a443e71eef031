"""The search dock: widgets, settings per model, areas, and rendering of non-file layers."""
from __future__ import annotations

import json

import numpy as np
import pytest
from qgis.core import (QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer, QgsRectangle,
                       QgsVectorLayer, QgsFeature, QgsGeometry)

from .conftest import make_geotiff


@pytest.fixture
def dock(iface, mapclip, qgis_settings, clean_project):
    from mapclip.plugin.dock.shell import MapClipDock
    d = MapClipDock(iface, iface.main_window)
    yield d
    d.shutdown()
    d.deleteLater()


def test_dock_builds_with_raster_filter_collapsed_advanced_and_engine_defaults(dock, mapclip):
    from qgis.core import QgsMapLayerProxyModel
    from mapclip.engine.model.presets import DEFAULT_MODEL, PRESETS
    assert dock.layer_combo.filters() == QgsMapLayerProxyModel.RasterLayer
    assert dock.advanced.isCollapsed()
    specs = [dock.model_combo.itemData(i) for i in range(dock.model_combo.count())]
    assert DEFAULT_MODEL in specs and "demo" in specs
    assert set(specs) <= set(PRESETS) and "remoteclip-vit-l-14" in specs
    assert dock.current_model() == DEFAULT_MODEL
    assert [dock.mode_combo.itemData(i) for i in range(dock.mode_combo.count())] == \
        ["boxes", "heatmap", "count", "classes"]
    assert dock.area_combo.currentData() == "extent"
    assert not dock.polygon_combo.isEnabled()
    assert dock.tabs.count() == 2 and dock.tabs.tabText(1) == "Archive"


def test_widgets_reflect_settings_per_model(iface, mapclip, qgis_settings, clean_project):
    from mapclip.plugin.dock.shell import MapClipDock
    from mapclip.plugin.settings import Settings, model_defaults
    s = Settings()
    s.model = "remoteclip-vit-l-14"
    s.set("mode", "heatmap")
    s.set("area", "layer")
    s.add_prompt("storage tanks; ships")
    p = s.params("remoteclip-vit-l-14")
    p.tile_px, p.top_k, p.threshold, p.bands, p.device = 300, 7, 0.25, "4,3,2", "cpu"
    s.set_params("remoteclip-vit-l-14", p)

    dock = MapClipDock(iface, iface.main_window)
    try:
        assert dock.current_model() == "remoteclip-vit-l-14"
        assert dock.mode_combo.currentData() == "heatmap"
        assert dock.area_combo.currentData() == "layer"
        assert dock.prompt_combo.itemText(0) == "storage tanks; ships"
        assert dock.tile_spin.value() == 300 and dock.topk_spin.value() == 7
        assert dock.threshold_spin.value() == pytest.approx(0.25)
        assert dock.bands_edit.text() == "4,3,2" and dock.device_combo.currentText() == "cpu"
        # large model: smaller batches by default
        assert dock.batch_spin.value() == model_defaults("remoteclip-vit-l-14").batch_size == 16
        # another model brings back its own values
        dock.select_model("remoteclip-vit-b-32")
        b32 = model_defaults("remoteclip-vit-b-32")
        assert dock.tile_spin.value() == b32.tile_px and dock.topk_spin.value() == b32.top_k
        assert dock.threshold_spin.specialValueText() == "off"
        assert dock.params().threshold is None
        # changing a value and saving stores it for that model only
        dock.topk_spin.setValue(3)
        dock.save_settings()
        assert Settings().params("remoteclip-vit-b-32").top_k == 3
        assert Settings().params("remoteclip-vit-l-14").top_k == 7
        assert Settings().model == "remoteclip-vit-b-32"
    finally:
        dock.shutdown()
        dock.deleteLater()


def test_prompts_split_on_semicolons_and_lines(mapclip):
    from mapclip.engine.core.options import split_prompts
    assert split_prompts(" storage tanks ; ships\nships;;  a  harbor ") == \
        ["storage tanks", "ships", "a harbor"]
    assert split_prompts("  ") == []


def test_added_checkpoint_appears_in_model_picker(dock, mapclip, monkeypatch, tmp_path):
    """A published checkpoint is added by its path alone: no architecture to pick wrongly."""
    import torch
    import open_clip
    from mapclip.plugin.dialogs import model_manager
    ckpt = tmp_path / "RemoteCLIP-ViT-B-32.pt"
    torch.save(open_clip.create_model("ViT-B-32-quickgelu").state_dict(), ckpt)
    monkeypatch.setattr(model_manager.QFileDialog, "getOpenFileName",
                        staticmethod(lambda *a, **k: (str(ckpt), "")))
    asked = []
    monkeypatch.setattr(model_manager.QInputDialog, "getItem",
                        staticmethod(lambda *a, **k: asked.append(a) or ("", False)))
    spec = dock.add_checkpoint()
    assert spec == str(ckpt) and not asked
    assert dock.current_model() == spec
    from mapclip.plugin.settings import Settings
    assert Settings().custom_models()[-1]["spec"] == spec


def test_area_is_the_visible_extent_in_the_map_crs(dock, iface):
    canvas = iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    canvas.setExtent(QgsRectangle(1000, 2000, 5000, 6000))
    rect, crs = dock.area()
    assert crs.authid() == "EPSG:3857"
    assert rect.contains(QgsRectangle(1500, 2500, 4500, 5500))
    dock.area_combo.setCurrentIndex(dock.area_combo.findData("layer"))
    assert dock.area() == (None, None)


def test_area_from_selected_polygons_in_their_crs(dock, clean_project):
    poly = QgsVectorLayer("Polygon?crs=EPSG:32633", "aoi", "memory")
    feats = []
    for rect in (QgsRectangle(0, 0, 10, 10), QgsRectangle(20, 20, 30, 40)):
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromRect(rect))
        feats.append(f)
    poly.dataProvider().addFeatures(feats)
    clean_project.addMapLayer(poly)
    dock.area_combo.setCurrentIndex(dock.area_combo.findData("selection"))
    dock.polygon_combo.setLayer(poly)
    with pytest.raises(ValueError, match="select"):
        dock.area()
    poly.selectAll()
    rect, crs = dock.area()
    assert crs.authid() == "EPSG:32633"
    assert (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()) == (0, 0, 30, 40)


def test_file_layers_are_read_from_their_path_and_virtual_layers_are_not(tmp_path, mapclip, clean_project):
    from qgis.core import QgsRasterDataProvider
    from mapclip.plugin import render
    tif = make_geotiff(tmp_path / "scene.tif")
    layer = QgsRasterLayer(tif, "scene", "gdal")
    assert render.raster_source(layer) == tif
    virtual = _virtual_layer(layer)
    assert virtual.isValid() and render.raster_source(virtual) is None


def _virtual_layer(layer):
    """A raster QGIS computes on the fly (virtual raster provider): not a file."""
    from qgis.core import QgsRasterDataProvider
    params = QgsRasterDataProvider.VirtualRasterParameters()
    params.crs = layer.crs()
    params.extent = layer.extent()
    params.width, params.height = layer.width(), layer.height()
    params.formula = '"s@1"'
    inp = QgsRasterDataProvider.VirtualRasterInputLayers()
    inp.name, inp.provider, inp.uri = "s", "gdal", layer.source()
    params.rInputLayers = [inp]
    uri = QgsRasterDataProvider.encodeVirtualRasterProviderUri(params)
    return QgsRasterLayer(uri, "virtual", "virtualraster")


def test_render_writes_a_georeferenced_geotiff_of_a_non_file_layer(tmp_path, mapclip, clean_project):
    from osgeo import gdal
    from mapclip.plugin import render
    tif = make_geotiff(tmp_path / "scene.tif", width=200, height=100, gsd=2.0,
                       squares=((40, 20, 20, "red"),))
    virtual = _virtual_layer(QgsRasterLayer(tif, "scene", "gdal"))
    QgsProject.instance().addMapLayer(virtual)
    area = QgsRectangle(500000 + 40, 4000000 - 160, 500000 + 240, 4000000 - 20)
    plan = render.plan_render(virtual, area, virtual.crs(), 4.0)
    assert plan.crs.authid() == "EPSG:32633" and (plan.width, plan.height) == (50, 35)
    out = render.render_to_geotiff(virtual, plan, str(tmp_path / "r.tif"))
    ds = gdal.Open(out)
    gt = ds.GetGeoTransform()
    assert gt == pytest.approx((500040.0, 4.0, 0.0, 3999980.0, 0.0, -4.0))
    assert "32633" in ds.GetProjection() or "UTM zone 33N" in ds.GetProjection()
    arr = np.stack([ds.GetRasterBand(i + 1).ReadAsArray() for i in range(3)])
    assert arr.shape == (3, 35, 50)
    # the red square (x 500080..500120, y 3999920..3999960) lands on pixels 10..20, 5..15;
    # the single-band virtual layer renders grey values, so red shows as its band-1 value
    inside = arr[0, 6:14, 11:19]
    outside = arr[0, 25:33, 30:45]
    assert inside.mean() > outside.mean() + 60


def test_whole_layer_of_a_web_basemap_is_refused_with_a_message(dock, iface, tmp_path, clean_project,
                                                                 monkeypatch):
    from mapclip.plugin.deps import missing as deps_missing
    from .conftest import make_xyz_tiles
    monkeypatch.setattr(deps_missing, "missing_modules", lambda required=None: [])
    uri, tile = make_xyz_tiles(str(tmp_path / "tiles"))
    xyz = QgsRasterLayer(uri, "basemap", "wms")
    clean_project.addMapLayer(xyz)
    dock.layer_combo.setLayer(xyz)
    dock.prompt_combo.setEditText("ships")
    dock.area_combo.setCurrentIndex(dock.area_combo.findData("layer"))
    assert not dock.run()
    assert any("visible map extent" in t for t in iface.bar_texts())
    assert dock.run_button.isEnabled() and dock.task is None


def test_run_refuses_without_prompt_or_layer_and_says_why(dock, iface, tmp_path, clean_project):
    assert not dock.run()
    assert any("raster layer" in t for t in iface.bar_texts())
    raster = QgsRasterLayer(make_geotiff(tmp_path / "s.tif"), "s", "gdal")
    clean_project.addMapLayer(raster)
    dock.layer_combo.setLayer(raster)
    dock.prompt_combo.setEditText(" ; ")
    assert not dock.run()
    assert any("prompt" in t for t in iface.bar_texts())
    assert dock.task is None


def test_hits_from_rasters_in_different_crs_are_drawn_in_wgs84(mapclip):
    from types import SimpleNamespace as Hit
    from mapclip.plugin import layers
    utm = QgsCoordinateReferenceSystem("EPSG:32633").toWkt()
    merc = QgsCoordinateReferenceSystem("EPSG:3857").toWkt()
    common = dict(cosine=0.3, tile_px=64, pixel=(0, 0, 64, 64))
    hits = [Hit(rank=1, score=0.9, raster="/a.tif", crs=utm, bounds=(500000, 4000000, 500064, 4000064),
                wgs84=(15.0, 36.1, 15.001, 36.101), **common),
            Hit(rank=2, score=0.5, raster="/b.tif", crs=merc, bounds=(0, 0, 10, 10),
                wgs84=(0.0, 0.0, 0.0001, 0.0001), **common)]
    mixed = layers.hits_layer(hits, "ships", "m")
    assert mixed.crs().authid() == "EPSG:4326" and mixed.featureCount() == 2
    first = next(f for f in mixed.getFeatures() if f["rank"] == 1)
    assert first.geometry().boundingBox().xMinimum() == pytest.approx(15.0)
    assert first["raster"] == "/a.tif" and json.loads(first["query"]) == {"text": "ships"}
    from mapclip.engine.core.outputs import HIT_FIELDS, names
    assert [f.name() for f in mixed.fields()] == names(HIT_FIELDS)  # the CLI's fields
    same = layers.hits_layer(hits[:1], "ships", "m")
    assert same.crs().authid() == "EPSG:32633"
    assert next(same.getFeatures()).geometry().boundingBox().xMinimum() == pytest.approx(500000)
    assert layers.hit_bounds(hits[0], mixed) == hits[0].wgs84
    assert layers.hit_bounds(hits[0], same) == hits[0].bounds


def test_save_to_geopackage_never_names_the_searched_file(dock, iface, tmp_path):
    """The dock calls the engine's output guard: the GeoPackage cannot be the raster itself."""
    from .conftest import make_geotiff
    path = make_geotiff(tmp_path / "scene.tif")
    layer = QgsRasterLayer(path, "scene")
    QgsProject.instance().addMapLayer(layer)
    dock.layer_combo.setLayer(layer)
    dock.prompt_combo.setEditText("red roof")
    dock._set_combo_data(dock.area_combo, "layer")
    dock.save_check.setChecked(True)
    dock.gpkg_widget.setFilePath(path)
    before = open(path, "rb").read()
    outcomes = []
    dock.run_finished.connect(outcomes.append)
    assert dock.run()                  # the run starts, then the guard refuses it at once
    assert outcomes == ["error"] and dock.task is None
    assert any("also an input" in t for t in iface.bar_texts()), iface.bar_texts()
    assert open(path, "rb").read() == before
