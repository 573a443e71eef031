"""The index on disk: its format, manifest, shards, model identity, and the
:class:`Index` that reads it and the :class:`IndexWriter` that commits to it.

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
embeddings that identify its embedding space), the tiling options, every
raster (absolute path, fast checksum, CRS, transform, size, progress per tile
size) and every committed shard.

Writing is crash-safe: a shard's two files are written beside their final
names, flushed and renamed, and only then does an atomically replaced
manifest refer to them; files no manifest names are leftovers of an
interrupted commit and are removed by the next writer.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union
import numpy as np
from ..core.errors import MapClipError, ModelError, UsageError
from ..core.options import MIN_VALID
from ..core.outputs import DATASET_OPTIONS, WGS84, _pyogrio_raw, output_crs, same_crs
from ..core.wkb import polygon_wkb
from ..model.identity import same_weights, weights_fingerprint
from . import approx


FORMAT = "mapclip-index"


FORMAT_VERSION = 1


MANIFEST = "manifest.json"


SHARDS_DIR = "shards"


FOOTPRINTS = "footprints.gpkg"


FOOTPRINTS_LAYER = "tiles"


LOCK = ".lock"


#: exact search keeps a float32 copy of the matrix in memory up to this size
EXACT_CACHE_BYTES = 1 << 30


#: bytes hashed by the fast checksum: head, tail and evenly spaced samples
CHECKSUM_HEAD = 1 << 20


CHECKSUM_SAMPLES = 32


CHECKSUM_BLOCK = 1 << 16


#: a query model is the index's model when both probe embeddings agree this well
SAME_SPACE_COSINE = 0.99


PROBE_TEXT = "an aerial image of a city with roads, buildings, fields and a river"


TILE_DTYPE = np.dtype([
    ("raster", "<i4"), ("tile_px", "<i4"), ("tile", "<i4"),
    ("col", "<i4"), ("row", "<i4"), ("width", "<i4"), ("height", "<i4"),
    ("xmin", "<f8"), ("ymin", "<f8"), ("xmax", "<f8"), ("ymax", "<f8"),
    ("lon_min", "<f8"), ("lat_min", "<f8"), ("lon_max", "<f8"), ("lat_max", "<f8"),
])


@dataclass
class Hit:
    """One ranked tile."""

    rank: int
    score: float
    cosine: float
    row: int
    raster: str
    raster_id: int
    tile_px: int
    tile: int
    pixel: Tuple[int, int, int, int]             # col, row, width, height (native px)
    bounds: Tuple[float, float, float, float]    # raster CRS
    crs: Optional[str]                           # WKT, None if not georeferenced
    wgs84: Optional[Tuple[float, float, float, float]]

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["score"] = round(self.score, 6)
        d["cosine"] = round(self.cosine, 6)
        d["crs"] = short_crs(self.crs)
        return d


# --------------------------------------------------------------------------- #
# Small helpers: checksums, atomic files, CRS text.
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


def _to_wgs84(crs: Optional[str], xmin, ymin, xmax, ymax) -> np.ndarray:
    """(n, 4) lon/lat bounds of boxes in ``crs`` (corners transformed); NaN without CRS."""
    xmin, ymin, xmax, ymax = (np.asarray(v, dtype=np.float64).ravel() for v in (xmin, ymin, xmax, ymax))
    n = xmin.size
    if not crs or n == 0:
        return np.full((n, 4), np.nan)
    from rasterio.warp import transform
    xs = np.concatenate([xmin, xmax, xmin, xmax])
    ys = np.concatenate([ymin, ymin, ymax, ymax])
    try:
        lon, lat = transform(crs, WGS84, xs, ys)
    except Exception:
        return np.full((n, 4), np.nan)
    lon = np.asarray(lon).reshape(4, n)
    lat = np.asarray(lat).reshape(4, n)
    return np.stack([lon.min(0), lat.min(0), lon.max(0), lat.max(0)], axis=1)


# --------------------------------------------------------------------------- #
# The model's identity: which embedding space vectors live in.
# --------------------------------------------------------------------------- #
def probe_image(size: int) -> np.ndarray:
    """A fixed, smooth RGB test image (1, size, size, 3) uint8."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(6.0 * (x + y))], axis=-1)
    return (img * 255).round().astype(np.uint8)[None]


def model_identity(lm) -> Dict[str, Any]:
    """Model facts stored in the manifest: spec, preprocessing, embed dim, and
    the embeddings of a fixed text and a fixed image, which identify the
    embedding space whatever the spec was called (bf16 vs fp32 agree to 0.999)."""
    from ..model.encode import encode_images, encode_text
    spec = lm.spec
    p = Path(str(spec)).expanduser()
    if p.exists():
        spec = str(p.resolve())
    facts = dict(lm.describe())
    facts.update({"spec": spec, "mean": list(lm.mean), "std": list(lm.std),
                  "probe_text": [round(float(v), 6) for v in encode_text(lm, [PROBE_TEXT])[0].cpu()],
                  "probe_image": [round(float(v), 6)
                                  for v in encode_images(lm, probe_image(lm.image_size))[0].cpu()]})
    facts.pop("device", None)
    facts.pop("precision", None)
    facts["weights"] = weights_fingerprint(lm)
    return facts


def describe_model(m: Dict[str, Any]) -> str:
    return f"{m.get('spec') or m.get('model')!r} ({m.get('arch')}, {m.get('embed_dim')}-d)"


def same_space(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """True when two model identities embed into the same space: the same weights
    by fingerprint (:func:`engine.model.identity.weights_fingerprint`) where both have one, and the
    probe embeddings agree. A fine-tuned copy of a model has probes close to its
    parent's but other weights: it is not the same space."""
    if int(a.get("embed_dim", -1)) != int(b.get("embed_dim", -2)):
        return False
    if same_weights(a, b) is False:
        return False
    for key in ("probe_text", "probe_image"):
        u, v = np.asarray(a.get(key) or [], np.float64), np.asarray(b.get(key) or [], np.float64)
        if u.shape != v.shape or u.size == 0:
            return False
        cos = float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12))
        if cos < SAME_SPACE_COSINE:
            return False
    return True


# --------------------------------------------------------------------------- #
# Reading an index.
# --------------------------------------------------------------------------- #
#: stored vectors are L2-normalised in float16: their norms lie within this of 1
NORM_TOLERANCE = 0.02


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


class Index:
    """A read view of an index folder: manifest, embeddings and tile table.

    Embeddings and tiles load lazily (float16 arrays, ~1 GB per million
    512-d tiles) and stay cached for repeated queries.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._emb: Optional[np.ndarray] = None
        self._emb32: Optional[np.ndarray] = None
        self._tiles: Optional[np.ndarray] = None
        self._approx = None
        self.rasters: Dict[int, Dict[str, Any]] = {int(r["id"]): r for r in self.manifest["rasters"]}

    @property
    def rows(self) -> int:
        return int(sum(int(s["rows"]) for s in self.manifest["shards"]))

    @property
    def model(self) -> Dict[str, Any]:
        return self.manifest["model"]

    @property
    def embed_dim(self) -> int:
        return int(self.model["embed_dim"])

    @property
    def content_id(self) -> str:
        return content_id(self.manifest)

    def _load_shard(self, s: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
        d = self.embed_dim
        try:
            emb = np.load(self.path / s["emb"], mmap_mode="r", allow_pickle=False)
            tiles = np.load(self.path / s["tiles"], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise damaged(self.path, f"shard {s['id']} cannot be read ({exc})") from None
        n = int(s["rows"])
        if emb.shape != (n, d) or emb.dtype != np.float16:
            raise damaged(self.path, f"shard {s['emb']} holds {emb.dtype}{emb.shape}, "
                                      f"the manifest says float16({n}, {d})")
        if tiles.dtype != TILE_DTYPE or tiles.shape != (n,):
            raise damaged(self.path, f"shard {s['tiles']} does not hold {n} tile records")
        verify_shard(self.path, s, emb, tiles)
        check_vectors(self.path, s["emb"], emb)
        return emb, tiles

    def verify(self) -> None:
        """Read every shard and check it (shape, type, finite unit vectors); a
        damaged index raises before anything is written to it."""
        for s in self.manifest["shards"]:
            self._load_shard(s)

    def _load(self) -> None:
        if self._emb is not None:
            return
        d = self.embed_dim
        emb = np.empty((self.rows, d), np.float16)
        tiles = np.empty((self.rows,), TILE_DTYPE)
        at = 0
        for s in self.manifest["shards"]:
            e, t = self._load_shard(s)
            emb[at:at + len(t)] = e
            tiles[at:at + len(t)] = t
            at += len(t)
        self._emb, self._tiles = emb, tiles

    def embeddings(self) -> np.ndarray:
        """(rows, D) float16, L2-normalised, in row order."""
        self._load()
        return self._emb

    def tiles(self) -> np.ndarray:
        """(rows,) TILE_DTYPE records, in row order (read without the vectors)."""
        if self._tiles is None:
            store = self.store()
            n = len(self.manifest["shards"])
            self._tiles = (np.concatenate([np.asarray(store._shard(i)[1]) for i in range(n)])
                           if n else np.zeros(0, TILE_DTYPE))
        return self._tiles

    def require_rows(self) -> None:
        if self.rows == 0:
            raise UsageError(f"index {self.path} is empty (no tiles stored)",
                             "index rasters into it first: python -m engine index RASTER "
                             f"--out {self.path} --model ...")

    def check_model(self, lm_or_identity) -> None:
        """Refuse a model whose embedding space differs from the index's."""
        ident = lm_or_identity if isinstance(lm_or_identity, dict) else model_identity(lm_or_identity)
        if not same_space(self.model, ident):
            raise ModelError(
                f"index {self.path} was built with model {describe_model(self.model)}, "
                f"not {describe_model(ident)}: their embeddings are not comparable",
                f"use --model {self.model.get('spec')} with this index, or build a new index "
                f"for the other model")

    # ---- search ------------------------------------------------------------
    def exact_top(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the ``k`` best rows for ``q``, over every row.

        Up to EXACT_CACHE_BYTES of float32 the matrix product runs on a cached
        float32 copy; above, the vectors are read block by block from the
        memory-mapped shards (engine.archive.ann.exact_top_streaming): the same
        numbers and order, in the memory of one block whatever the index's size.
        """
        q = np.asarray(q, np.float32)
        if self.rows * self.embed_dim * 4 <= EXACT_CACHE_BYTES:
            if self._emb32 is None:
                self._emb32 = self.embeddings().astype(np.float32)
            scores = self._emb32 @ q
            top = top_rows(scores, k)
            return top, scores[top]
        from .ann import exact_top_streaming
        rows, scores = exact_top_streaming(self.store(), q[None], k)
        return rows[0], scores[0]

    def rerank(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Exact scores of the given rows."""
        return self.vectors(rows) @ np.asarray(q, np.float32)

    # ---- rows without loading every shard (archive/ann.py) -------------------
    def store(self):
        """The rows read from the memory-mapped shards (engine.archive.ann.ShardStore)."""
        if getattr(self, "_store", None) is None:
            from .ann import ShardStore
            self._store = ShardStore(self)
        return self._store

    def vectors(self, rows) -> np.ndarray:
        """float32 vectors of ``rows``: from memory when loaded, else from the shards."""
        if self._emb is not None:
            return self._emb[np.asarray(rows, np.int64)].astype(np.float32)
        return self.store().vectors(rows)

    def tile_records(self, rows) -> np.ndarray:
        if self._tiles is not None:
            return self._tiles[np.asarray(rows, np.int64)]
        return self.store().tiles(rows)

    def ivf(self):
        """The cached IVF-PQ index for this content (engine.archive.ann; built and saved if missing)."""
        if getattr(self, "_ivf", None) is None:
            from .ann import load_or_build
            self._ivf = load_or_build(self)
        return self._ivf

    def approx(self):
        """The cached faiss index for this content (built and saved if missing)."""
        if self._approx is None:
            self._approx = approx.load_or_build_approx(self)
        return self._approx

    def hit(self, rank: int, row: int, score: float, cosine: float) -> Hit:
        t = self.tile_records([row])[0]
        r = self.rasters[int(t["raster"])]
        wgs = (float(t["lon_min"]), float(t["lat_min"]), float(t["lon_max"]), float(t["lat_max"]))
        return Hit(rank=rank, score=float(score), cosine=float(cosine), row=int(row),
                   raster=r["path"], raster_id=int(t["raster"]), tile_px=int(t["tile_px"]),
                   tile=int(t["tile"]),
                   pixel=(int(t["col"]), int(t["row"]), int(t["width"]), int(t["height"])),
                   bounds=(float(t["xmin"]), float(t["ymin"]), float(t["xmax"]), float(t["ymax"])),
                   crs=r.get("crs"), wgs84=None if np.isnan(wgs).any() else wgs)


def index_from_arrays(emb: np.ndarray, tiles: Optional[np.ndarray] = None,
                      model: Optional[Dict[str, Any]] = None) -> Index:
    """An in-memory Index over given vectors (benchmarks, tests); nothing is cached on disk."""
    emb = np.ascontiguousarray(emb, dtype=np.float16)
    n, d = emb.shape
    idx = Index.__new__(Index)
    idx.path = None
    idx.manifest = {"format": FORMAT, "version": FORMAT_VERSION,
                    "model": dict(model or {}, embed_dim=d), "options": {}, "rasters": [],
                    "shards": [{"id": 1, "raster": 0, "rows": n, "emb": "", "tiles": ""}]}
    idx.rasters = {}
    idx._emb = emb
    idx._emb32 = None
    idx._tiles = tiles if tiles is not None else np.zeros(n, TILE_DTYPE)
    idx._approx = None
    return idx


def index_folder_from_blocks(folder, blocks, dim: int) -> Path:
    """An index folder in the real format from (rows, dim) float32 unit-vector
    blocks (benchmarks and tests of search at scale): one shard per block, tile
    records numbering the rows of one pretend raster without CRS."""
    identity = {"spec": "synthetic", "arch": "synthetic", "embed_dim": int(dim),
                "probe_text": [1.0] + [0.0] * (dim - 1), "probe_image": [1.0] + [0.0] * (dim - 1)}
    layout = {"scales": [224], "stride_px": 224, "gsd": None,
              "read": {"bands": None, "stretch": "percentile", "percentiles": [2, 98], "fixed_range": None},
              "min_valid": MIN_VALID}
    w = IndexWriter.create(Path(folder), identity, layout)
    entry = {"id": 1, "path": str(Path(folder) / "synthetic.tif"), "name": "synthetic.tif",
             "checksum": "", "progress": {}, "complete": False, "crs": None,
             "transform": [1.0, 0.0, 0.0, 0.0, -1.0, 0.0], "width": 0, "height": 0}
    w.manifest["rasters"].append(entry)
    w.manifest["next_raster"] = 2
    at = 0
    for block in blocks:
        n = len(block)
        rec = np.zeros(n, TILE_DTYPE)
        rec["raster"], rec["tile_px"], rec["tile"] = 1, 224, np.arange(at, at + n)
        rec["width"] = rec["height"] = 224
        rec["xmin"] = np.arange(at, at + n) * 224.0
        rec["xmax"] = rec["xmin"] + 224.0
        rec["ymin"], rec["ymax"] = -224.0, 0.0
        rec["lon_min"] = rec["lat_min"] = rec["lon_max"] = rec["lat_max"] = np.nan
        w.commit(entry, 224, block.astype(np.float16), rec, at, at + n)
        at += n
    entry["complete"] = True
    w.save()
    return Path(folder)


_OPEN: Dict[str, Tuple[Tuple[int, int, int], Index]] = {}


#: indexes kept open (embeddings in memory) for repeated queries, newest last
OPEN_CACHE_SIZE = 2


def open_index(path: Union[str, os.PathLike, Index]) -> Index:
    """An Index view of ``path``; the same object again while its manifest is
    unchanged, so repeated searches (the plugin's dock) load embeddings once."""
    if isinstance(path, Index):
        return path
    key = str(Path(path).expanduser().resolve())
    try:
        st = (Path(key) / MANIFEST).stat()     # replaced on every commit: new inode
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return Index(path)          # raises the right error
    hit = _OPEN.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    idx = Index(path)
    _OPEN.pop(key, None)
    _OPEN[key] = (stamp, idx)
    while len(_OPEN) > OPEN_CACHE_SIZE:
        _OPEN.pop(next(iter(_OPEN)))
    return idx


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


class WriteLock:
    """An exclusive writer lock file (INDEX/.lock holding the writer's pid).

    A lock whose process no longer exists is stale and taken over.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.held = False

    def __enter__(self) -> "WriteLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise UsageError(f"index {self.path.parent} is being written by process {pid}",
                                     "wait for that build to finish (or stop it) and run again")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise UsageError(f"cannot lock index {self.path.parent}", f"remove {self.path} if no build runs")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class IndexWriter:
    """Commits shards and manifests of one index folder (hold the lock while writing)."""

    def __init__(self, folder: Path, manifest: Dict[str, Any]):
        self.folder = folder
        self.manifest = manifest
        (folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, folder: Path, identity: Dict[str, Any], layout: Dict[str, Any]) -> "IndexWriter":
        folder.mkdir(parents=True, exist_ok=True)
        m = {"format": FORMAT, "version": FORMAT_VERSION, "uid": uuid.uuid4().hex,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "model": identity, "options": layout, "rasters": [], "shards": [],
             "next_raster": 1, "next_shard": 1, "footprints": None,
             "approx": {"threshold_rows": approx.APPROX_MIN_ROWS, "factory": approx.approx_factory(identity["embed_dim"])},
             "checksum": "fast1: sha256 of size, mtime_ns, first MiB, last 64 KiB and 32 sampled 64 KiB blocks"}
        w = cls(folder, m)
        w.save()
        return w

    def save(self) -> None:
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = json.dumps(self.manifest, indent=1).encode("utf-8")
        _fsync_write(self.folder / MANIFEST, lambda f: f.write(data))

    def clean(self) -> None:
        """Remove files no manifest names: leftovers of an interrupted commit."""
        keep = {s["emb"] for s in self.manifest["shards"]} | {s["tiles"] for s in self.manifest["shards"]}
        for p in (self.folder / SHARDS_DIR).iterdir():
            rel = f"{SHARDS_DIR}/{p.name}"
            if rel not in keep:
                p.unlink(missing_ok=True)
        for p in self.folder.glob("*.part"):
            p.unlink(missing_ok=True)

    def raster_entry(self, path: str) -> Optional[Dict[str, Any]]:
        for r in self.manifest["rasters"]:
            if r["path"] == path:
                return r
        return None

    def drop_rows(self, entry: Dict[str, Any]) -> None:
        """Forget a raster's rows (manifest first, then the files)."""
        rid = int(entry["id"])
        gone = [s for s in self.manifest["shards"] if int(s["raster"]) == rid]
        self.manifest["shards"] = [s for s in self.manifest["shards"] if int(s["raster"]) != rid]
        entry["progress"] = {}
        entry["complete"] = False
        self.save()
        for s in gone:
            (self.folder / s["emb"]).unlink(missing_ok=True)
            (self.folder / s["tiles"]).unlink(missing_ok=True)

    def commit(self, entry: Dict[str, Any], tile_px: int, emb: np.ndarray, tiles: np.ndarray,
               first_tile: int, next_tile: int) -> None:
        """Write one shard (may be empty of rows) and record progress, atomically."""
        if len(tiles):
            sid = int(self.manifest["next_shard"])
            self.manifest["next_shard"] = sid + 1
            emb_rel, tiles_rel = f"{SHARDS_DIR}/{sid:06d}.emb.npy", f"{SHARDS_DIR}/{sid:06d}.tiles.npy"
            emb = np.ascontiguousarray(emb, dtype=np.float16)
            tiles = np.ascontiguousarray(tiles, dtype=TILE_DTYPE)
            save_npy(self.folder / emb_rel, emb)
            save_npy(self.folder / tiles_rel, tiles)
            self.manifest["shards"].append({"id": sid, "raster": int(entry["id"]), "tile_px": int(tile_px),
                                            "rows": int(len(tiles)), "first_tile": int(first_tile),
                                            "next_tile": int(next_tile), "emb": emb_rel, "tiles": tiles_rel,
                                            "check": shard_check(emb, tiles)})
        entry["progress"][str(tile_px)] = int(next_tile)
        self.save()


def tile_records(raster_id: int, tile_px: int, tiles, transform, crs: Optional[str]) -> np.ndarray:
    rec = np.zeros(len(tiles), TILE_DTYPE)
    if not len(tiles):
        return rec
    rec["raster"] = raster_id
    rec["tile_px"] = tile_px
    rec["tile"] = [t.index for t in tiles]
    rec["col"] = [t.col for t in tiles]
    rec["row"] = [t.row for t in tiles]
    rec["width"] = [t.width for t in tiles]
    rec["height"] = [t.height for t in tiles]
    b = np.array([t.bounds(transform) for t in tiles], dtype=np.float64)
    rec["xmin"], rec["ymin"], rec["xmax"], rec["ymax"] = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    w = _to_wgs84(crs, b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    rec["lon_min"], rec["lat_min"], rec["lon_max"], rec["lat_max"] = w[:, 0], w[:, 1], w[:, 2], w[:, 3]
    return rec


# --------------------------------------------------------------------------- #
# footprints.gpkg: every tile as a polygon, for GIS users.
# --------------------------------------------------------------------------- #
def _rows_in_crs(tiles: np.ndarray, rasters: Dict[int, Dict[str, Any]], crs: Optional[str]) -> np.ndarray:
    """(n, 4) boxes of ``tiles`` in ``crs``: native bounds where the raster's CRS is
    ``crs``, WGS84 bounds where ``crs`` is WGS84, else transformed corners."""
    boxes = np.stack([tiles["xmin"], tiles["ymin"], tiles["xmax"], tiles["ymax"]], axis=1)
    if not len(tiles):
        return boxes
    out = boxes.copy()
    for rid in np.unique(tiles["raster"]):
        sel = tiles["raster"] == rid
        rcrs = rasters[int(rid)].get("crs")
        if same_crs(rcrs, crs) or not crs:
            continue
        if same_crs(crs, WGS84):
            t = tiles[sel]
            out[sel] = np.stack([t["lon_min"], t["lat_min"], t["lon_max"], t["lat_max"]], axis=1)
        else:
            from rasterio.warp import transform
            b = boxes[sel]
            xs = np.concatenate([b[:, 0], b[:, 2], b[:, 0], b[:, 2]])
            ys = np.concatenate([b[:, 1], b[:, 1], b[:, 3], b[:, 3]])
            tx, ty = transform(rcrs, crs, xs, ys)
            tx, ty = np.asarray(tx).reshape(4, -1), np.asarray(ty).reshape(4, -1)
            out[sel] = np.stack([tx.min(0), ty.min(0), tx.max(0), ty.max(0)], axis=1)
    return out


def write_footprints(writer: IndexWriter) -> None:
    """Rewrite INDEX/footprints.gpkg (layer ``tiles``) from the shards, atomically."""
    folder = writer.folder
    m = writer.manifest
    final = folder / FOOTPRINTS
    idx = Index.__new__(Index)
    idx.path, idx.manifest = folder, m
    idx._emb = idx._emb32 = idx._tiles = idx._approx = None
    idx.rasters = {int(r["id"]): r for r in m["rasters"]}
    if idx.rows == 0:
        final.unlink(missing_ok=True)
        m["footprints"] = None
        writer.save()
        return
    tiles = np.concatenate([idx._load_shard(s)[1] for s in m["shards"]])
    crs = output_crs(r.get("crs") for r in m["rasters"]
                     if any(int(s["raster"]) == int(r["id"]) for s in m["shards"]))
    boxes = _rows_in_crs(tiles, idx.rasters, crs)
    cols = {"row_id": np.arange(len(tiles), dtype=np.int64),
            "raster_id": tiles["raster"].astype(np.int64),
            "raster": np.asarray([idx.rasters[int(r)]["path"] for r in tiles["raster"]], dtype=object),
            "tile_px": tiles["tile_px"].astype(np.int64), "tile": tiles["tile"].astype(np.int64),
            "px_col": tiles["col"].astype(np.int64), "px_row": tiles["row"].astype(np.int64),
            "px_width": tiles["width"].astype(np.int64), "px_height": tiles["height"].astype(np.int64),
            "xmin": tiles["xmin"], "ymin": tiles["ymin"], "xmax": tiles["xmax"], "ymax": tiles["ymax"]}
    raw = _pyogrio_raw()
    tmp = folder / (FOOTPRINTS + ".part.gpkg")
    tmp.unlink(missing_ok=True)
    try:
        geom = polygon_wkb(boxes)
        raw.write(str(tmp), geom, list(cols.values()), list(cols.keys()),
                          layer=FOOTPRINTS_LAYER, driver="GPKG", geometry_type="Polygon", crs=crs,
                          dataset_options=DATASET_OPTIONS["GPKG"])
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    m["footprints"] = {"file": FOOTPRINTS, "layer": FOOTPRINTS_LAYER, "content": content_id(m),
                       "crs": short_crs(crs)}
    writer.save()
