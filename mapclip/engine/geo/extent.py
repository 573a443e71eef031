"""Extents: a map extent (any CRS) as a pixel window of a raster."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Tuple

import rasterio
from ..core.errors import UsageError
from ..core.outputs import same_crs
from .tiling import PixelWindow

if TYPE_CHECKING:
    from ..raster.reader import RasterInfo


class ExtentMisses(UsageError):
    """An extent that lies outside the raster (a build over many rasters skips those)."""


def places_to_pixels(info: RasterInfo, xs, ys, crs: Optional[str] = None):
    """Map coordinates (in ``crs``; None: the raster's) as fractional raster pixels
    (col, row), one pair a place, in order."""
    if crs and info.crs and not same_crs(crs, info.crs):
        from rasterio.warp import transform
        xs, ys = transform(crs, info.crs, list(xs), list(ys))
    inv = ~info.transform
    return [tuple(inv @ (x, y)) for x, y in zip(xs, ys)]


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
