"""What an embedding pass is: the key its cached arrays are kept under.

A key names everything the arrays depend on and nothing they do not:

* the raster's identity (:func:`raster_identity`): for each file GDAL reads
  for it (a VRT's sources, overviews, a world file) the real path, size,
  modification and change times, inode, and a digest of its bytes (the whole
  file up to :data:`FULL_HASH_BYTES`, else its head, its tail and evenly
  spaced samples). A file rewritten in place changes its change time (which
  no user tool can set back) and, nearly always, its digest. ``.aux.xml``
  files are left out: QGIS writes display statistics there while showing the
  layer; what they can change about reading (georeferencing, nodata, bands)
  is in the key as the reader's facts instead;
* how the reader reads it: size, bands, data type, CRS, transform, nodata and
  the stretch it computed;
* the area in raster pixels, the read options (bands, stretch, GSD) and the
  job's tiling (tile, window, stride, overlap, dense settings);
* the model: its weights' fingerprint (:func:`engine.model.identity.weights_fingerprint`;
  a fine-tuned copy never shares it), architecture, input size and
  normalisation, the precision and the device's path (bf16, int8, fp32).

A remote raster (an http(s) URL, ``/vsicurl/``, ``/vsis3/``, ``/vsigs/``,
``/vsiaz/``) is known by what the server says about it, asked afresh for every
job (:func:`remote_identity`): GDAL's ``VSIStatL`` size and modification time,
the response headers that name the object's version (ETag, Last-Modified,
Content-Length, and the object stores' version ids) and a digest of sampled
byte ranges read through GDAL's virtual file system (head, tail and evenly
spaced samples, about 256 KiB in a dozen range requests). A replaced object
has a new ETag or Last-Modified at the server and, nearly always, new bytes.
It is read with GDAL's Python bindings (``osgeo.gdal``, which QGIS ships);
without them a remote raster is not cached.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, is_dataclass
from typing import Any, Dict, List, Optional, Tuple
from ..model import accel
from ..model.identity import weights_fingerprint
from ..raster.remote import gdal_path, is_remote

#: files up to this size are hashed whole; larger ones by head, tail and samples
FULL_HASH_BYTES = 64 << 20
#: bytes read from the head and the tail of a larger file, and per sample
EDGE_BYTES = 1 << 20
SAMPLE_BYTES = 64 << 10
SAMPLES = 64
#: a remote raster's digest: bytes read from its head and tail, and per sample
REMOTE_EDGE_BYTES = 64 << 10
REMOTE_SAMPLE_BYTES = 16 << 10
REMOTE_SAMPLES = 8
#: response headers that name the version of a remote object (lower case)
VERSION_HEADERS = ("etag", "last-modified", "content-length", "content-md5", "x-amz-version-id",
                   "x-goog-generation", "x-ms-version-id")
#: bumped when what a cached pass holds changes: older entries then never match
FORMAT = 1
#: sidecar files left out of a raster's identity (see the module doc)
AUX_SUFFIX = ".aux.xml"

_memo: Dict[Tuple, str] = {}
_memo_lock = threading.Lock()


def _stat_key(st: os.stat_result) -> Tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digest(path: str, size: int) -> str:
    """BLAKE2b of the file (whole up to FULL_HASH_BYTES, else head + tail + samples)."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            step = (size - 2 * EDGE_BYTES) // (SAMPLES + 1)
            spans = [(0, EDGE_BYTES), (size - EDGE_BYTES, EDGE_BYTES)]
            spans += [(EDGE_BYTES + (i + 1) * step, SAMPLE_BYTES) for i in range(SAMPLES)]
            for off, n in spans:
                f.seek(off)
                h.update(f.read(n))
    return h.hexdigest()


def _file_fact(path: str) -> List[Any]:
    real = os.path.realpath(path)
    st = os.stat(real)
    sk = _stat_key(st)
    with _memo_lock:
        digest = _memo.get((real,) + sk)
    if digest is None:
        digest = file_digest(real, st.st_size)
        with _memo_lock:
            _memo[(real,) + sk] = digest
    return [real, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest]


def _remote_spans(size: int) -> List[Tuple[int, int]]:
    """(offset, length) of the byte ranges a remote raster's digest reads."""
    if size <= 2 * REMOTE_EDGE_BYTES + REMOTE_SAMPLES * REMOTE_SAMPLE_BYTES:
        return [(0, size)]
    step = (size - 2 * REMOTE_EDGE_BYTES) // (REMOTE_SAMPLES + 1)
    return ([(0, REMOTE_EDGE_BYTES), (size - REMOTE_EDGE_BYTES, REMOTE_EDGE_BYTES)]
            + [(REMOTE_EDGE_BYTES + (i + 1) * step, REMOTE_SAMPLE_BYTES)
               for i in range(REMOTE_SAMPLES)])


def remote_digest(gdal, path: str, size: int) -> Optional[str]:
    """BLAKE2b of the sampled byte ranges of a remote file, read through GDAL's
    virtual file system (``VSIFOpenL``/``VSIFSeekL``/``VSIFReadL``); None when a read fails."""
    f = gdal.VSIFOpenL(path, "rb")
    if f is None:
        return None
    h = hashlib.blake2b(digest_size=20)
    try:
        for off, n in _remote_spans(size):
            if gdal.VSIFSeekL(f, off, 0) != 0:
                return None
            data = gdal.VSIFReadL(1, n, f)
            if data is None or len(data) != n:
                return None
            h.update(data)
    finally:
        gdal.VSIFCloseL(f)
    return h.hexdigest()


def remote_identity(path: str) -> Optional[List[List[Any]]]:
    """What the server says a remote raster is (module doc), asked past GDAL's
    in-process cache; None when it cannot be asked (the raster is then not cached)."""
    try:
        from osgeo import gdal
    except ImportError:
        return None
    p = gdal_path(os.fspath(path))
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        clear = getattr(gdal, "VSICurlPartialClearCache", None)
        if clear is not None:
            clear(p)                      # the server's answer now, not an earlier one
        st = gdal.VSIStatL(p)
        if st is None or st.size <= 0:
            return None
        headers = gdal.GetFileMetadata(p, "HEADERS") or {}
        version = {k.lower(): v for k, v in headers.items() if k.lower() in VERSION_HEADERS}
        digest = remote_digest(gdal, p, st.size)
        return [[p, st.size, st.mtime, version, digest]] if digest else None
    except Exception:  # noqa: BLE001 - a remote raster that cannot be asked is just not cached
        return None
    finally:
        gdal.PopErrorHandler()


def raster_identity(path: str) -> Optional[List[List[Any]]]:
    """The identity of every file GDAL reads for ``path`` (a remote raster: what
    its server says, :func:`remote_identity`); None for a file that cannot be
    read, which is then not cached."""
    from ..raster.reader import raster_files
    p = os.fspath(path)
    if is_remote(p):
        return remote_identity(p)
    if "://" in p or p.startswith("/vsi") or not os.path.isfile(p):
        return None
    try:
        files = [f for f in raster_files(p) if os.path.isfile(f)
                 and not f.lower().endswith(AUX_SUFFIX)]
        return [_file_fact(f) for f in sorted(set(os.path.realpath(f) for f in files))]
    except OSError:
        return None


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    return value


def model_facts(lm) -> Dict[str, Any]:
    """What of a loaded model its embeddings depend on."""
    return {"weights": weights_fingerprint(lm), "arch": lm.arch, "image_size": lm.image_size,
            "mean": list(lm.mean), "std": list(lm.std), "precision": lm.precision,
            "device": lm.device.type, "path": accel.plan_for(lm).describe()}


def reader_facts(reader) -> Dict[str, Any]:
    """What the open reader makes of the raster (sidecar metadata included)."""
    info = reader.info
    return {"size": [info.width, info.height, info.count], "dtype": info.dtype, "crs": info.crs,
            "transform": _plain(tuple(info.transform)[:6]), "nodata": _plain(info.nodata),
            "bands": list(info.bands), "stretch": _plain(getattr(reader, "stretch", None))}


def pass_key(kind: str, identity: List[List[Any]], area, read, params: Dict[str, Any],
             model: Dict[str, Any], reads: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The full key of one embedding pass (plain JSON values)."""
    read = _plain(read) if read is not None else {}
    if isinstance(read, dict):
        read.pop("workers", None)          # how tiles are read does not change them
    return {"format": FORMAT, "kind": kind, "raster": identity, "reads": reads or {},
            "area": [area.col, area.row, area.width, area.height], "read": read,
            "params": _plain(params), "model": _plain(model)}


def key_digest(key: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
