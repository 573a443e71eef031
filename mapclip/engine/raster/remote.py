"""Rasters where analysts keep them: cloud object stores and web servers, read
through GDAL's virtual file systems (``/vsicurl/``, ``/vsis3/``, ``/vsigs/``,
``/vsiaz/``).

A raster argument is either a local file or one of those: ``http(s)://`` URLs
become ``/vsicurl/`` paths, and the path is kept as typed (never normalised
as a file path: ``Path("http://x")`` would read ``http:/x``). A remote raster
is checked by opening it with GDAL, with GDAL's HTTP retries
(``GDAL_HTTP_MAX_RETRY``, ``GDAL_HTTP_RETRY_DELAY``; defaults below unless
the user set them), and refused with a message naming the URL and GDAL's
reason (the check and a remote raster's identity: engine.raster.sources).
"""
from __future__ import annotations

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
