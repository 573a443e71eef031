"""The per-tile work every index build shares, in this process
(engine.archive.build) or on a Ray worker (engine.archive.distributed): the
reading rules an index's layout stores, the tile records of a batch, and
:func:`embed_window_batch`, one batch of tile windows embedded.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..core.outputs import WGS84
from .format import TILE_DTYPE
from ..core.options import ReadOptions


def read_facts(read) -> Dict[str, Any]:
    """The reader options that change pixels, as stored in the manifest."""
    r = read or ReadOptions()
    return {"bands": list(r.bands) if r.bands else None, "stretch": r.stretch,
            "percentiles": list(r.percentiles),
            "fixed_range": list(r.fixed_range) if r.fixed_range else None}


def read_options(layout: Dict[str, Any], workers: Any = "auto"):
    """The index's stored reading rules; ``workers`` (how to read, not what) is this run's."""
    r = layout["read"]
    return ReadOptions(bands=r["bands"], stretch=r["stretch"], percentiles=tuple(r["percentiles"]),
                       fixed_range=tuple(r["fixed_range"]) if r["fixed_range"] else None,
                       workers=workers)


def to_wgs84(crs: Optional[str], xmin, ymin, xmax, ymax) -> np.ndarray:
    """(n, 4) lon/lat bounds of boxes in ``crs`` (corners transformed); NaN without CRS."""
    xmin, ymin, xmax, ymax = (np.asarray(v, dtype=np.float64).ravel() for v in (xmin, ymin, xmax, ymax))
    n = xmin.size
    if not crs or n == 0:
        return np.full((n, 4), np.nan)
    from rasterio.warp import transform
    xs = np.concatenate([xmin, xmax, xmin, xmax])
    ys = np.concatenate([ymin, ymin, ymax, ymax])
    try:
        lon, lat = transform(crs, WGS84, xs, ys)
    except Exception:
        return np.full((n, 4), np.nan)
    lon = np.asarray(lon).reshape(4, n)
    lat = np.asarray(lat).reshape(4, n)
    return np.stack([lon.min(0), lat.min(0), lon.max(0), lat.max(0)], axis=1)


def tile_records(raster_id: int, tile_px: int, tiles, transform, crs: Optional[str]) -> np.ndarray:
    rec = np.zeros(len(tiles), TILE_DTYPE)
    if not len(tiles):
        return rec
    rec["raster"] = raster_id
    rec["tile_px"] = tile_px
    rec["tile"] = [t.index for t in tiles]
    rec["col"] = [t.col for t in tiles]
    rec["row"] = [t.row for t in tiles]
    rec["width"] = [t.width for t in tiles]
    rec["height"] = [t.height for t in tiles]
    b = np.array([t.bounds(transform) for t in tiles], dtype=np.float64)
    rec["xmin"], rec["ymin"], rec["xmax"], rec["ymax"] = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    w = to_wgs84(crs, b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    rec["lon_min"], rec["lat_min"], rec["lon_max"], rec["lat_max"] = w[:, 0], w[:, 1], w[:, 2], w[:, 3]
    return rec


def embed_window_batch(lm, runner, raster_id: int, tile_px: int, tiles, arr: np.ndarray,
                       ri) -> Tuple[np.ndarray, np.ndarray]:
    """One batch of tile windows read by the raster reader -> (float16 (B, D)
    embeddings, (B,) TILE_DTYPE records). The per-batch work of every build,
    in this process (engine.archive.build) or on a Ray worker (engine.archive.distributed)."""
    import torch

    from ..model.encode import encode_images
    e = runner(lambda b: encode_images(lm, b), torch.from_numpy(arr))
    e = e.float().cpu().numpy().astype(np.float16)
    return e, tile_records(int(raster_id), tile_px, tiles, ri.transform, ri.crs)
