"""Rasters where analysts keep them: cloud object stores and web servers, read
through GDAL's virtual file systems (``/vsicurl/``, ``/vsis3/``, ``/vsigs/``,
``/vsiaz/``).

A raster argument is either a local file or one of those: ``http(s)://`` URLs
become ``/vsicurl/`` paths, and the path is kept as typed (never normalised
as a file path: ``Path("http://x")`` would read ``http:/x``). A remote raster
is checked by opening it with GDAL, with GDAL's HTTP retries
(``GDAL_HTTP_MAX_RETRY``, ``GDAL_HTTP_RETRY_DELAY``; defaults below unless
the user set them), and refused with a message naming the URL and GDAL's
reason.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Union

from ..core.errors import UsageError

#: GDAL virtual file systems accepted as raster sources
REMOTE_PREFIXES = ("/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/")
#: URL schemes read through /vsicurl/
URL_SCHEMES = ("http://", "https://")
#: GDAL's HTTP settings for remote rasters, unless the environment sets them
HTTP_DEFAULTS = {
    "GDAL_HTTP_MAX_RETRY": "3",          # retries on 429/502/503/504 and dropped connections
    "GDAL_HTTP_RETRY_DELAY": "1",        # seconds, doubled on each retry
    "GDAL_HTTP_TIMEOUT": "60",
}
#: set only while a remote raster is opened (never process-wide: local rasters' sidecar
#: files, .aux.xml, .ovr, world files, are found by listing their folder)
OPEN_DEFAULTS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}   # no listing of a remote folder


def is_remote(path: Union[str, os.PathLike]) -> bool:
    """True for ``/vsicurl/``, ``/vsis3/``, ``/vsigs/``, ``/vsiaz/`` paths and http(s) URLs."""
    text = os.fspath(path) if not isinstance(path, str) else path
    return isinstance(text, str) and text.startswith(REMOTE_PREFIXES + URL_SCHEMES)


def gdal_path(path: Union[str, os.PathLike]) -> str:
    """The path GDAL opens: an http(s) URL as ``/vsicurl/URL``, anything else as given."""
    text = os.fspath(path)
    return "/vsicurl/" + text if text.startswith(URL_SCHEMES) else text


def http_defaults() -> None:
    """GDAL's HTTP retries and timeouts for remote rasters (the environment's own win).
    Set in the environment, so reader processes inherit them."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def remote_error(path: str, reason: str) -> UsageError:
    """A remote raster GDAL cannot open: the URL and GDAL's reason."""
    reason = " ".join(str(reason).split()) or "no reason given"
    return UsageError(
        f"cannot read remote raster {path}: {reason}",
        "check that the URL is right and the server answers (gdalinfo " + path + "); GDAL retried "
        f"{os.environ.get('GDAL_HTTP_MAX_RETRY', HTTP_DEFAULTS['GDAL_HTTP_MAX_RETRY'])} times "
        "(set GDAL_HTTP_MAX_RETRY / GDAL_HTTP_RETRY_DELAY for more); object stores need their "
        "credentials in the environment (AWS_*, GS_*, AZURE_*)")


def open_env(**extra):
    """The GDAL settings a remote raster is opened in (the environment's own win)."""
    import rasterio
    options = {k: os.environ.get(k, v) for k, v in OPEN_DEFAULTS.items()}
    return rasterio.Env(**options, **extra)


def fresh(path: str):
    """A context in which GDAL asks the server again about ``path`` (past its
    in-process cache of remote files), so a check sees the object as it is now."""
    import rasterio
    return rasterio.Env(CPL_VSIL_CURL_NON_CACHED=gdal_path(path))


def check_raster_source(path: Union[str, os.PathLike]) -> str:
    """A raster argument, checked before any work: a local file that exists, or a
    remote raster GDAL opens. Returns the path to open (URLs as ``/vsicurl/``)."""
    text = os.fspath(path)
    if is_remote(text):
        from .reader import open_dataset
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
    from .reader import open_dataset
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
