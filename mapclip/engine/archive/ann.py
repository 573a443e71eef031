"""Search at scale: an inverted-file index over product-quantised codes (faiss
IVF-PQ) that never holds the index's vectors in memory.

Which search an index gets is decided by its size alone (``--method auto``):

============================  =================================================
rows                          search
============================  =================================================
below ``APPROX_MIN_ROWS``     exact: one matrix product (engine.archive.store)
(100 000)
up to ``IVF_MIN_ROWS``        flat PQ fast-scan over every code + exact re-rank
(1 000 000)                   (engine.archive.store.build_approx)
``IVF_MIN_ROWS`` and above    IVF-PQ (this module): a coarse k-means quantiser
                              of ``nlist`` lists; the query visits the
                              ``nprobe`` nearest lists, scans their 4-bit
                              fast-scan PQ codes (D/4 bytes a vector), and the
                              best ``candidates`` are re-ranked exactly from
                              the float16 vectors, read from the memory-mapped
                              shards.
============================  =================================================

In memory for IVF-PQ: the codes (D/2 sub-vectors of 4 bits: D/4 bytes per
vector, 128 B at 512-d, 1.3 GB per 10^7), 8-byte ids and the centroids; the
float16 vectors (2*D bytes per vector, 10 GB per 10^7) stay in the shard
files, of which only the re-ranked rows are read (``candidates`` rows per
query). docs/scale.md has the
arithmetic for 10^8 and 10^9 vectors.

The IVF-PQ index is built once per index content (on the first search, or at
the end of a build that reaches ``IVF_MIN_ROWS``), streaming the shards in
blocks, and cached in the index folder as ``ann-<content>.faiss``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

#: at and above this many rows, ``auto`` / ``approx`` search use IVF-PQ
IVF_MIN_ROWS = 1_000_000
#: lists: the power of two at or below sqrt(rows), within these bounds
IVF_MIN_LISTS, IVF_MAX_LISTS = 256, 65_536
#: k-means of the coarse quantiser: training points per list (capped) and iterations
IVF_TRAIN_PER_LIST = 32
IVF_TRAIN_MAX = 262_144
IVF_KMEANS_ITER = 12
#: lists visited per query: nlist / IVF_PROBE_DIVISOR (a quarter of the codes are
#: scanned, fast: 4-bit codes in SIMD registers), at least IVF_MIN_PROBE. Text queries
#: sit far from every image vector (cosine ~0.3) and need that many lists for recall@100
#: >= 0.95; queries by example reach 0.99 with far fewer (bench/bench_index_scale.py)
IVF_PROBE_DIVISOR = 4
IVF_MIN_PROBE = 32
#: candidates re-ranked exactly: max(IVF_MIN_CANDIDATES, IVF_K_FACTOR * k)
IVF_MIN_CANDIDATES = 2_000
IVF_K_FACTOR = 20
#: rows read from the shards at a time when streaming them
BLOCK_ROWS = 1 << 16
CACHE_PREFIX = "ann-"


def ivf_lists(rows: int) -> int:
    """Inverted lists for ``rows`` vectors: 2^floor(log2(sqrt(rows))), clamped."""
    n = 1 << max(0, int(math.floor(math.log2(max(1.0, math.sqrt(max(rows, 1)))))))
    return int(min(IVF_MAX_LISTS, max(IVF_MIN_LISTS, n)))


def ivf_probe(nlist: int) -> int:
    return int(min(nlist, max(IVF_MIN_PROBE, nlist // IVF_PROBE_DIVISOR)))


def ivf_candidates(k: int, rows: int) -> int:
    return int(min(rows, max(IVF_MIN_CANDIDATES, IVF_K_FACTOR * int(k))))


def ivf_factory(dim: int, rows: int) -> str:
    """faiss factory string: ``IVF{nlist},PQ{D/2}x4fs`` (``SQ8`` codes for odd D)."""
    from .approx import approx_factory
    return f"IVF{ivf_lists(rows)},{approx_factory(dim)}"


def use_ivf(rows: int) -> bool:
    return rows >= IVF_MIN_ROWS


# --------------------------------------------------------------------------- #
# The vectors and tile records, read from the shards without loading them all.
# --------------------------------------------------------------------------- #
class ShardStore:
    """Rows of an index read from its memory-mapped shards (or from the arrays
    of an in-memory index): any rows on demand, or all of them block by block."""

    def __init__(self, index):
        self.index = index
        self.dim = int(index.embed_dim)
        shards = index.manifest["shards"]
        sizes = np.array([int(s["rows"]) for s in shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.rows = int(self.starts[-1])
        self._maps: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def _shard(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        if self.index.path is None:   # an in-memory index (benchmarks, tests)
            return self.index._emb, self.index._tiles
        got = self._maps.get(i)
        if got is None:
            from .store import TILE_DTYPE, damaged, verify_shard
            s = self.index.manifest["shards"][i]
            n = int(s["rows"])
            try:
                emb = np.load(self.index.path / s["emb"], mmap_mode="r", allow_pickle=False)
                tiles = np.load(self.index.path / s["tiles"], mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise damaged(self.index.path, f"shard {s['id']} cannot be read ({exc})") from None
            if emb.shape != (n, self.dim) or emb.dtype != np.float16 or \
                    tiles.shape != (n,) or tiles.dtype != TILE_DTYPE:
                raise damaged(self.index.path, f"shard {s['id']} does not hold the {n} rows "
                                                "its manifest entry says")
            verify_shard(self.index.path, s, emb, tiles)
            got = self._maps[i] = (emb, tiles)
        return got

    def _gather(self, rows, which: int, dtype) -> np.ndarray:
        rows = np.asarray(rows, np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError("row out of range")
        if self.index.path is None:
            return np.asarray(self._shard(0)[which][rows], dtype)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(rows, kind="stable")
        first = self._shard(0)[which] if len(self.index.manifest["shards"]) else None
        out = np.empty((rows.size,) + (first.shape[1:] if first is not None else ()), dtype)
        for i in np.unique(shard):
            sel = order[shard[order] == i]            # ascending rows of shard i
            local = rows[sel] - self.starts[i]
            out[sel] = self._shard(int(i))[which][local]
        return out

    def vectors(self, rows) -> np.ndarray:
        """(len(rows), D) float32 vectors of ``rows`` (any order, repeats allowed)."""
        return self._gather(rows, 0, np.float32)

    def tiles(self, rows) -> np.ndarray:
        from .store import TILE_DTYPE
        return self._gather(rows, 1, TILE_DTYPE)

    def blocks(self, step: int = BLOCK_ROWS, check: bool = True) -> Iterator[Tuple[int, np.ndarray]]:
        """(first row, float32 block) over every row in order; ``check``: refuse
        rows that are not finite unit vectors, like loading the index does."""
        from .store import check_vectors
        if self.index.path is None:
            emb = self.index._emb
            for a in range(0, len(emb), step):
                yield a, np.asarray(emb[a:a + step], np.float32)
            return
        for i, s in enumerate(self.index.manifest["shards"]):
            emb = self._shard(i)[0]
            for a in range(0, len(emb), step):
                block = np.asarray(emb[a:a + step], np.float32)
                if check:
                    check_vectors(self.index.path, s["emb"], block)
                yield int(self.starts[i]) + a, block


# --------------------------------------------------------------------------- #
# Building, caching, searching.
# --------------------------------------------------------------------------- #
def build_ivf(store: ShardStore, seed: int = 0, progress=None):
    """An IVF-PQ inner-product index over every row of ``store``, streamed in blocks."""
    import faiss
    n, d = store.rows, store.dim
    index = faiss.index_factory(d, ivf_factory(d, n), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    nlist = int(ivf.nlist)
    ivf.cp.niter = IVF_KMEANS_ITER
    ivf.cp.min_points_per_centroid = 1
    ivf.cp.max_points_per_centroid = 1 << 30
    ivf.cp.verbose = False
    pq = getattr(faiss.downcast_index(ivf), "pq", None)
    if pq is not None:   # 16 centroids of 2-d sub-vectors: 4096 points each are plenty
        pq.cp.min_points_per_centroid = 1
        pq.cp.max_points_per_centroid = 256
        pq.cp.verbose = False
    rng = np.random.default_rng(seed)
    m = min(n, IVF_TRAIN_MAX, nlist * IVF_TRAIN_PER_LIST)
    sample = np.sort(rng.choice(n, size=m, replace=False))
    index.train(np.ascontiguousarray(store.vectors(sample)))
    done = 0
    for _, block in store.blocks():
        index.add(np.ascontiguousarray(block))
        done += len(block)
        if progress is not None:
            progress(done, n)
    ivf.nprobe = ivf_probe(nlist)
    return index


def serves(index, fi, candidates: int) -> bool:
    """Whether the cached faiss index ``fi`` indexes ``index``'s rows: its first,
    middle and last rows, searched with their own stored vectors, are each among
    their own candidates. A cache built from another index (even one with as
    many rows, under this index's name) fails and is rebuilt."""
    n = int(index.rows)
    rows = np.array(sorted({0, n // 2, n - 1}), np.int64)
    _, cand = fi.search(np.ascontiguousarray(index.vectors(rows), dtype=np.float32),
                        int(min(n, candidates)))
    return all(r in c for r, c in zip(rows.tolist(), cand.tolist()))


def cache_path(index) -> Optional[Path]:
    return None if index.path is None else index.path / f"{CACHE_PREFIX}{index.content_id}.faiss"


def load_or_build(index, progress=None):
    """The IVF-PQ index for ``index``'s content: read from its cache file, or
    built (and cached beside the index; stale caches removed). A read-only
    index folder still works: the IVF index then lives for this session only."""
    import faiss
    path = cache_path(index)
    if path is not None and path.is_file():
        try:
            fi = faiss.read_index(str(path))
            if fi.ntotal == index.rows and fi.d == index.embed_dim:
                faiss.extract_index_ivf(fi).nprobe = ivf_probe(int(faiss.extract_index_ivf(fi).nlist))
                if serves(index, fi, ivf_candidates(1, index.rows)):
                    return fi
        except RuntimeError:
            pass
    fi = build_ivf(index.store(), progress=progress)
    if path is not None:
        try:
            tmp = path.with_name(path.name + ".part")
            faiss.write_index(fi, str(tmp))
            os.replace(tmp, path)
            for old in index.path.glob(f"{CACHE_PREFIX}*.faiss"):
                if old != path:
                    old.unlink(missing_ok=True)
        except (OSError, RuntimeError):
            pass
    return fi


def ranked_rows(index, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """(rows, exact scores, parameters) of the top ``k`` rows for ``q`` by IVF-PQ
    candidates re-ranked exactly from the stored float16 vectors."""
    import faiss
    from .store import NORM_TOLERANCE, top_rows
    fi = index.ivf()
    ivf = faiss.extract_index_ivf(fi)
    kc = ivf_candidates(k, index.rows)
    _, cand = fi.search(np.asarray(q, np.float32)[None], kc)
    cand = cand[0]
    cand = cand[cand >= 0]
    vecs = index.vectors(cand)
    norms = np.linalg.norm(vecs, axis=1)
    if not np.all(np.abs(norms - 1.0) <= NORM_TOLERANCE):   # NaN fails too
        from .store import damaged
        raise damaged(index.path, "a shard holds rows that are not unit vectors (changed "
                                   "after its search index was built)")
    exact = vecs @ np.asarray(q, np.float32)
    top = top_rows(exact, k)
    return cand[top], exact[top], {
        "faiss": ivf_factory(index.embed_dim, index.rows), "nlist": int(ivf.nlist),
        "nprobe": int(ivf.nprobe), "candidates": int(kc), "ivf_min_rows": IVF_MIN_ROWS}


def exact_top_streaming(store: ShardStore, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows and scores for each of ``queries`` (m, D), reading
    the vectors block by block (memory: one block, whatever the index size)."""
    Q = np.asarray(queries, np.float32)
    m = len(Q)
    best_s = np.full((m, 0), -np.inf, np.float32)
    best_r = np.zeros((m, 0), np.int64)
    for a, block in store.blocks(check=False):
        s = Q @ block.T
        r = np.broadcast_to(np.arange(a, a + len(block), dtype=np.int64), s.shape)
        s = np.concatenate([best_s, s], axis=1)
        r = np.concatenate([best_r, r], axis=1)
        if s.shape[1] > k:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, r = np.take_along_axis(s, part, 1), np.take_along_axis(r, part, 1)
        best_s, best_r = s, r
    order = np.lexsort((best_r, -best_s), axis=1) if m else np.zeros((0, 0), np.int64)
    return np.take_along_axis(best_r, order, 1), np.take_along_axis(best_s, order, 1)


def describe(rows: int, dim: int) -> Dict[str, Any]:
    """What search ``auto`` uses for an index of this size (docs, --help, manifests)."""
    from .approx import APPROX_MIN_ROWS, approx_factory
    if rows < APPROX_MIN_ROWS:
        return {"method": "exact"}
    if not use_ivf(rows):
        return {"method": "approx", "faiss": approx_factory(dim)}
    nlist = ivf_lists(rows)
    return {"method": "approx", "faiss": ivf_factory(dim, rows), "nlist": nlist,
            "nprobe": ivf_probe(nlist)}


__all__: List[str] = ["IVF_MIN_ROWS", "ShardStore", "build_ivf", "describe", "exact_top_streaming",
                      "ivf_factory", "ivf_lists", "load_or_build", "ranked_rows", "use_ivf"]
