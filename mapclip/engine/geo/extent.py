"""Extents and ground sample distance: a raster's pixel size in metres, the
native tile size for a target GSD, and a map extent (any CRS) as a pixel window.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Tuple

import rasterio
from ..core.errors import UsageError
from .tiling import PixelWindow

if TYPE_CHECKING:
    from ..raster.reader import RasterInfo


# ------------------------------------------------------------------ GSD --
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


# ----------------------------------------------------------------- extent --
class ExtentMisses(UsageError):
    """An extent that lies outside the raster (a build over many rasters skips those)."""


def extent_to_window(info: RasterInfo, extent: Optional[Tuple[float, float, float, float]],
                     extent_crs: Optional[str] = None) -> PixelWindow:
    """Pixel window of an extent (xmin, ymin, xmax, ymax), clipped to the raster.

    ``extent_crs`` (EPSG:N, WKT, PROJ string; default: the raster's CRS) is
    transformed to the raster's CRS with ``rasterio.warp.transform_bounds``
    (densified edges, so curved reprojected edges are enclosed). The window
    is the smallest whole-pixel window containing the extent. None = the
    whole raster. UsageError when the extent is malformed or misses.
    """
    if extent is None:
        return info.window
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in extent)
    except (TypeError, ValueError):
        raise UsageError(f"extent {extent!r} is not four numbers",
                         "give xmin,ymin,xmax,ymax") from None
    if not (xmin < xmax and ymin < ymax) or not all(map(math.isfinite, (xmin, ymin, xmax, ymax))):
        raise UsageError(f"extent {xmin},{ymin},{xmax},{ymax} is empty or inverted",
                         "give xmin,ymin,xmax,ymax with xmin < xmax and ymin < ymax")
    if extent_crs:
        from rasterio.crs import CRS
        from rasterio.errors import CRSError
        try:
            with rasterio.Env():   # GDAL's messages go to logging, not stray "ERROR 1:" lines
                src = CRS.from_user_input(extent_crs)
        except (CRSError, ValueError, TypeError) as exc:
            raise UsageError(f"unknown extent CRS {extent_crs!r} ({exc})",
                             "give it as EPSG:N, e.g. --extent-crs EPSG:4326") from None
        if not info.crs:
            raise UsageError(f"{info.path} has no CRS, so an extent in {extent_crs} cannot be placed",
                             "give the extent in the raster's own (pixel) coordinates, "
                             "without --extent-crs")
        dst = CRS.from_wkt(info.crs)
        if src != dst:
            from rasterio.warp import transform_bounds
            try:
                xmin, ymin, xmax, ymax = transform_bounds(src, dst, xmin, ymin, xmax, ymax,
                                                          densify_pts=21)
            except Exception as exc:
                raise UsageError(f"cannot transform the extent from {extent_crs} to the raster's "
                                 f"CRS ({exc})", "check the extent and its CRS") from None
            if not all(map(math.isfinite, (xmin, ymin, xmax, ymax))):
                raise UsageError(f"the extent does not exist in the raster's CRS",
                                 "check the extent and its CRS")
    inv = ~info.transform
    cols, rows = [], []
    for x, y in ((xmin, ymin), (xmax, ymin), (xmin, ymax), (xmax, ymax)):
        cols.append(inv.a * x + inv.b * y + inv.c)
        rows.append(inv.d * x + inv.e * y + inv.f)

    def snap(v: float) -> float:
        r = round(v)
        return float(r) if abs(v - r) < 1e-6 else v

    c0 = max(0, math.floor(snap(min(cols))))
    r0 = max(0, math.floor(snap(min(rows))))
    c1 = min(info.width, math.ceil(snap(max(cols))))
    r1 = min(info.height, math.ceil(snap(max(rows))))
    if c1 <= c0 or r1 <= r0:
        b = info.bounds
        raise ExtentMisses(
            f"the extent {xmin:g},{ymin:g},{xmax:g},{ymax:g} (raster CRS) misses the raster, "
            f"whose bounds are {b[0]:g},{b[1]:g},{b[2]:g},{b[3]:g}",
            "give an extent that overlaps the raster (and --extent-crs if it is in another CRS)")
    return PixelWindow(c0, r0, c1 - c0, r1 - r0)
