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
