"""The rows of an index read from its shard files without loading them all:
:class:`ShardStore` (any rows on demand, or every row block by block, from the
memory-mapped shards or the arrays of an in-memory index), the exact top-k
streamed over them, and the ranking rule every search shares (:func:`top_rows`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .format import TILE_DTYPE, check_vectors, load_shard

#: rows read from the shards at a time when streaming them
BLOCK_ROWS = 1 << 16


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best ``scores``, best first, ties by position."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


class ShardStore:
    """Rows of an index read from its memory-mapped shards (or from the arrays
    of an in-memory index): any rows on demand, or all of them block by block.

    ``path``: the index folder (None for an in-memory index, whose
    ``(embeddings, tiles)`` are ``memory``); ``shards``: the manifest's shard
    entries, in row order; ``dim``: the embedding size.
    """

    def __init__(self, path: Optional[Path], shards: Sequence[Dict[str, Any]], dim: int,
                 memory: Optional[Tuple[np.ndarray, np.ndarray]] = None):
        self.path = path
        self.shards = list(shards)
        self.dim = int(dim)
        self.memory = memory
        sizes = np.array([int(s["rows"]) for s in self.shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.rows = int(self.starts[-1])
        self._maps: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def _shard(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        if self.memory is not None:   # an in-memory index (benchmarks, tests)
            return self.memory
        got = self._maps.get(i)
        if got is None:
            got = self._maps[i] = load_shard(self.path, self.shards[i], self.dim,
                                             map_tiles=True, vectors=False)
        return got

    def _gather(self, rows, which: int, dtype) -> np.ndarray:
        rows = np.asarray(rows, np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError("row out of range")
        if self.memory is not None:
            return np.asarray(self._shard(0)[which][rows], dtype)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(rows, kind="stable")
        first = self._shard(0)[which] if len(self.shards) else None
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
        return self._gather(rows, 1, TILE_DTYPE)

    def all_tiles(self) -> np.ndarray:
        """Every row's tile record, in row order (read without the vectors)."""
        if self.memory is not None:
            return self.memory[1]
        return (np.concatenate([np.asarray(self._shard(i)[1]) for i in range(len(self.shards))])
                if self.shards else np.zeros(0, TILE_DTYPE))

    def blocks(self, step: int = BLOCK_ROWS, check: bool = True) -> Iterator[Tuple[int, np.ndarray]]:
        """(first row, float32 block) over every row in order; ``check``: refuse
        rows that are not finite unit vectors, like loading the index does."""
        if self.memory is not None:
            emb = self.memory[0]
            for a in range(0, len(emb), step):
                yield a, np.asarray(emb[a:a + step], np.float32)
            return
        for i, s in enumerate(self.shards):
            emb = self._shard(i)[0]
            for a in range(0, len(emb), step):
                block = np.asarray(emb[a:a + step], np.float32)
                if check:
                    check_vectors(self.path, s["emb"], block)
                yield int(self.starts[i]) + a, block


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


__all__: List[str] = ["BLOCK_ROWS", "ShardStore", "exact_top_streaming", "top_rows"]
