"""The vector files the engine writes open in QGIS 3.22's GDAL without a warning."""
from __future__ import annotations

import sqlite3

from mapclip.engine.core.outputs import BOX_FIELDS, write_vector

GPKG_APPLICATION_ID = 0x47504B47      # "GPKG"


def gpkg_version(path) -> tuple:
    with sqlite3.connect(str(path)) as db:
        return (db.execute("PRAGMA application_id").fetchone()[0],
                db.execute("PRAGMA user_version").fetchone()[0])


def test_geopackages_are_written_as_version_1_2(tmp_path):
    row = {"prompt": "ship", "score": 0.9, "cosine": 0.3, "rank": 1, "model": "m"}
    out = write_vector(tmp_path / "boxes.gpkg", BOX_FIELDS, [row], [(0.0, 0.0, 10.0, 10.0)],
                       "EPSG:32633", "detections")
    assert gpkg_version(out) == (GPKG_APPLICATION_ID, 10200)    # 1.2, not the 1.4 (10400) of newer GDAL


def test_an_index_footprints_file_is_a_version_1_2_geopackage_too(tmp_path, tiny_model):
    """The index writes footprints.gpkg beside its shards: QGIS opens it without a warning."""
    from mapclip.engine.archive.build import build_index
    from mapclip.engine.archive.format import FOOTPRINTS, read_manifest
    from mapclip.engine.core.errors import UsageError
    from mapclip.engine.core.options import IndexOptions
    from tests.raster_fixtures import make_raster, noise
    raster = make_raster(tmp_path / "r.tif", width=128, height=96, data=noise(3, 96, 128, seed=2))
    out = tmp_path / "index"
    build_index([str(raster)], out, tiny_model, IndexOptions(tile_px=32))
    assert gpkg_version(out / FOOTPRINTS) == (GPKG_APPLICATION_ID, 10200)
    # and naming its manifest.json instead of the folder says which folder to name
    try:
        read_manifest(out / "manifest.json")
    except UsageError as exc:
        assert str(out) in exc.hint and "manifest.json" in exc.message
    else:
        raise AssertionError("manifest.json was taken for an index")
