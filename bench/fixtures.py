"""Rasters for the benchmarks, written block by block (never held whole).

The benchmarks' own helpers, so that nothing outside ``tests/`` imports from
it. ``write_blockwise`` makes a tiled GeoTIFF of any size in bounded memory:

* ``content="noise"``: cheap seeded noise (one random block row shifted per
  row, so it is neither constant nor trivially compressible): what the
  reader's throughput is measured on;
* ``content="flat"``: a flat grey (100) with a small seeded texture block
  repeated; deflate makes a 40000 x 40000 raster a few MB and quick to
  write, for the memory figures (every tile is real content: flat grey is
  not "empty", see engine.raster.reader's skipping rules).

``make_raster`` writes a small noise raster in one go.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

import mapclip.engine.raster.reader  # noqa: F401  (repairs affine before rasterio is used)
import rasterio
from affine import Affine
from rasterio.windows import Window

CRS = "EPSG:32633"
ORIGIN = (500000.0, 4000000.0)
RES = 0.5


def _profile(width: int, height: int, bands: int, block: Optional[int],
             compress: Optional[str], bigtiff: bool = True) -> dict:
    p = dict(driver="GTiff", width=width, height=height, count=bands, dtype="uint8",
             crs=CRS, transform=Affine(RES, 0.0, ORIGIN[0], 0.0, -RES, ORIGIN[1]),
             BIGTIFF="YES" if bigtiff else "IF_NEEDED")
    if block:
        p.update(tiled=True, blockxsize=block, blockysize=block)
    if compress:
        p["compress"] = compress
    return p


def write_blockwise(path, width: int, height: int, *, bands: int = 3, block: int = 512,
                    compress: Optional[str] = None, content: str = "noise", seed: int = 0) -> Path:
    """A ``width`` x ``height`` uint8 GeoTIFF tiled ``block`` px, one block row at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if content == "noise":
        base = rng.integers(1, 250, (bands, block, width + block), dtype=np.uint8)
    elif content == "flat":
        row = np.full((bands, block, width), 100, np.uint8)
        patch = rng.integers(60, 140, (bands, 16, 16), dtype=np.uint8)
        row[:, :16, :16] = patch                    # a little texture at each row's start
    else:
        raise ValueError(f"unknown content {content!r}")
    with rasterio.open(path, "w", **_profile(width, height, bands, block, compress)) as ds:
        for k, r in enumerate(range(0, height, block)):
            h = min(block, height - r)
            if content == "noise":
                shift = (k * 37) % block
                arr = base[:, :h, shift:shift + width]
            else:
                arr = row[:, :h]
            ds.write(arr, window=Window(0, r, width, h))
    return path


def make_raster(path, width: int, height: int, *, block: Optional[int] = 256,
                seed: int = 0) -> Path:
    """A small 3-band uint8 noise GeoTIFF (values 1..199)."""
    path = Path(path)
    data = np.random.default_rng(seed).integers(1, 200, (3, height, width), dtype=np.uint8)
    with rasterio.open(path, "w", **_profile(width, height, 3, block, None, bigtiff=False)) as ds:
        ds.write(data)
    return path


def cached(name: str, width: int, height: int, cache: Path, **kw) -> Tuple[Path, bool]:
    """``write_blockwise`` into ``cache/name`` unless it is there; (path, written now)."""
    import os
    path = cache / name
    if path.exists():
        return path, False
    tmp = path.with_suffix(".part.tif")
    write_blockwise(tmp, width, height, **kw)
    os.replace(tmp, path)
    return path, True
