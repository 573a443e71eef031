"""Ground sample distance: a raster's pixel size in metres, and the native tile size
for a target GSD (what a tile grid with ``gsd`` cuts, engine.geo.tiling)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Tuple

from ..core.errors import UsageError

if TYPE_CHECKING:
    from ..raster.reader import RasterInfo

_WGS84_A = 6378137.0
_WGS84_E2 = 6.69437999014e-3


def pixel_size_m(info: RasterInfo) -> Tuple[float, float]:
    """Native (x, y) pixel size in metres.

    Projected CRS: the pixel size times the CRS's linear unit. Geographic
    CRS: degrees converted at the raster's centre latitude on the WGS84
    ellipsoid. UsageError when the raster has no CRS (no metres to speak of).
    """
    if not info.crs:
        raise UsageError(f"{info.path} has no CRS, so a GSD in metres cannot be applied",
                         "drop --gsd (tiles are then in native pixels) or georeference the raster")
    from rasterio.crs import CRS
    crs = CRS.from_wkt(info.crs)
    rx, ry = info.res
    if crs.is_geographic:
        _, ymin, _, ymax = info.bounds
        lat = math.radians((ymin + ymax) / 2.0)
        s = math.sin(lat)
        w = math.sqrt(1.0 - _WGS84_E2 * s * s)
        m_lon = math.pi / 180.0 * _WGS84_A * math.cos(lat) / w
        m_lat = math.pi / 180.0 * _WGS84_A * (1.0 - _WGS84_E2) / (w ** 3)
        return rx * m_lon, ry * m_lat
    try:
        factor = float(crs.linear_units_factor[1])
    except Exception:  # CRS without a linear unit: assume metres
        factor = 1.0
    return rx * factor, ry * factor


def native_tile_size(info: RasterInfo, tile_px: int, gsd: float) -> Tuple[int, int]:
    """(width, height) in native pixels of a ``tile_px`` tile at ``gsd`` m/px.

    ``round(tile_px * gsd / res_m)`` per axis (at least 1 pixel).
    """
    if gsd is None or gsd <= 0:
        raise UsageError(f"GSD must be a positive number of metres per pixel, got {gsd}",
                         "e.g. --gsd 0.5")
    mx, my = pixel_size_m(info)
    return (max(1, int(round(tile_px * gsd / mx))), max(1, int(round(tile_px * gsd / my))))
