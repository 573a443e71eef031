"""Search at scale: an inverted-file index over product-quantised codes (faiss
IVF-PQ) that never holds the index's vectors in memory.

Which search an index gets is decided by its size alone (``--method auto``):

============================  =================================================
rows                          search
============================  =================================================
below ``APPROX_MIN_ROWS``     exact: one matrix product (engine.archive.store.Index)
(100 000)
up to ``IVF_MIN_ROWS``        flat PQ fast-scan over every code + exact re-rank
(1 000 000)                   (engine.archive.approx)
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
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .approx import APPROX_MIN_ROWS, approx_factory, serves
from .format import NORM_TOLERANCE, damaged
from .shards import ShardStore, exact_top_streaming, top_rows

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
    return f"IVF{ivf_lists(rows)},{approx_factory(dim)}"


def use_ivf(rows: int) -> bool:
    return rows >= IVF_MIN_ROWS


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
    fi = index.ivf()
    ivf = faiss.extract_index_ivf(fi)
    kc = ivf_candidates(k, index.rows)
    _, cand = fi.search(np.asarray(q, np.float32)[None], kc)
    cand = cand[0]
    cand = cand[cand >= 0]
    vecs = index.vectors(cand)
    norms = np.linalg.norm(vecs, axis=1)
    if not np.all(np.abs(norms - 1.0) <= NORM_TOLERANCE):   # NaN fails too
        raise damaged(index.path, "a shard holds rows that are not unit vectors (changed "
                                   "after its search index was built)")
    exact = vecs @ np.asarray(q, np.float32)
    top = top_rows(exact, k)
    return cand[top], exact[top], {
        "faiss": ivf_factory(index.embed_dim, index.rows), "nlist": int(ivf.nlist),
        "nprobe": int(ivf.nprobe), "candidates": int(kc), "ivf_min_rows": IVF_MIN_ROWS}


def describe(rows: int, dim: int) -> Dict[str, Any]:
    """What search ``auto`` uses for an index of this size (docs, --help, manifests)."""
    if rows < APPROX_MIN_ROWS:
        return {"method": "exact"}
    if not use_ivf(rows):
        return {"method": "approx", "faiss": approx_factory(dim)}
    nlist = ivf_lists(rows)
    return {"method": "approx", "faiss": ivf_factory(dim, rows), "nlist": nlist,
            "nprobe": ivf_probe(nlist)}


__all__: List[str] = ["IVF_MIN_ROWS", "ShardStore", "build_ivf", "describe", "exact_top_streaming",
                      "ivf_factory", "ivf_lists", "load_or_build", "ranked_rows", "use_ivf"]
