"""Raster arguments checked before any work, a raster opened for a job (the raster side of
every job's setup: engine.rasterjob, the index build), and a remote raster's identity: all
open the raster through the reader (engine.raster.reader), with GDAL asked afresh about a
remote one (engine.raster.remote.fresh)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Union

from ..core.errors import UsageError
from .reader import open_dataset, open_raster
from .remote import fresh, gdal_path, is_remote


def check_raster_source(path: Union[str, os.PathLike]) -> str:
    """A raster argument, checked before any work: a local file that exists, or a
    remote raster GDAL opens. Returns the path to open (URLs as ``/vsicurl/``)."""
    text = os.fspath(path)
    if is_remote(text):
        text = gdal_path(text)
        with fresh(text):
            open_dataset(text).close()
        return text
    if not os.path.exists(text):
        raise UsageError(f"raster {text} does not exist", "check the path")
    return text


def remote_checksum(path: str) -> str:
    """What identifies a remote raster's content without downloading it (``remote1:``):
    sha256 over GDAL's description (size, bands, data types, nodata, CRS, transform,
    block layout, overviews, tags) and GDAL's checksums of the first and last
    internal block of every band. A rewrite with another layout, georeferencing or
    edge blocks is seen; the index then re-embeds the raster."""
    with fresh(path), open_dataset(path) as ds:
        bh, bw = ds.block_shapes[0]
        from rasterio.windows import Window
        first = Window(0, 0, min(bw, ds.width), min(bh, ds.height))
        last_col = ((ds.width - 1) // bw) * bw
        last_row = ((ds.height - 1) // bh) * bh
        last = Window(last_col, last_row, min(bw, ds.width - last_col), min(bh, ds.height - last_row))
        facts = {"size": [ds.width, ds.height, ds.count], "dtypes": list(ds.dtypes),
                 "nodata": ds.nodata, "crs": ds.crs.to_wkt() if ds.crs else None,
                 "transform": list(ds.transform)[:6], "blocks": [list(b) for b in ds.block_shapes],
                 "overviews": [ds.overviews(b) for b in ds.indexes], "tags": ds.tags(),
                 "sums": [[ds.checksum(b, window=w) for w in (first, last)] for b in ds.indexes]}
    return "remote1:" + hashlib.sha256(json.dumps(facts, sort_keys=True, default=str)
                                       .encode()).hexdigest()


def open_job_raster(raster, read=None):
    """The raster side of a job's setup: ``raster`` opened for reading, quietly (warnings kept
    in ``reader.warnings``); a remote one as its server has it now, never GDAL's memory of an
    older object (a replaced object is read afresh). Use it as a context manager."""
    if is_remote(raster):
        check_raster_source(raster)
    return open_raster(raster, read, quiet=True)
