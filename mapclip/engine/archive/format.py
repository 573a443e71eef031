"""The index format, the floor the archive stands on: file names, dtypes,
the format version, the manifest's checks, and damage detection. It imports
nothing of the archive (numpy and engine.core only).

An index is a folder (format ``mapclip-index``, version :data:`FORMAT_VERSION`),
readable with numpy and any GDAL/OGR tool, no MapCLIP needed::

    INDEX/
      manifest.json              what is in the index (the one source of truth)
      shards/000001.emb.npy      float16 (n, D) L2-normalised tile embeddings
      shards/000001.tiles.npy    structured array (n,) of TILE_DTYPE: raster id,
                                 tile size, pixel window, bounds in the raster's
                                 CRS and in WGS84
      footprints.gpkg            every tile's footprint as a polygon (a view for
                                 GIS users, rewritten after each build)
      approx-<content>.faiss     cached approximate search index (derived)

Rows are numbered by concatenating the shards in manifest order. The manifest
lists the model (spec, architecture, preprocessing, embed dim and two probe
embeddings that identify its embedding space, engine.model.identity), the
tiling options, every raster (absolute path, fast checksum, CRS, transform,
size, progress per tile size) and every committed shard.

Writing is crash-safe: a shard's two files are written beside their final
names, flushed and renamed, and only then does an atomically replaced
manifest refer to them; files no manifest names are leftovers of an
interrupted commit and are removed by the next writer (engine.archive.writer).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..core.errors import MapClipError, UsageError


FORMAT = "mapclip-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
FOOTPRINTS = "footprints.gpkg"
FOOTPRINTS_LAYER = "tiles"
#: a writer's lock file (engine.archive.writer.WriteLock)
LOCK = ".lock"


#: bytes hashed by the fast checksum: head, tail and evenly spaced samples
CHECKSUM_HEAD = 1 << 20
CHECKSUM_SAMPLES = 32
CHECKSUM_BLOCK = 1 << 16

#: one tile record of a shard's .tiles.npy
TILE_DTYPE = np.dtype([
    ("raster", "<i4"), ("tile_px", "<i4"), ("tile", "<i4"),
    ("col", "<i4"), ("row", "<i4"), ("width", "<i4"), ("height", "<i4"),
    ("xmin", "<f8"), ("ymin", "<f8"), ("xmax", "<f8"), ("ymax", "<f8"),
    ("lon_min", "<f8"), ("lat_min", "<f8"), ("lon_max", "<f8"), ("lat_max", "<f8"),
])


#: stored vectors are L2-normalised in float16: their norms lie within this of 1
NORM_TOLERANCE = 0.02


# --------------------------------------------------------------------------- #
# Checksums, atomic files, CRS text.
# --------------------------------------------------------------------------- #
def file_checksum(path: Union[str, os.PathLike]) -> str:
    """A fast checksum of a raster file, cheap even for many-GB files.

    sha256 over: the file size, its modification time (ns), the first MiB
    (GeoTIFF header, tags, georeferencing, tile offsets), the last 64 KiB and
    :data:`CHECKSUM_SAMPLES` blocks of 64 KiB evenly spaced in between. Any
    rewrite of the file (new mtime), any change of size or header, and most
    in-place edits change it; a copy with a new mtime counts as changed and
    is re-embedded (safe, not free). Georeferencing kept in sidecar files
    (.aux.xml, world files) is compared separately (CRS and transform).
    """
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    h.update(struct.pack("<qq", st.st_size, st.st_mtime_ns))
    with open(p, "rb") as f:
        h.update(f.read(CHECKSUM_HEAD))
        if st.st_size > CHECKSUM_HEAD:
            span = st.st_size - CHECKSUM_HEAD
            for i in range(CHECKSUM_SAMPLES):
                f.seek(CHECKSUM_HEAD + span * i // CHECKSUM_SAMPLES)
                h.update(f.read(CHECKSUM_BLOCK))
            f.seek(max(CHECKSUM_HEAD, st.st_size - CHECKSUM_BLOCK))
            h.update(f.read(CHECKSUM_BLOCK))
    return "fast1:" + h.hexdigest()


def _fsync_write(path: Path, write) -> None:
    """Write ``path`` through ``write(fileobj)`` beside it, flush, rename into place."""
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_npy(path: Path, array: np.ndarray) -> None:
    _fsync_write(path, lambda f: np.save(f, array, allow_pickle=False))


def short_crs(wkt: Optional[str]) -> Optional[str]:
    """``EPSG:N`` where the CRS has one, else its WKT (None stays None)."""
    if not wkt:
        return None
    try:
        from rasterio.crs import CRS
        crs = CRS.from_user_input(wkt)
        epsg = crs.to_epsg()
        return f"EPSG:{epsg}" if epsg else crs.to_wkt()
    except Exception:
        return wkt



# --------------------------------------------------------------------------- #
# The manifest and the shards, checked.
# --------------------------------------------------------------------------- #
def check_vectors(path: Path, name: str, emb: np.ndarray, step: int = 1 << 16) -> None:
    """Refuse a shard whose vectors are not finite unit vectors (random bytes,
    a foreign array): they would give cosines of 1883 or NaN scores."""
    for i in range(0, len(emb), step):
        block = np.asarray(emb[i:i + step], np.float32)
        if not np.isfinite(block).all():
            raise damaged(path, f"shard {name} holds NaN or infinite values")
        norms = np.linalg.norm(block, axis=1)
        bad = np.abs(norms - 1.0) > NORM_TOLERANCE
        if bad.any():
            k = int(np.argmax(bad))
            raise damaged(path, f"shard {name} row {i + k} is not a unit vector (norm "
                                 f"{norms[k]:.4g}): not embeddings this index wrote")


def damaged(path: Path, what: str) -> MapClipError:
    return MapClipError(f"index {path} is damaged: {what}",
                        "build it again into a new folder (python -m engine index ... --out NEW), "
                        "or delete the folder")


def read_manifest(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The manifest of index folder ``path``, checked; clear errors otherwise."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.exists():
        raise UsageError(f"index {path} does not exist", "build it with python -m engine index")
    if path.name == MANIFEST and path.is_file():
        raise UsageError(f"{path} is the {MANIFEST} inside an index, not the index",
                         f"name the index folder instead: {path.parent}")
    if not path.is_dir() or not mf.is_file():
        raise UsageError(f"{path} is not a MapCLIP index ({MANIFEST} is missing)",
                         "name the folder `python -m engine index --out` wrote")
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise damaged(path, f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise damaged(path, f"{MANIFEST} is not a {FORMAT} manifest")
    version = m.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MapClipError(f"index {path} has format version {version}; this MapCLIP reads "
                           f"up to {FORMAT_VERSION}", "update MapCLIP")
    for key, typ in (("model", dict), ("options", dict), ("rasters", list), ("shards", list)):
        if not isinstance(m.get(key), typ):
            raise damaged(path, f"{MANIFEST} lacks {key!r}")
    try:
        ids = {int(r["id"]) for r in m["rasters"]}
        for s in m["shards"]:
            if int(s["raster"]) not in ids or int(s["rows"]) < 0 or not s["emb"] or not s["tiles"]:
                raise ValueError(f"shard {s.get('id')}")
        int(m["model"]["embed_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise damaged(path, f"{MANIFEST} has a bad entry ({exc})") from None
    return m


def content_id(manifest: Dict[str, Any]) -> str:
    """Names the rows an index holds: the index's own id (another index with
    shards of the same sizes has another content id) and its shards, their
    sizes and checks, in order. Caches derived from the rows carry it."""
    key = json.dumps([manifest.get("uid") or manifest.get("created"),
                      [[s["id"], s["rows"], s.get("check")] for s in manifest["shards"]]])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def shard_check(emb: np.ndarray, tiles: np.ndarray) -> str:
    """A shard's identity, cheap to verify on every open: a digest of its first,
    middle and last rows (vectors and tile records). A shard file moved, swapped
    with another or replaced no longer matches its manifest entry."""
    n = len(tiles)
    rows = sorted({0, n // 2, n - 1}) if n else []
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(emb[rows]), dtype=np.float16).tobytes())
    h.update(np.ascontiguousarray(np.asarray(tiles[rows]), dtype=TILE_DTYPE).tobytes())
    return h.hexdigest()[:16]


def shard_file_check(folder: Path, emb_rel: str, tiles_rel: str) -> str:
    """:func:`shard_check` of a shard written to ``folder`` (by another process)."""
    return shard_check(np.load(Path(folder) / emb_rel, mmap_mode="r", allow_pickle=False),
                       np.load(Path(folder) / tiles_rel, mmap_mode="r", allow_pickle=False))


def verify_shard(path: Path, s: Dict[str, Any], emb: np.ndarray, tiles: np.ndarray) -> None:
    """Refuse shard files that are not the rows the manifest entry ``s`` names:
    tile records of another raster, or another check (older indexes have none)."""
    n = int(s["rows"])
    if n and {int(tiles[0]["raster"]), int(tiles[n - 1]["raster"])} != {int(s["raster"])}:
        raise damaged(path, f"shard {s['id']} holds the tiles of another raster than its "
                            "manifest entry (its files were moved or swapped)")
    if s.get("check") and shard_check(emb, tiles) != s["check"]:
        raise damaged(path, f"shard {s['id']} does not hold the rows its manifest entry names "
                            "(its files were moved, swapped or replaced)")



def load_shard(path: Path, s: Dict[str, Any], dim: int, map_tiles: bool = False,
               vectors: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """The (memory-mapped float16 vectors, tile records) of manifest entry ``s``
    of the index at ``path``, checked: readable, the shapes and types the
    manifest says, the rows it names (:func:`verify_shard`) and, with
    ``vectors``, finite unit vectors (:func:`check_vectors`). ``map_tiles``:
    the tile records memory-mapped too, not read."""
    try:
        emb = np.load(path / s["emb"], mmap_mode="r", allow_pickle=False)
        tiles = np.load(path / s["tiles"], mmap_mode="r" if map_tiles else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise damaged(path, f"shard {s['id']} cannot be read ({exc})") from None
    n = int(s["rows"])
    if emb.shape != (n, dim) or emb.dtype != np.float16:
        raise damaged(path, f"shard {s['emb']} holds {emb.dtype}{emb.shape}, "
                            f"the manifest says float16({n}, {dim})")
    if tiles.dtype != TILE_DTYPE or tiles.shape != (n,):
        raise damaged(path, f"shard {s['tiles']} does not hold {n} tile records")
    verify_shard(path, s, emb, tiles)
    if vectors:
        check_vectors(path, s["emb"], emb)
    return emb, tiles
