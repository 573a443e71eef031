"""Reading an index: the :class:`Index` view of an index folder (manifest,
embeddings, tile table, the model check, exact top-k, hits) and
:func:`open_index`, which keeps recently opened indexes for repeated queries.

The format it reads is engine.archive.format; the rows come from the shards
through engine.archive.shards; the cached faiss indexes of approximate search
are built by engine.archive.approx and engine.archive.ann, which never import
this module (an Index hands itself to them).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..core.errors import ModelError, UsageError
from ..model.identity import describe_model, same_space
from ..model.space import model_identity
from . import ann, approx
from .format import MANIFEST, TILE_DTYPE, content_id, load_shard, read_manifest, short_crs
from .shards import ShardStore, exact_top_streaming, top_rows

#: exact search keeps a float32 copy of the matrix in memory up to this size
EXACT_CACHE_BYTES = 1 << 30


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


class Index:
    """A read view of an index folder: manifest, embeddings and tile table.

    Embeddings and tiles load lazily (float16 arrays, ~1 GB per million
    512-d tiles) and stay cached for repeated queries. ``Index(path)`` reads
    and checks the manifest of the folder ``path``; :meth:`from_manifest`
    views a manifest already read (a writer's), or in-memory arrays
    (``path`` None: ``embeddings`` and ``tiles`` hold every row).
    """

    def __init__(self, path: Optional[Union[str, os.PathLike]], manifest: Optional[Dict[str, Any]] = None,
                 embeddings: Optional[np.ndarray] = None, tiles: Optional[np.ndarray] = None):
        self.path = Path(path) if path is not None else None
        self.manifest = read_manifest(self.path) if manifest is None else manifest
        self._emb: Optional[np.ndarray] = embeddings
        self._emb32: Optional[np.ndarray] = None
        self._tiles: Optional[np.ndarray] = tiles
        self._approx = None
        self._ivf = None
        self._store: Optional[ShardStore] = None
        self.rasters: Dict[int, Dict[str, Any]] = {int(r["id"]): r for r in self.manifest["rasters"]}

    @classmethod
    def from_manifest(cls, manifest: Dict[str, Any], path: Optional[Union[str, os.PathLike]] = None,
                      embeddings: Optional[np.ndarray] = None,
                      tiles: Optional[np.ndarray] = None) -> "Index":
        """A view of ``manifest`` (not read again from disk): the shards of the
        folder ``path``, or, ``path`` None, the rows in ``embeddings``/``tiles``."""
        return cls(path, manifest, embeddings, tiles)

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
        return load_shard(self.path, s, self.embed_dim)

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
            self._tiles = self.store().all_tiles()
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
        memory-mapped shards (engine.archive.shards.exact_top_streaming): the same
        numbers and order, in the memory of one block whatever the index's size.
        """
        q = np.asarray(q, np.float32)
        if self.rows * self.embed_dim * 4 <= EXACT_CACHE_BYTES:
            if self._emb32 is None:
                self._emb32 = self.embeddings().astype(np.float32)
            scores = self._emb32 @ q
            top = top_rows(scores, k)
            return top, scores[top]
        rows, scores = exact_top_streaming(self.store(), q[None], k)
        return rows[0], scores[0]

    def rerank(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Exact scores of the given rows."""
        return self.vectors(rows) @ np.asarray(q, np.float32)

    # ---- rows without loading every shard (archive/shards.py) ----------------
    def store(self) -> ShardStore:
        """The rows read from the memory-mapped shards (engine.archive.shards.ShardStore)."""
        if self._store is None:
            memory = (self._emb, self._tiles) if self.path is None else None
            self._store = ShardStore(self.path, self.manifest["shards"], self.embed_dim, memory)
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
        if self._ivf is None:
            self._ivf = ann.load_or_build(self)
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

