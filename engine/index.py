"""Embedding index over raster archives: build, append, resume, and search.

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
interrupted commit and are removed by the next writer. A build therefore
resumes exactly after its last commit: no tile is embedded twice and none is
missed (skipped, empty tiles are re-checked, not stored).

Search is exact (one matrix product) up to :data:`APPROX_MIN_ROWS` rows and
approximate above: a faiss product-quantisation index with 4-bit fast-scan
codes (``PQ{D/2}x4fs``) proposes candidates and the stored float16 vectors
re-rank them exactly (see :func:`approx_candidates`). The faiss index is
cached beside the index, named after the content it indexes, and rebuilt
when the index changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import MapClipError, ModelError, UsageError
from .jobs import Job
from .options import IndexOptions, SearchOptions, check, with_model_defaults  # noqa: F401
from .outputs import (HIT_FIELDS, WGS84, _pyogrio_raw, hit_query, hit_rows, output_crs,  # noqa: F401
                      polygon_wkb, same_crs, vector_driver, write_vector)

FORMAT = "mapclip-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
FOOTPRINTS = "footprints.gpkg"
FOOTPRINTS_LAYER = "tiles"
LOCK = ".lock"

#: above this many stored tiles, search uses the approximate (faiss) index;
#: below it an exact matrix product is fast enough (~50 ms at 1e5 x 512-d on
#: 2 CPU cores) and needs nothing built. The one place this threshold lives.
APPROX_MIN_ROWS = 100_000
#: vectors the product quantiser is trained on (a random sample of the index)
APPROX_TRAIN_ROWS = 65_536
#: fewer rows than this are always searched exactly (too few to train on)
APPROX_MIN_TRAIN = 256
#: candidates re-ranked exactly: max(APPROX_MIN_CANDIDATES, factor * k, rows * fraction)
APPROX_MIN_CANDIDATES = 2_000
APPROX_K_FACTOR = 20
APPROX_ROW_FRACTION = 0.005
#: exact search keeps a float32 copy of the matrix in memory up to this size
EXACT_CACHE_BYTES = 1 << 30
#: rasters a FOLDER source contributes (searched recursively)
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".img", ".vrt", ".png", ".jpg", ".jpeg")
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


# --------------------------------------------------------------------------- #
# Options and results.
# --------------------------------------------------------------------------- #
@dataclass
class IndexInfo:
    """What a build did and what the index holds now."""

    path: str
    rows: int
    rasters: int
    shards: int
    embedded: int            # tiles embedded by this call
    skipped: int             # empty / nodata tiles passed over by this call
    added: List[str] = field(default_factory=list)       # new rasters
    resumed: List[str] = field(default_factory=list)     # finished an interrupted build
    replaced: List[str] = field(default_factory=list)    # changed rasters re-embedded
    unchanged: List[str] = field(default_factory=list)   # already indexed, same checksum
    seconds: float = 0.0
    model: str = ""
    device: str = ""
    precision: str = ""
    embed_dim: int = 0
    scales: List[int] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def tiles_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["tiles_per_s"] = round(self.tiles_per_s, 2)
        d["seconds"] = round(self.seconds, 3)
        return d


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


@dataclass
class SearchResult:
    hits: List[Hit]
    query: Dict[str, Any]
    method: str
    rows: int
    seconds: float
    model: str
    params: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"query": self.query, "method": self.method, "rows": self.rows,
                "seconds": round(self.seconds, 4), "model": self.model, "params": self.params,
                "hits": [h.to_json() for h in self.hits]}


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


def _save_npy(path: Path, array: np.ndarray) -> None:
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


def expand_sources(sources: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                   exclude: Optional[Path] = None) -> List[Path]:
    """Raster files from files and folders (folders searched recursively, sorted)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: List[Path] = []
    seen = set()
    for s in sources or ():
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*")
                           if q.is_file() and q.suffix.lower() in RASTER_SUFFIXES
                           and not (exclude and exclude.resolve() in q.resolve().parents))
            if not found:
                raise UsageError(f"folder {p} holds no rasters",
                                 f"rasters are found by suffix: {', '.join(RASTER_SUFFIXES)}")
            files = found
        elif p.is_file():
            files = [p]
        else:
            raise UsageError(f"raster {p} does not exist", "check the path")
        for f in files:
            key = str(f.resolve())
            if key not in seen:
                seen.add(key)
                out.append(f.resolve())
    if not out:
        raise UsageError("no rasters given", "name raster files or folders to index")
    return out


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
    from .encode import encode_images, encode_text
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


#: weight precisions a fingerprint is kept for, finest first
FINGERPRINT_DTYPES = ("fp32", "bf16", "fp16")


def weights_fingerprint(lm) -> Dict[str, str]:
    """SHA-256 of the model's weights (every parameter and buffer, by name), per
    precision: ``fp32`` when all floating tensors are fp32, and ``bf16``/``fp16``
    with every fp32 tensor rounded to that type the way a model loaded at that
    precision is (tensors already in it kept), so that an index built in fp32
    recognises the same weights loaded in bf16 or fp16 on a GPU, also when some
    layers stay fp32 there. Two models with any weight different (a fine-tuned
    copy) never share a fingerprint. Cached on the loaded model."""
    import torch
    cached = getattr(lm, "_mapclip_fingerprint", None)
    if cached is not None:
        return dict(cached)
    tensors = sorted(lm.model.state_dict().items(), key=lambda kv: kv[0])
    floats = {t.dtype for _, t in tensors if t.is_floating_point()}
    wide = {torch.float32, torch.float64}
    out: Dict[str, str] = {}
    for key, cast in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if not floats <= (wide | ({cast} if cast is not None else set())):
            continue   # some tensor is already in another reduced precision
        h = hashlib.sha256()
        for name, t in tensors:
            t = t.detach()
            if cast is not None and t.dtype in wide:
                t = t.to(cast)
            t = t.cpu().contiguous().reshape(-1)
            h.update(f"{name}|{t.numel()}|{t.dtype}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[key] = h.hexdigest()
    try:
        lm._mapclip_fingerprint = dict(out)
    except AttributeError:  # pragma: no cover - a frozen object
        pass
    return out


def same_weights(a: Dict[str, Any], b: Dict[str, Any]) -> Optional[bool]:
    """Whether two identities have the same weights by fingerprint: True/False at
    the finest precision both recorded; None when they share none (an index
    written before fingerprints, or bf16 against fp16 weights)."""
    fa, fb = a.get("weights") or {}, b.get("weights") or {}
    if not isinstance(fa, dict) or not isinstance(fb, dict):
        return None
    for key in FINGERPRINT_DTYPES:
        if key in fa and key in fb:
            return fa[key] == fb[key]
    return None


def _encode_query_image(lm, p: Path) -> np.ndarray:
    """The embedding of a query image file: an ordinary picture through PIL, and
    anything PIL cannot decode (a float32 or 16-bit GeoTIFF, JPEG2000, ...)
    through the raster reader, stretched to 8 bit like the tiles of an index."""
    from PIL import Image, UnidentifiedImageError

    from .encode import encode_image_files, encode_images
    try:
        with Image.open(p) as im:
            im.convert("RGB").load()
        return encode_image_files(lm, [str(p)])[0].cpu().numpy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        pass
    from .raster import open_raster
    try:
        with open_raster(str(p)) as reader:
            rgb, _ = reader.read(reader.info.window, out_shape=(lm.image_size, lm.image_size))
    except UsageError as exc:
        raise UsageError(f"cannot read image {p} as a query: it is neither a picture (PNG, "
                         "JPEG, 8-bit TIFF) nor a raster GDAL can open",
                         "give an image file, or a raster GDAL can open (check it with "
                         "gdalinfo FILE)") from None
    return encode_images(lm, rgb[None])[0].cpu().numpy()


def _describe_model(m: Dict[str, Any]) -> str:
    return f"{m.get('spec') or m.get('model')!r} ({m.get('arch')}, {m.get('embed_dim')}-d)"


def same_space(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """True when two model identities embed into the same space: the same weights
    by fingerprint (:func:`weights_fingerprint`) where both have one, and the
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


def _check_vectors(path: Path, name: str, emb: np.ndarray, step: int = 1 << 16) -> None:
    """Refuse a shard whose vectors are not finite unit vectors (random bytes,
    a foreign array): they would give cosines of 1883 or NaN scores."""
    for i in range(0, len(emb), step):
        block = np.asarray(emb[i:i + step], np.float32)
        if not np.isfinite(block).all():
            raise _damaged(path, f"shard {name} holds NaN or infinite values")
        norms = np.linalg.norm(block, axis=1)
        bad = np.abs(norms - 1.0) > NORM_TOLERANCE
        if bad.any():
            k = int(np.argmax(bad))
            raise _damaged(path, f"shard {name} row {i + k} is not a unit vector (norm "
                                 f"{norms[k]:.4g}): not embeddings this index wrote")


def _damaged(path: Path, what: str) -> MapClipError:
    return MapClipError(f"index {path} is damaged: {what}",
                        "build it again into a new folder (python -m engine index ... --out NEW), "
                        "or delete the folder")


def read_manifest(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The manifest of index folder ``path``, checked; clear errors otherwise."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.exists():
        raise UsageError(f"index {path} does not exist", "build it with python -m engine index")
    if not path.is_dir() or not mf.is_file():
        raise UsageError(f"{path} is not a MapCLIP index ({MANIFEST} is missing)",
                         "name the folder `python -m engine index --out` wrote")
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _damaged(path, f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _damaged(path, f"{MANIFEST} is not a {FORMAT} manifest")
    version = m.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MapClipError(f"index {path} has format version {version}; this MapCLIP reads "
                           f"up to {FORMAT_VERSION}", "update MapCLIP")
    for key, typ in (("model", dict), ("options", dict), ("rasters", list), ("shards", list)):
        if not isinstance(m.get(key), typ):
            raise _damaged(path, f"{MANIFEST} lacks {key!r}")
    try:
        ids = {int(r["id"]) for r in m["rasters"]}
        for s in m["shards"]:
            if int(s["raster"]) not in ids or int(s["rows"]) < 0 or not s["emb"] or not s["tiles"]:
                raise ValueError(f"shard {s.get('id')}")
        int(m["model"]["embed_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, f"{MANIFEST} has a bad entry ({exc})") from None
    return m


def content_id(manifest: Dict[str, Any]) -> str:
    """Names the rows an index holds (shards and their sizes, in order)."""
    key = json.dumps([[s["id"], s["rows"]] for s in manifest["shards"]])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


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
        self._flat16 = None
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
            raise _damaged(self.path, f"shard {s['id']} cannot be read ({exc})") from None
        n = int(s["rows"])
        if emb.shape != (n, d) or emb.dtype != np.float16:
            raise _damaged(self.path, f"shard {s['emb']} holds {emb.dtype}{emb.shape}, "
                                      f"the manifest says float16({n}, {d})")
        if tiles.dtype != TILE_DTYPE or tiles.shape != (n,):
            raise _damaged(self.path, f"shard {s['tiles']} does not hold {n} tile records")
        _check_vectors(self.path, s["emb"], emb)
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
                f"index {self.path} was built with model {_describe_model(self.model)}, "
                f"not {_describe_model(ident)}: their embeddings are not comparable",
                f"use --model {self.model.get('spec')} with this index, or build a new index "
                f"for the other model")

    # ---- search ------------------------------------------------------------
    def exact_top(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the ``k`` best rows for ``q``, over every row.

        Up to EXACT_CACHE_BYTES of float32 the matrix product runs on a cached
        float32 copy; above, a faiss flat scan over the stored float16 values
        (``SQfp16``: the same numbers, no float32 copy) does it.
        """
        emb = self.embeddings()
        q = np.asarray(q, np.float32)
        if emb.size * 4 <= EXACT_CACHE_BYTES:
            if self._emb32 is None:
                self._emb32 = emb.astype(np.float32)
            scores = self._emb32 @ q
            top = _top(scores, k)
            return top, scores[top]
        if self._flat16 is None:
            import faiss
            flat = faiss.IndexScalarQuantizer(emb.shape[1], faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
            step = 1 << 16
            for i in range(0, len(emb), step):
                flat.add(np.ascontiguousarray(emb[i:i + step], dtype=np.float32))
            self._flat16 = flat
        scores, rows = self._flat16.search(q[None], min(k, len(emb)))
        keep = rows[0] >= 0
        rows, scores = rows[0][keep], scores[0][keep]
        order = np.lexsort((rows, -scores))
        return rows[order], scores[order]

    def rerank(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Exact scores of the given rows."""
        return self.vectors(rows) @ np.asarray(q, np.float32)

    # ---- rows without loading every shard (engine/ann.py) -------------------
    def store(self):
        """The rows read from the memory-mapped shards (engine.ann.ShardStore)."""
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
        """The cached IVF-PQ index for this content (engine.ann; built and saved if missing)."""
        if getattr(self, "_ivf", None) is None:
            from .ann import load_or_build
            self._ivf = load_or_build(self)
        return self._ivf

    def approx(self):
        """The cached faiss index for this content (built and saved if missing)."""
        if self._approx is None:
            self._approx = load_or_build_approx(self)
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
    idx._emb32 = idx._flat16 = None
    idx._tiles = tiles if tiles is not None else np.zeros(n, TILE_DTYPE)
    idx._approx = None
    return idx


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


# --------------------------------------------------------------------------- #
# Approximate search (faiss).
# --------------------------------------------------------------------------- #
def approx_factory(dim: int) -> str:
    """faiss factory string: 4-bit fast-scan PQ over 2-d sub-vectors (D/2 bytes per
    vector), or 8-bit scalar quantisation for odd dimensions."""
    return f"PQ{dim // 2}x4fs" if dim % 2 == 0 else "SQ8"


def approx_candidates(k: int, rows: int) -> int:
    """Candidates the approximate index proposes for exact re-ranking."""
    return int(min(rows, max(APPROX_MIN_CANDIDATES, APPROX_K_FACTOR * k,
                             int(rows * APPROX_ROW_FRACTION))))


def build_approx(emb: np.ndarray, seed: int = 0):
    """A faiss inner-product index over ``emb`` (rows, D) float16/32."""
    import faiss
    n, d = emb.shape
    index = faiss.index_factory(d, approx_factory(d), faiss.METRIC_INNER_PRODUCT)
    pq = getattr(faiss.downcast_index(index), "pq", None)
    if pq is not None:   # small samples are fine for 16-centroid sub-quantisers: no warnings
        pq.cp.min_points_per_centroid = 1
        pq.cp.verbose = False
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, APPROX_TRAIN_ROWS), replace=False))
    index.train(np.ascontiguousarray(emb[sample], dtype=np.float32))
    step = 1 << 16
    for i in range(0, n, step):
        index.add(np.ascontiguousarray(emb[i:i + step], dtype=np.float32))
    return index


def approx_path(index: Index) -> Path:
    return index.path / f"approx-{index.content_id}.faiss"


def load_or_build_approx(index: Index):
    """Read the cached faiss index for the index's content, or build and cache it.

    Stale caches (other content) are removed. A read-only index folder still
    works: the faiss index is then built in memory for this session only.
    """
    import faiss
    if index.path is None:
        return build_approx(index.embeddings())
    path = approx_path(index)
    if path.is_file():
        try:
            fi = faiss.read_index(str(path))
            if fi.ntotal == index.rows and fi.d == index.embed_dim:
                return fi
        except RuntimeError:
            pass
    fi = build_approx(index.embeddings())
    try:
        tmp = path.with_name(path.name + ".part")
        faiss.write_index(fi, str(tmp))
        os.replace(tmp, path)
        for old in index.path.glob("approx-*.faiss"):
            if old != path:
                old.unlink(missing_ok=True)
    except (OSError, RuntimeError):
        pass
    return fi


# --------------------------------------------------------------------------- #
# Queries.
# --------------------------------------------------------------------------- #
def _load_query_model(index: Index, model, options: SearchOptions):
    from .models import LoadedModel, load_model
    if isinstance(model, LoadedModel):
        lm = model
    else:
        lm = load_model(model or index.model.get("spec"), device=options.device,
                        precision=options.precision)
    index.check_model(lm)
    return lm


def _parse_point(like) -> Tuple[float, float]:
    if isinstance(like, str):
        parts = like.replace(";", ",").split(",")
        try:
            x, y = (float(v) for v in parts)
        except ValueError:
            raise UsageError(f"--like {like!r} is not a point X,Y", "write it as X,Y, e.g. 512300.5,4403120") from None
        return x, y
    try:
        x, y = like
        return float(x), float(y)
    except (TypeError, ValueError):
        raise UsageError(f"--like {like!r} is not a point (x, y)", "pass two numbers") from None


def locate(index: Index, point, crs: Optional[str] = None) -> int:
    """Row of the stored tile containing ``point`` (x, y in ``crs``).

    ``crs`` defaults to the CRS the index's rasters share (UsageError if they
    differ). Among several tiles containing the point (overlap, scales) the one
    whose centre is nearest wins, the smaller tile on ties.
    """
    index.require_rows()
    x, y = _parse_point(point)
    if crs is not None:
        import rasterio
        from rasterio.crs import CRS
        try:
            with rasterio.Env():   # GDAL's messages go to logging, not stray "ERROR 1:" lines
                CRS.from_user_input(crs)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the user's CRS
            raise UsageError(f"unknown CRS {crs!r} for the point ({exc})",
                             "give it as EPSG:N, e.g. --crs EPSG:4326 for lon,lat") from None
    tiles = index.tiles()
    crss = {r.get("crs") or "" for r in index.rasters.values()}
    if crs is None:
        if len(crss) > 1 and any(not same_crs(a, b) for a in crss for b in crss):
            raise UsageError("the index holds rasters in several CRS, so the point's CRS is ambiguous",
                             "pass --crs EPSG:N (e.g. --crs EPSG:4326 for lon,lat)")
    best = None
    for rid, r in index.rasters.items():
        sel = np.flatnonzero(tiles["raster"] == rid)
        if sel.size == 0:
            continue
        rcrs = r.get("crs")
        px, py = x, y
        if crs is not None and not same_crs(crs, rcrs):
            if not rcrs:
                continue
            import rasterio
            from rasterio.warp import transform
            try:
                with rasterio.Env():
                    xs, ys = transform(crs, rcrs, [x], [y])
            except Exception as exc:
                raise UsageError(f"cannot transform the point from {crs} ({exc})",
                                 "pass --crs as EPSG:N") from None
            px, py = float(xs[0]), float(ys[0])
        t = tiles[sel]
        inside = (t["xmin"] <= px) & (px <= t["xmax"]) & (t["ymin"] <= py) & (py <= t["ymax"])
        if not inside.any():
            continue
        cand = sel[inside]
        t = tiles[cand]
        cx, cy = (t["xmin"] + t["xmax"]) / 2, (t["ymin"] + t["ymax"]) / 2
        w = np.maximum(t["xmax"] - t["xmin"], 1e-12)
        dist = np.hypot((cx - px) / w, (cy - py) / w)
        order = np.lexsort((t["tile_px"], dist))
        row, d = int(cand[order[0]]), float(dist[order[0]])
        if best is None or d < best[1]:
            best = (row, d)
    if best is None:
        where = f" ({crs})" if crs else ""
        raise UsageError(f"the point {x:g},{y:g}{where} lies outside every indexed tile",
                         "pick a location inside an indexed raster, and give --crs if the point "
                         "is not in the rasters' CRS")
    return best[0]


def query_vector(index: Index, text: Optional[str] = None, image: Optional[str] = None,
                 like=None, like_crs: Optional[str] = None, model=None,
                 options: Optional[SearchOptions] = None) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """(score vector, cosine vector, query facts) for exactly one of text/image/like.

    The score vector folds in the negative prompts: ``q - w * mean(neg)``.
    """
    options = check(options or SearchOptions())
    given = [k for k, v in (("text", text), ("image", image), ("like", like)) if v is not None]
    if len(given) != 1:
        raise UsageError("give exactly one query: --text, --image or --like",
                         f"got {', '.join(given) if given else 'none'}")
    negatives = [str(n).strip() for n in options.negative or ()]
    if any(not n for n in negatives):
        raise UsageError("empty negative prompt", "give --negative a non-empty text")
    lm = None
    if text is not None:
        if not str(text).strip():
            raise UsageError("empty query text", "give --text a non-empty description, e.g. --text quarry")
        from .scoring import encode_prompts
        lm = _load_query_model(index, model, options)
        q = encode_prompts(lm, [str(text).strip()], getattr(options, "templates", None))[0].cpu().numpy()
        facts = {"text": str(text).strip()}
    elif image is not None:
        p = Path(str(image))
        if p.is_dir():
            raise UsageError(f"query image {p} is a folder, not an image file",
                             "give one image file (PNG, JPEG, TIFF or any raster GDAL reads)")
        if not p.is_file():
            raise UsageError(f"query image {p} does not exist", "check the path")
        lm = _load_query_model(index, model, options)
        q = _encode_query_image(lm, p)
        facts = {"image": str(p)}
    else:
        row = locate(index, like, like_crs)
        q = index.vectors([row])[0]
        q /= max(float(np.linalg.norm(q)), 1e-12)
        facts = {"like": list(_parse_point(like)), "crs": like_crs, "row": row}
    q = np.asarray(q, np.float32)
    score_q = q
    if negatives:
        from .scoring import encode_prompts
        lm = lm or _load_query_model(index, model, options)
        neg = encode_prompts(lm, negatives, getattr(options, "templates", None)).cpu().numpy().astype(np.float32)
        score_q = q - float(options.negative_weight) * neg.mean(axis=0)
        facts["negative"] = negatives
        facts["negative_weight"] = float(options.negative_weight)
    return score_q.astype(np.float32), q, facts


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


def ranked_rows(index: Index, score_q: np.ndarray, k: int, method: str = "auto"
                ) -> Tuple[np.ndarray, np.ndarray, str, Dict[str, Any]]:
    """(rows, scores, method used, parameters) of the top ``k`` rows for ``score_q``."""
    index.require_rows()
    if k < 1:
        raise UsageError(f"top-k must be at least 1, got {k}", "pass --top-k 1 or more")
    if method not in ("auto", "exact", "approx"):
        raise UsageError(f"unknown search method {method!r}", "use auto, exact or approx")
    n = index.rows
    use = method if method != "auto" else ("approx" if n >= APPROX_MIN_ROWS else "exact")
    params: Dict[str, Any] = {"threshold_rows": APPROX_MIN_ROWS}
    if use == "approx" and n < APPROX_MIN_TRAIN:
        use = "exact"
        params["note"] = f"approximate search needs {APPROX_MIN_TRAIN} rows or more; searched exactly"
    if use == "exact":
        rows, scores = index.exact_top(score_q, k)
        return rows, scores, "exact", params
    from . import ann
    if ann.use_ivf(n):        # IVF-PQ: codes in memory, vectors read from the shards
        rows, scores, more = ann.ranked_rows(index, score_q, k)
        return rows, scores, "approx", dict(params, **more)
    fi = index.approx()
    kc = approx_candidates(k, n)
    _, cand = fi.search(np.asarray(score_q, np.float32)[None], kc)
    cand = cand[0]
    cand = cand[cand >= 0]
    exact = index.rerank(cand, score_q)
    top = _top(exact, k)
    return cand[top], exact[top], "approx", {
        "threshold_rows": APPROX_MIN_ROWS, "faiss": approx_factory(index.embed_dim),
        "candidates": int(kc)}


def search(index: Union[str, os.PathLike, Index], text: Optional[str] = None,
           image: Optional[str] = None, like=None, like_crs: Optional[str] = None,
           model=None, options: Optional[SearchOptions] = None,
           progress=None, cancel=None) -> SearchResult:
    """Rank the index's tiles for one query (text, image file, or a location).

    ``model``: a spec or LoadedModel for text/image queries (default: the
    index's own model); refused when it embeds into another space. A
    location query (``like``, x,y in ``like_crs``) needs no model: the stored
    embedding of the tile containing the point is the query.
    """
    t0 = time.perf_counter()
    options = check(options or SearchOptions())
    job = Job(progress, cancel, total=2)
    idx = open_index(index)
    idx.require_rows()
    score_q, q, facts = query_vector(idx, text, image, like, like_crs, model, options)
    job.step()
    rows, scores, method, params = ranked_rows(idx, score_q, int(options.top_k), options.method)
    cos = idx.rerank(rows, q) if len(rows) else np.zeros(0, np.float32)
    hits = [idx.hit(i + 1, int(r), float(s), float(c)) for i, (r, s, c) in enumerate(zip(rows, scores, cos))]
    job.step()
    return SearchResult(hits=hits, query=facts, method=method, rows=idx.rows,
                        seconds=time.perf_counter() - t0, model=str(idx.model.get("spec")),
                        params=params)


def search_index(index, text: Optional[str] = None, image: Optional[str] = None, like=None,
                 like_crs: Optional[str] = None, model=None, options: Optional[SearchOptions] = None,
                 progress=None, cancel=None) -> List[Hit]:
    """The ranked hits of :func:`search` (the shared-interface entry point)."""
    return search(index, text, image, like, like_crs, model, options, progress, cancel).hits


# --------------------------------------------------------------------------- #
# Building: create, append, resume.
# --------------------------------------------------------------------------- #
def _read_facts(read) -> Dict[str, Any]:
    """The reader options that change pixels, as stored in the manifest."""
    from .raster import ReadOptions
    r = read or ReadOptions()
    return {"bands": list(r.bands) if r.bands else None, "stretch": r.stretch,
            "percentiles": list(r.percentiles),
            "fixed_range": list(r.fixed_range) if r.fixed_range else None}


def _layout(options: IndexOptions, stored: Optional[Dict[str, Any]], image_size: int) -> Dict[str, Any]:
    """The index's tiling layout: the stored one, checked against what was asked,
    or (new index) the asked one with defaults filled in."""
    if options.gsd is None and options.read is not None and getattr(options.read, "gsd", None):
        options = IndexOptions(**{**options.__dict__, "gsd": options.read.gsd})   # ReadOptions.gsd
    asked_scales = [int(s) for s in options.scales] if options.scales else (
        [int(options.tile_px)] if options.tile_px else None)
    if asked_scales is not None and (not asked_scales or min(asked_scales) < 1):
        raise UsageError(f"tile sizes must be positive, got {asked_scales}", "e.g. --scales 224,448")
    if options.stride_px is not None and int(options.stride_px) < 1:
        raise UsageError(f"stride must be positive, got {options.stride_px}", "e.g. --stride 112")
    if options.gsd is not None and not float(options.gsd) > 0:
        raise UsageError(f"GSD must be positive, got {options.gsd}", "e.g. --gsd 0.5")
    if options.min_valid is not None and not 0.0 <= float(options.min_valid) <= 1.0:
        raise UsageError(f"min_valid must lie in 0..1, got {options.min_valid}", "e.g. 0.5")
    if stored is not None:
        mismatch = []
        if asked_scales is not None and asked_scales != stored["scales"]:
            mismatch.append(f"tile sizes {asked_scales} (index: {stored['scales']})")
        if options.stride_px is not None and int(options.stride_px) != stored["stride_px"]:
            mismatch.append(f"stride {options.stride_px} (index: {stored['stride_px']})")
        if options.gsd is not None and float(options.gsd) != stored["gsd"]:
            mismatch.append(f"GSD {options.gsd} (index: {stored['gsd']})")
        if options.read is not None and _read_facts(options.read) != stored["read"]:
            mismatch.append(f"band/stretch options {_read_facts(options.read)} (index: {stored['read']})")
        if options.min_valid is not None and float(options.min_valid) != stored["min_valid"]:
            mismatch.append(f"min_valid {options.min_valid} (index: {stored['min_valid']})")
        if mismatch:
            raise UsageError("the index was built with other tiling options: " + "; ".join(mismatch),
                             "leave those options out to use the index's own, or build a new index")
        return stored
    scales = asked_scales or [int(image_size)]
    stride = int(options.stride_px) if options.stride_px is not None else scales[0]
    return {"scales": scales, "stride_px": stride,
            "gsd": float(options.gsd) if options.gsd is not None else None,
            "read": _read_facts(options.read),
            "min_valid": float(options.min_valid) if options.min_valid is not None else 0.5}


def _stride_for(layout: Dict[str, Any], tile_px: int) -> int:
    """Stride of one scale: the first scale's stride, same overlap fraction for the others."""
    base = layout["scales"][0]
    return max(1, int(round(layout["stride_px"] * tile_px / base)))


def _read_options(layout: Dict[str, Any]):
    from .raster import ReadOptions
    r = layout["read"]
    return ReadOptions(bands=r["bands"], stretch=r["stretch"], percentiles=tuple(r["percentiles"]),
                       fixed_range=tuple(r["fixed_range"]) if r["fixed_range"] else None)


class _Lock:
    """An exclusive writer lock file (INDEX/.lock holding the writer's pid).

    A lock whose process no longer exists is stale and taken over.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.held = False

    def __enter__(self) -> "_Lock":
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
        m = {"format": FORMAT, "version": FORMAT_VERSION,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "model": identity, "options": layout, "rasters": [], "shards": [],
             "next_raster": 1, "next_shard": 1, "footprints": None,
             "approx": {"threshold_rows": APPROX_MIN_ROWS, "factory": approx_factory(identity["embed_dim"])},
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
            _save_npy(self.folder / emb_rel, np.ascontiguousarray(emb, dtype=np.float16))
            _save_npy(self.folder / tiles_rel, np.ascontiguousarray(tiles, dtype=TILE_DTYPE))
            self.manifest["shards"].append({"id": sid, "raster": int(entry["id"]), "tile_px": int(tile_px),
                                            "rows": int(len(tiles)), "first_tile": int(first_tile),
                                            "next_tile": int(next_tile), "emb": emb_rel, "tiles": tiles_rel})
        entry["progress"][str(tile_px)] = int(next_tile)
        self.save()


def _tile_records(raster_id: int, tile_px: int, tiles, transform, crs: Optional[str]) -> np.ndarray:
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


def _existing_manifest(out: Path) -> Optional[Dict[str, Any]]:
    """The manifest of an existing index at ``out``; None for a new (absent/empty) folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} is a file, not an index folder", "give a folder path for --out")
    if out.is_dir() and (out / MANIFEST).exists():
        return read_manifest(out)
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise UsageError(f"output folder {out} exists and is not a MapCLIP index",
                         "choose a new or empty folder for --out")
    return None


def _check_append(out: Path, m: Dict[str, Any], identity: Dict[str, Any]) -> None:
    if not same_space(m["model"], identity):
        raise ModelError(
            f"index {out} was built with model {_describe_model(m['model'])}; cannot add "
            f"embeddings from {_describe_model(identity)} (a different embedding space)",
            f"index with --model {m['model'].get('spec')}, or write to a new --out folder")


@dataclass
class _Source:
    path: Path
    checksum: str
    georef: Dict[str, Any]
    grids: Dict[int, Any]


def _probe_sources(paths: Sequence[Path], layout: Dict[str, Any]) -> List[_Source]:
    """Open every raster once (metadata only): checksum, georeferencing, tile grids.

    Runs before anything is written, so an unreadable raster leaves no trace.
    """
    from .raster import open_raster
    from .tiling import TileGrid
    read_opts = _read_options(layout)
    out = []
    for p in paths:
        with open_raster(str(p), read_opts) as reader:
            ri = reader.info
            grids = {int(s): TileGrid.for_raster(ri, None, int(s), _stride_for(layout, int(s)),
                                                 layout["gsd"], max_tiles=None)
                     for s in layout["scales"]}
        georef = {"crs": ri.crs, "transform": [float(v) for v in list(ri.transform)[:6]],
                  "width": int(ri.width), "height": int(ri.height)}
        out.append(_Source(p, file_checksum(p), georef, grids))
    return out


def _reconcile(writer: IndexWriter, src: _Source, reindex: bool) -> Tuple[Dict[str, Any], str]:
    """The manifest entry for a source and what to do: added, resumed, replaced or unchanged."""
    key = str(src.path)
    entry = writer.raster_entry(key)
    if entry is not None:
        g = src.georef
        same = (entry.get("checksum") == src.checksum and entry.get("width") == g["width"]
                and entry.get("height") == g["height"] and same_crs(entry.get("crs"), g["crs"])
                and np.allclose(entry.get("transform") or [0] * 6, g["transform"]))
        if same and not reindex:
            status = "unchanged" if entry.get("complete") else "resumed"
        else:
            writer.drop_rows(entry)
            status = "replaced"
        entry.update(g, checksum=src.checksum)
    else:
        rid = int(writer.manifest["next_raster"])
        writer.manifest["next_raster"] = rid + 1
        entry = dict({"id": rid, "path": key, "name": src.path.name, "checksum": src.checksum,
                      "progress": {}, "complete": False}, **src.georef)
        writer.manifest["rasters"].append(entry)
        status = "added"
    entry["grids"] = {str(s): {"tiles": len(g), "cols": g.n_cols, "rows": g.n_rows,
                               "tile_width": g.tile_width, "tile_height": g.tile_height,
                               "stride": list(g.stride), "out_px": g.out_px}
                      for s, g in src.grids.items()}
    return entry, status


def build_index(sources, out: Union[str, os.PathLike], model, options: Optional[IndexOptions] = None,
                progress=None, cancel=None) -> IndexInfo:
    """Embed every tile of ``sources`` (raster files and folders) into index ``out``.

    Creates the index, appends new rasters to an existing one, finishes an
    interrupted build where its last commit stopped, and replaces the rows
    of rasters whose checksum (or georeferencing) changed. Tiles stream
    through :func:`engine.raster.iter_tile_batches` and
    :func:`engine.encode.encode_images`, like detect. On cancel the tiles
    embedded so far are committed (the index stays consistent and resumable)
    and :class:`Cancelled` is raised. A new index that fails before its first
    commit is removed.
    """
    import shutil

    from .models import LoadedModel, load_model
    from .raster import open_raster

    t0 = time.perf_counter()
    options = check(options or IndexOptions())
    out = Path(out).expanduser().resolve()
    paths = expand_sources(sources, exclude=out)
    job = Job(progress, cancel)
    existing = _existing_manifest(out)
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=options.device,
                                                                 precision=options.precision)
    options = with_model_defaults(options, lm.defaults)
    identity = model_identity(lm)
    if existing is not None:
        _check_append(out, existing, identity)
        Index(out).verify()      # a damaged index is refused before anything is written
    layout = _layout(options, existing["options"] if existing else None, lm.image_size)
    sources_ = _probe_sources(paths, layout)
    job.check()

    info = IndexInfo(path=str(out), rows=0, rasters=0, shards=0, embedded=0, skipped=0,
                     model=str(lm.spec), device=str(lm.device), precision=lm.precision,
                     embed_dim=int(lm.embed_dim), scales=list(layout["scales"]))
    created = existing is None and not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        with _Lock(out):
            m = _existing_manifest(out)   # again, under the lock
            if m is None:
                writer = IndexWriter.create(out, identity, layout)
            else:
                _check_append(out, m, identity)
                m["options"] = _layout(options, m["options"], lm.image_size)
                writer = IndexWriter(out, m)
            writer.clean()
            read_opts = _read_options(writer.manifest["options"])
            plan = []
            for src in sources_:
                entry, status = _reconcile(writer, src, options.reindex)
                plan.append((src, entry, status))
                getattr(info, status).append(str(src.path))
            writer.save()
            job.set_total(sum(0 if st == "unchanged" else
                              sum(len(g) - int(e["progress"].get(str(s), 0)) for s, g in src.grids.items())
                              for src, e, st in plan))
            if options.ray is not None:      # the same chunks of tiles, on Ray workers
                from .distributed import embed_plan_on_ray
                embed_plan_on_ray(writer, plan, lm, options, job, info)
            for src, entry, status in plan:
                if status == "unchanged" or entry.get("complete"):
                    continue
                with open_raster(str(src.path), read_opts) as reader:
                    for s, grid in src.grids.items():
                        start = int(entry["progress"].get(str(s), 0))
                        if start < len(grid):
                            _embed_grid(writer, entry, s, grid, start, reader, lm,
                                        writer.manifest["options"], options, job, info)
                entry["complete"] = True
                writer.save()
            if options.footprints:
                write_footprints(writer)
            from . import ann
            if ann.use_ivf(sum(int(s["rows"]) for s in writer.manifest["shards"])):
                ann.load_or_build(Index(out))      # search's IVF-PQ index, built once here
            m = writer.manifest
            info.rows = int(sum(int(s["rows"]) for s in m["shards"]))
            info.rasters = len(m["rasters"])
            info.shards = len(m["shards"])
    except BaseException as exc:
        from .errors import Cancelled
        if created and not isinstance(exc, (Cancelled, KeyboardInterrupt)) and \
                (writer is None or not writer.manifest["shards"]):
            shutil.rmtree(out, ignore_errors=True)
        raise
    info.seconds = time.perf_counter() - t0
    return info


def embed_window_batch(lm, runner, raster_id: int, tile_px: int, tiles, arr: np.ndarray,
                       ri) -> Tuple[np.ndarray, np.ndarray]:
    """One batch of tile windows read by the raster reader -> (float16 (B, D)
    embeddings, (B,) TILE_DTYPE records). The per-batch work of every build,
    in this process (:func:`_embed_grid`) or on a Ray worker (engine.distributed)."""
    import torch

    from .encode import encode_images
    e = runner(lambda b: encode_images(lm, b), torch.from_numpy(arr))
    e = e.float().cpu().numpy().astype(np.float16)
    return e, _tile_records(int(raster_id), tile_px, tiles, ri.transform, ri.crs)


def _embed_grid(writer: IndexWriter, entry, tile_px: int, grid, start: int, reader, lm, layout,
                options: IndexOptions, job: Job, info: IndexInfo) -> None:
    """Embed ``grid.tiles[start:]``, committing a shard every ``commit_tiles`` tiles."""
    from .detect import BatchRunner      # detect's batch runner: halves the batch on CUDA OOM
    from .errors import Cancelled
    from .raster import iter_tile_batches
    ri = reader.info
    runner = BatchRunner(int(options.batch_size))
    todo = grid.tiles[start:]
    batches = iter_tile_batches(reader, todo, int(options.batch_size), job=job,
                                min_valid=layout["min_valid"])
    embs: List[np.ndarray] = []
    recs: List[np.ndarray] = []
    first = start
    pending = 0
    consumed = 0   # tiles of ``todo`` consumed (embedded or skipped) and not yet committed

    def flush(next_tile: int) -> None:
        nonlocal embs, recs, first, pending
        emb = np.concatenate(embs) if embs else np.zeros((0, lm.embed_dim), np.float16)
        rec = np.concatenate(recs) if recs else np.zeros(0, TILE_DTYPE)
        writer.commit(entry, tile_px, emb, rec, first, next_tile)
        embs, recs, first, pending = [], [], next_tile, 0

    try:
        try:
            for tiles, arr in batches:
                e, r = embed_window_batch(lm, runner, int(entry["id"]), tile_px, tiles, arr, ri)
                embs.append(e)
                recs.append(r)
                pending += len(tiles)
                info.embedded += len(tiles)
                step = batches.done - consumed
                consumed = batches.done
                if pending >= options.commit_tiles:
                    flush(start + consumed)
                job.step(step)
        except (Cancelled, KeyboardInterrupt):
            if pending:
                flush(start + consumed)
            raise
        info.skipped += batches.skipped
        info.warnings.extend(n for n in runner.notes if n not in info.warnings)
        flush(len(grid))
        tail = len(grid) - start - consumed
        if tail:
            job.step(tail)
    finally:
        batches.close()


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
    idx._emb = idx._emb32 = idx._flat16 = idx._tiles = idx._approx = None
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
                          layer=FOOTPRINTS_LAYER, driver="GPKG", geometry_type="Polygon", crs=crs)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    m["footprints"] = {"file": FOOTPRINTS, "layer": FOOTPRINTS_LAYER, "content": content_id(m),
                       "crs": short_crs(crs)}
    writer.save()


# --------------------------------------------------------------------------- #
# Writing hits.
# --------------------------------------------------------------------------- #
def write_hits(result: SearchResult, path: Union[str, os.PathLike], overwrite: bool = False) -> Path:
    """Write hits as footprint polygons (.gpkg or .geojson), atomically.

    CRS: the one the hits' rasters share (exact native footprints), else
    WGS84 (EPSG:4326) from the stored lon/lat bounds. Fields: engine.outputs.HIT_FIELDS.
    """
    vector_driver(path, "hits")
    from .jobs import check_outputs
    inputs = [("--image", result.query.get("image"))]
    inputs += [("indexed raster", r) for r in sorted({h.raster for h in result.hits})]
    check_outputs([("--out", path)], inputs, overwrite=overwrite)   # never over an input
    crs = output_crs(h.crs for h in result.hits)
    rows, bounds = hit_rows(result.hits, result.model, hit_query(result.query), crs)
    return write_vector(path, HIT_FIELDS, rows, bounds, crs, "hits", overwrite, what="hits")
