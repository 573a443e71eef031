"""Approximate search for large indexes: a faiss product-quantisation index with
4-bit fast-scan codes (``PQ{D/2}x4fs``) proposes candidates and the stored
float16 vectors re-rank them exactly (:func:`approx_candidates`). It is used
above :data:`APPROX_MIN_ROWS` rows, cached beside the index, named after the
content it indexes, and rebuilt when the index changes.

``index`` below is an :class:`engine.archive.store.Index` (its ``path``, ``rows``,
``embed_dim``, ``content_id``, ``vectors`` and ``embeddings``); this module
imports nothing of the archive.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


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



def approx_path(index) -> Path:
    return index.path / f"approx-{index.content_id}.faiss"


def load_or_build_approx(index):
    """Read the cached faiss index for the index's content, or build and cache it.

    Stale caches (other content) are removed; a cache that does not find the
    index's own rows (:func:`serves`) is rebuilt. A read-only index folder still
    works: the faiss index is then built in memory for this session only.
    """
    import faiss
    if index.path is None:
        return build_approx(index.embeddings())
    path = approx_path(index)
    if path.is_file():
        try:
            fi = faiss.read_index(str(path))
            if fi.ntotal == index.rows and fi.d == index.embed_dim and \
                    serves(index, fi, approx_candidates(1, index.rows)):
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
