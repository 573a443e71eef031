"""Small GeoTIFFs with known geometry for tests (and big ones for benchmarks).

Import from tests: ``from tests.raster_fixtures import make_raster, UTM33, ...``.

* :func:`make_raster` writes a small raster from an array or a fill: known
  transform (``transform=`` or ``origin`` + ``res``), a projected CRS
  (default EPSG:32633, origin 500000 E / 4000000 N, 0.5 m pixels) or
  EPSG:4326, internal tiling (``block``), nodata value, nodata/empty boxes,
  alpha band or internal mask, overviews, any dtype (uint8, uint16, float32).
* :func:`plant` paints a recognisable pattern (a red/white checkerboard by
  default) into a (bands, H, W) array and returns its pixel window, so a test
  can assert where a detector finds it.
* :func:`write_blockwise` writes a large tiled raster block by block (never
  holding it whole), used by the benchmarks.

The data are deterministic (seeded), so tests can compare exact values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

import mapclip.engine.raster.reader  # noqa: F401  (repairs affine before rasterio is used)
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.windows import Window

#: projected test CRS and its default geometry
UTM33 = "EPSG:32633"
UTM_ORIGIN = (500000.0, 4000000.0)
UTM_RES = 0.5
#: geographic test CRS and its default geometry (a 1e-4 degree grid near Berlin)
WGS84 = "EPSG:4326"
GEO_ORIGIN = (13.0, 52.5)
GEO_RES = 1e-4


def north_up(origin: Tuple[float, float], res: float | Tuple[float, float]) -> Affine:
    """Affine of a north-up raster whose top-left corner is ``origin``."""
    rx, ry = (res, res) if np.isscalar(res) else res
    return Affine(float(rx), 0.0, float(origin[0]), 0.0, -float(ry), float(origin[1]))


def noise(bands: int, height: int, width: int, dtype: str = "uint8", seed: int = 0,
          low: Optional[float] = None, high: Optional[float] = None) -> np.ndarray:
    """Deterministic random data (bands, H, W) in ``[low, high)`` (default: 1..200 / 100..4000)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if low is None:
        low = 1 if dt == np.uint8 else 100
    if high is None:
        high = 200 if dt == np.uint8 else 4000
    if dt.kind == "f":
        return rng.uniform(low, high, (bands, height, width)).astype(dt)
    return rng.integers(low, high, (bands, height, width)).astype(dt)


def plant(data: np.ndarray, col: int, row: int, width: int, height: int,
          colors: Sequence[Sequence[float]] = ((255, 0, 0), (255, 255, 255)), cell: int = 4
          ) -> Tuple[int, int, int, int]:
    """Paint a checkerboard of two colours (per band) into ``data`` (bands, H, W).

    Returns (col, row, width, height) of the painted window. Bands beyond
    the colours' length get the last colour component.
    """
    yy, xx = np.mgrid[0:height, 0:width]
    checker = ((yy // cell + xx // cell) % 2).astype(bool)
    for b in range(data.shape[0]):
        c0 = colors[0][min(b, len(colors[0]) - 1)]
        c1 = colors[1][min(b, len(colors[1]) - 1)]
        data[b, row:row + height, col:col + width] = np.where(checker, c1, c0)
    return (col, row, width, height)


def make_raster(path, width: int = 256, height: int = 192, *, bands: int = 3,
                dtype: str = "uint8", data: Optional[np.ndarray] = None, seed: int = 0,
                crs: Optional[str] = UTM33, transform: Optional[Affine] = None,
                origin: Optional[Tuple[float, float]] = None, res: float | Tuple[float, float] = None,
                block: Optional[int] = 64, nodata: Optional[float] = None,
                nodata_box: Optional[Tuple[int, int, int, int]] = None,
                fill_box: Optional[Tuple[int, int, int, int]] = None, fill_value: float = 0,
                alpha_box: Optional[Tuple[int, int, int, int]] = None,
                mask_box: Optional[Tuple[int, int, int, int]] = None,
                colorinterp: Optional[Sequence[ColorInterp]] = None,
                colormap: Optional[dict] = None,
                overviews: Sequence[int] = (), compress: Optional[str] = None,
                driver: str = "GTiff") -> Path:
    """Write a small raster and return its path.

    ``data`` (bands, H, W) overrides the seeded noise. ``nodata_box`` =
    (col, row, w, h) is set to ``nodata`` in every band; ``fill_box`` to
    ``fill_value`` without declaring nodata (an "empty" constant area);
    ``alpha_box`` adds an alpha band that is 0 there (255 elsewhere);
    ``mask_box`` writes an internal mask that is 0 there; ``colormap``
    ({index: (r, g, b, a)}) makes band 1 paletted. Default geometry:
    EPSG:32633 -> origin 500000/4000000, 0.5 m; EPSG:4326 -> 13E/52.5N,
    1e-4 degrees; ``crs=None`` writes no georeferencing at all.
    """
    path = Path(path)
    if data is None:
        data = noise(bands, height, width, dtype, seed)
    else:
        data = np.array(data, dtype=dtype, copy=True)
        bands, height, width = data.shape
    if nodata_box is not None:
        c, r, w, h = nodata_box
        data[:, r:r + h, c:c + w] = nodata
    if fill_box is not None:
        c, r, w, h = fill_box
        data[:, r:r + h, c:c + w] = fill_value
    if crs is not None and transform is None:
        geo = str(crs).upper() == WGS84
        transform = north_up(origin or (GEO_ORIGIN if geo else UTM_ORIGIN),
                             res or (GEO_RES if geo else UTM_RES))
    count = bands + (1 if alpha_box is not None else 0)
    profile = dict(driver=driver, width=width, height=height, count=count, dtype=dtype)
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    elif transform is not None:
        profile.update(transform=transform)
    if driver == "GTiff":
        if block:
            profile.update(tiled=True, blockxsize=block, blockysize=block)
        if compress:
            profile.update(compress=compress)
        if alpha_box is not None:
            profile.update(photometric="RGB" if bands == 3 else "MINISBLACK", alpha="YES")
    if nodata is not None:
        profile["nodata"] = nodata
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(data, indexes=list(range(1, bands + 1)))
            if alpha_box is not None:
                alpha = np.full((height, width), 255, np.uint8 if dtype == "uint8" else dtype)
                c, r, w, h = alpha_box
                alpha[r:r + h, c:c + w] = 0
                ds.write(alpha.astype(dtype), bands + 1)
                ci = list(ds.colorinterp)
                ci[-1] = ColorInterp.alpha
                ds.colorinterp = ci
            if colorinterp is not None:
                ds.colorinterp = list(colorinterp)
            if colormap is not None:
                ds.write_colormap(1, colormap)
            if mask_box is not None:
                m = np.full((height, width), 255, np.uint8)
                c, r, w, h = mask_box
                m[r:r + h, c:c + w] = 0
                ds.write_mask(m)
            if overviews:
                ds.build_overviews(list(overviews), rasterio.enums.Resampling.nearest)
    return path


def write_blockwise(path, width: int, height: int, *, bands: int = 3, dtype: str = "uint8",
                    block: int = 512, crs: str = UTM33, res: float = UTM_RES,
                    origin: Tuple[float, float] = UTM_ORIGIN, seed: int = 0,
                    compress: Optional[str] = None, bigtiff: bool = True,
                    block_fn: Optional[Callable[[int, int, int, int], np.ndarray]] = None) -> Path:
    """Write a big tiled GeoTIFF one block row at a time (bounded memory).

    ``block_fn(col, row, w, h) -> (bands, h, w)`` supplies each block row's
    data; the default is cheap seeded noise (a random base row tiled with a
    per-row shift, so it is not constant and not trivially compressible).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=width, height=height, count=bands, dtype=dtype,
                   crs=crs, transform=north_up(origin, res), tiled=True,
                   blockxsize=block, blockysize=block, BIGTIFF="YES" if bigtiff else "IF_NEEDED")
    if compress:
        profile["compress"] = compress
    rng = np.random.default_rng(seed)
    hi = 250 if np.dtype(dtype) == np.uint8 else 4000
    shape = (bands, block, width + block)
    if np.dtype(dtype).kind == "f":
        base = rng.uniform(1, hi, shape).astype(dtype)
    else:
        base = rng.integers(1, hi, shape, dtype=dtype)
    with rasterio.open(path, "w", **profile) as ds:
        for k, r in enumerate(range(0, height, block)):
            h = min(block, height - r)
            if block_fn is not None:
                arr = block_fn(0, r, width, h)
            else:
                shift = (k * 37) % block
                arr = base[:, :h, shift:shift + width]
            ds.write(arr, window=Window(0, r, width, h))
    return path
