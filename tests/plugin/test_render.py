"""Rendering non-file layers (mapclip/plugin/render.py): a dead tile server is an
error naming the source and the reason, not an empty search; the GSD asked is
metres on the ground, converted to the render CRS's units."""
from __future__ import annotations

import math

import pytest

from tests.rangeserver import dead_port

from .conftest import WEB_MERCATOR_HALF, make_geotiff, make_xyz_tiles


def _latitude(y_3857: float) -> float:
    return math.degrees(math.atan(math.sinh(y_3857 / 6378137.0)))


def test_a_dead_tile_server_fails_with_the_source_and_the_reason(qgis_app, clean_project):
    from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer

    from mapclip.plugin import render
    url = f"http://127.0.0.1:{dead_port()}/{{z}}/{{x}}/{{y}}.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin=16&zmax=16", "dead basemap", "wms")
    assert layer.isValid()
    size = 2 * WEB_MERCATOR_HALF / 2 ** 16
    xmin, ymax = -WEB_MERCATOR_HALF + 35000 * size, WEB_MERCATOR_HALF - 22000 * size
    from qgis.core import QgsRectangle
    plan = render.plan_render(layer, QgsRectangle(xmin, ymax - size, xmin + size, ymax),
                              QgsCoordinateReferenceSystem("EPSG:3857"), None)
    with pytest.raises(render.RenderError) as err:
        render.render_to_geotiff(layer, plan, "/nonexistent-folder/never-written.tif")
    message = str(err.value)
    assert "'dead basemap'" in message and url.split("/{z}")[0] in message
    assert "gave no data: Connection refused (http://127.0.0.1:" in message   # the reason
    assert "server" in err.value.hint


def test_a_basemap_that_draws_renders_and_the_gsd_is_ground_metres(qgis_app, clean_project, tmp_path):
    from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer

    from mapclip.plugin import render
    uri, tile = make_xyz_tiles(str(tmp_path / "tiles"))
    layer = QgsRasterLayer(uri, "basemap", "wms")
    merc = QgsCoordinateReferenceSystem("EPSG:3857")
    plan = render.plan_render(layer, tile, merc, 1.0)       # 1 m on the ground
    cos_lat = math.cos(math.radians(_latitude(tile.center().y())))
    assert plan.gsd == pytest.approx(1.0 / cos_lat, rel=1e-6) and plan.ground_gsd == pytest.approx(1.0)
    assert plan.width == math.ceil(tile.width() * cos_lat - 1e-6)
    px = tile.width() / 256
    plan = render.plan_render(layer, tile, merc, px * cos_lat)   # the tile's own pixels
    assert (plan.width, plan.height) == (256, 256)
    path = render.render_to_geotiff(layer, plan, str(tmp_path / "out.tif"))
    from osgeo import gdal
    ds = gdal.Open(path)
    assert ds.GetRasterBand(1).ReadAsArray()[116, 84] == 255          # the red square
    # a projected CRS in metres: the GSD is used as it is
    utm = QgsRasterLayer(make_geotiff(tmp_path / "utm.tif"), "utm", "gdal")
    plan = render.plan_render(utm, None, None, 0.5)
    assert plan.gsd == 0.5 and plan.ground_gsd == 0.5
