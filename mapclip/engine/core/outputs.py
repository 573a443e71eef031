"""Every output's fields and writer, once: boxes, archive hits, counted objects, heatmaps.

The CLI writes these files, the Processing algorithms fill their sinks with the
same fields and values, and the QGIS dock builds its layers from them too
(mapclip/plugin/layers.py turns the kinds below into QGIS field types). Adding a field
is one line in a ``*_FIELDS`` tuple and one value in its ``*_rows`` function.

Vector outputs are polygons (.gpkg or .geojson), written atomically. Their
CRS is the rasters' when they share one, else WGS84 (:func:`output_crs`).
Heatmaps are one float32 GeoTIFF, one band per prompt, written atomically.

Field definitions need only the standard library; the writers import NumPy,
pyogrio and rasterio when called.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import UsageError
from .jobs import atomic_path, check_output_path
from .wkb import polygon_wkb

#: (name, kind) with kind one of "str", "float", "int"
Fields = Tuple[Tuple[str, str], ...]

#: detect's boxes (engine.detect.Box), one polygon per box in the raster's CRS
BOX_FIELDS: Fields = (("prompt", "str"), ("score", "float"), ("cosine", "float"),
                      ("rank", "int"), ("model", "str"))
#: archive search hits (engine.archive.store.Hit): the tile's footprint
HIT_FIELDS: Fields = (("rank", "int"), ("score", "float"), ("cosine", "float"),
                      ("raster", "str"), ("tile_px", "int"), ("px_col", "int"), ("px_row", "int"),
                      ("px_width", "int"), ("px_height", "int"), ("model", "str"),
                      ("query", "str"))
#: counted objects (engine.count dense components)
COUNT_FIELDS: Fields = (("object", "str"), ("rank", "int"), ("score", "float"), ("area", "int"),
                        ("method", "str"), ("model", "str"))
#: classify's polygons (engine.classify.write_polygons): one per 4-connected region of a class;
#: score is the mean best-class score of its cells
CLASS_FIELDS: Fields = (("class", "str"), ("value", "int"), ("score", "float"), ("cells", "int"),
                        ("model", "str"))
#: an index's footprints.gpkg (engine.archive.writer.write_footprints): every stored tile,
#: its row and raster, its pixel window and its bounds in the layer's CRS
FOOTPRINT_FIELDS: Fields = (("row_id", "int"), ("raster_id", "int"), ("raster", "str"),
                            ("tile_px", "int"), ("tile", "int"), ("px_col", "int"), ("px_row", "int"),
                            ("px_width", "int"), ("px_height", "int"), ("xmin", "float"),
                            ("ymin", "float"), ("xmax", "float"), ("ymax", "float"))
#: what mapclip:caption adds to a box layer: the best caption and its cosine (empty if generated)
CAPTION_FIELDS: Fields = (("caption", "str"), ("caption_score", "float"))

VECTOR_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
WGS84 = "EPSG:4326"

Bounds = Tuple[float, float, float, float]


def names(fields: Fields) -> List[str]:
    return [name for name, _ in fields]


# --------------------------------------------------------------------------- #
# Rows: the values of each output, from the engine's results.
# --------------------------------------------------------------------------- #
def box_rows(boxes: Iterable[Any], model: str) -> Tuple[List[Dict[str, Any]], List[Bounds]]:
    rows, bounds = [], []
    for b in boxes:
        rows.append({"prompt": b.prompt, "score": float(b.score), "cosine": float(b.cosine),
                     "rank": int(b.rank), "model": model})
        bounds.append(tuple(b.bounds))
    return rows, bounds


def hit_query(query: Dict[str, Any]) -> str:
    """The query a hit answers, as the JSON text its ``query`` field holds."""
    return json.dumps({k: v for k, v in (query or {}).items()
                       if k in ("text", "image", "like", "negative")})


def hit_rows(hits: Iterable[Any], model: str, query: str,
             crs: Optional[str]) -> Tuple[List[Dict[str, Any]], List[Bounds]]:
    """Hits in ``crs`` (see :func:`output_crs`): native bounds where the hit's raster is in
    ``crs``, else its WGS84 bounds; hits with neither are left out."""
    rows, bounds = [], []
    for h in hits:
        box = h.bounds if (same_crs(h.crs, crs) or not crs) else h.wgs84
        if box is None:
            continue
        bounds.append(tuple(box))
        rows.append({"rank": int(h.rank), "score": float(h.score), "cosine": float(h.cosine),
                     "raster": str(h.raster), "tile_px": int(h.tile_px), "px_col": int(h.pixel[0]),
                     "px_row": int(h.pixel[1]), "px_width": int(h.pixel[2]),
                     "px_height": int(h.pixel[3]), "model": model, "query": query})
    return rows, bounds


def count_rows(boxes: Iterable[Any], object_name: str, model: str,
               method: str = "dense") -> Tuple[List[Dict[str, Any]], List[Bounds]]:
    rows, bounds = [], []
    for i, b in enumerate(boxes):
        rows.append({"object": object_name, "rank": i + 1, "score": float(b.score),
                     "area": int(b.area), "method": method, "model": model})
        bounds.append(tuple(b.bounds))
    return rows, bounds


def footprint_columns(tiles: Any, paths: Dict[int, str]) -> Dict[str, Any]:
    """The columns of :data:`FOOTPRINT_FIELDS`, in field order, for an index's tile
    records (NumPy, engine.archive.format.TILE_DTYPE; one row per tile, a whole
    index at once); ``paths``: raster id -> raster path. ``xmin`` .. ``ymax`` are the
    tile's bounds in its raster's CRS (the polygon is in the layer's CRS)."""
    import numpy as np
    ints = {"row_id": np.arange(len(tiles)), "raster_id": tiles["raster"], "tile_px": tiles["tile_px"],
            "tile": tiles["tile"], "px_col": tiles["col"], "px_row": tiles["row"],
            "px_width": tiles["width"], "px_height": tiles["height"]}
    cols = {name: np.asarray(v).astype(np.int64) for name, v in ints.items()}
    cols["raster"] = np.asarray([paths[int(r)] for r in tiles["raster"]], dtype=object)
    cols.update({name: tiles[name] for name in ("xmin", "ymin", "xmax", "ymax")})
    return {name: cols[name] for name in names(FOOTPRINT_FIELDS)}


def values(fields: Fields, row: Dict[str, Any]) -> List[Any]:
    """A row's values in field order (for a QGIS feature)."""
    return [row[name] for name, _ in fields]


# --------------------------------------------------------------------------- #
# CRS of vector outputs.
# --------------------------------------------------------------------------- #
def same_crs(a: Optional[str], b: Optional[str]) -> bool:
    if not a or not b:
        return not a and not b
    if a == b:
        return True
    from rasterio.crs import CRS
    try:
        return CRS.from_user_input(a) == CRS.from_user_input(b)
    except Exception:
        return False


def output_crs(crss: Iterable[Optional[str]]) -> Optional[str]:
    """The CRS vector outputs use: the one all rasters share, else WGS84
    (None when the rasters are not georeferenced)."""
    crss = list(crss)
    if not crss:
        return WGS84
    first = crss[0]
    if all(same_crs(first, c) for c in crss):
        return first
    return WGS84


# --------------------------------------------------------------------------- #
# Writers.
# --------------------------------------------------------------------------- #
def vector_driver(path, what: str = "boxes") -> str:
    """OGR driver for an output path (.gpkg or .geojson), or a UsageError."""
    suffix = Path(path).suffix.lower()
    if suffix not in VECTOR_DRIVERS:
        raise UsageError(f"cannot write {what} to {path}: unknown format {suffix or '(none)'}",
                         "name the output .gpkg or .geojson")
    return VECTOR_DRIVERS[suffix]


def _pyogrio_raw():
    """pyogrio.raw, imported without the warning a system pyproj lacking its data prints
    (pyogrio imports pyproj only to describe CRSs, which we pass as WKT)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Valid PROJ data directory not found")
        import pyogrio.raw
    return pyogrio.raw


_DTYPES = {"str": object, "float": "float64", "int": "int64"}
#: dataset creation options per OGR driver: GeoPackage 1.2, which every GDAL QGIS 3.22 ships
#: with reads without a warning (newer GDAL writes 1.4, which older GDAL warns about on every open)
DATASET_OPTIONS = {"GPKG": {"VERSION": "1.2"}}


def write_vector(path, fields: Fields, rows: Sequence[Dict[str, Any]], bounds: Sequence[Bounds],
                 crs: Optional[str], layer: str, overwrite: bool = False, what: str = "boxes") -> Path:
    """Polygons for ``bounds`` with ``fields`` from ``rows``, written atomically to ``path``."""
    driver = vector_driver(path, what)
    out = check_output_path(path, overwrite)
    with atomic_path(out) as tmp:
        write_features(tmp, fields, rows, polygon_wkb(bounds), crs, layer, driver)
    return out


#: the file name suffix GDAL picks each driver's options by
DRIVER_SUFFIX = {"GPKG": ".gpkg", "GeoJSON": ".geojson"}


def write_features(path, fields: Fields, rows: Sequence[Dict[str, Any]], geoms, crs: Optional[str],
                   layer: str, driver: str) -> None:
    """WKB polygons ``geoms`` with ``fields`` from ``rows`` as one ``driver`` layer at ``path``
    (written under the driver's suffix, then renamed: ``path`` may be any temporary name)."""
    import numpy as np
    data = []
    for name, kind in fields:
        vals = [r[name] for r in rows]
        if kind == "str":
            data.append(np.asarray(["" if v is None else str(v) for v in vals], dtype=object))
        else:
            data.append(np.asarray(vals, dtype=_DTYPES[kind]))
    path = Path(path)
    tmp_file = path.with_suffix(DRIVER_SUFFIX[driver])  # GDAL picks layer options by extension
    try:
        with warnings.catch_warnings():  # no CRS is expected for ungeoreferenced images
            warnings.filterwarnings("ignore", message=".*'crs' was not provided")
            _pyogrio_raw().write(str(tmp_file), np.asarray(geoms, dtype=object), data, names(fields),
                                 layer=layer, driver=driver, geometry_type="Polygon", crs=crs,
                                 dataset_options=DATASET_OPTIONS.get(driver))
        tmp_file.replace(path)
    finally:
        tmp_file.unlink(missing_ok=True)


def write_heatmap_tif(heat, transform, crs: Optional[str], band_names: Sequence[str], path,
                      overwrite: bool = False) -> Path:
    """A (P, H, W) score array as one float32 GeoTIFF, band i named after prompt i
    (NaN = not scored), written atomically."""
    import numpy as np
    import rasterio
    out = check_output_path(path, overwrite)
    heat = np.asarray(heat, dtype=np.float32)
    p, h, w = heat.shape
    profile = dict(driver="GTiff", width=w, height=h, count=p, dtype="float32",
                   transform=transform, nodata=float("nan"), compress="deflate")
    if crs:
        profile["crs"] = crs
    if h >= 256 and w >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(tmp, "w", **profile) as ds:
                ds.write(heat)
                for i, name in enumerate(list(band_names)[:p], start=1):
                    ds.set_band_description(i, name)
    return out
