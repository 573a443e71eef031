"""Choosing reader processes: how many (:func:`resolve_workers`), which tiles each
reads (:func:`stripe_owner`, :func:`balanced_cuts`) and its GDAL block cache.

Choosing the number (``ReadOptions.workers``): ``"auto"`` uses
``min(os.cpu_count() - 1, MAX_AUTO_WORKERS)`` processes (at least one) for
jobs of at least :data:`AUTO_MIN_TILES` tiles from a local file, and the
in-process reader threads otherwise (starting processes costs about half a
second, more than a small job takes); ``0`` always uses threads; ``N`` uses
``N`` processes. The environment variable ``MAPCLIP_READ_WORKERS`` overrides
``"auto"`` (e.g. for benchmarks).

Ownership follows the raster's internal blocks (:mod:`engine.raster.workers` explains why).
"""
from __future__ import annotations

import bisect
import math
import os
from typing import List, Optional, Sequence

from ..core.errors import UsageError

#: "auto" uses threads below this many tiles (process start-up would dominate)
AUTO_MIN_TILES = 1024
#: "auto" never starts more reader processes than this
MAX_AUTO_WORKERS = 16
#: environment variable that overrides ReadOptions.workers == "auto"
WORKERS_ENV = "MAPCLIP_READ_WORKERS"
#: the fix every message about reading with threads instead of processes gives
THREADS_FIX = "--read-workers 0 reads with threads"


def threads_note(why: str) -> str:
    """The note a job's result carries when its reader processes gave way to threads."""
    return (f"reader processes could not be used ({why}); the tiles were read with threads "
            f"instead, which is slower on large rasters ({THREADS_FIX} from the start)")


def _local_file(path: str) -> bool:
    return "://" not in path and not path.startswith("/vsi") and os.path.isfile(path)


def resolve_workers(setting, n_tiles: int, path: str, cpu_count: Optional[int] = None) -> int:
    """Reader processes for a job of ``n_tiles`` tiles from ``path``; 0 = threads.

    ``setting`` is ``ReadOptions.workers`` (``"auto"``, or a whole number >= 0,
    already checked by :func:`engine.core.options.check`). See the module doc.
    """
    if setting is None or setting == "auto":
        env = os.environ.get(WORKERS_ENV, "").strip()
        if env and env != "auto":
            try:
                setting = max(0, int(env))
            except ValueError:
                raise UsageError(f"{WORKERS_ENV}={env!r} is not a number of reader processes",
                                 f"set {WORKERS_ENV} to auto, 0 (threads) or a whole number",
                                 option="read_workers") from None
    if setting is None or setting == "auto":
        cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
        if cpus < 2 or n_tiles < AUTO_MIN_TILES or not _local_file(path):
            return 0
        return max(1, min(MAX_AUTO_WORKERS, cpus - 1))
    n = int(setting)
    if n > 0 and not _local_file(path):
        raise UsageError(f"reader processes cannot open {path}: they need a file on disk",
                         f"{THREADS_FIX} (or --read-workers auto)", option="read_workers")
    return n


def stripe_owner(info, n_workers: int, spans: Sequence = ()):
    """``f(tile) -> worker`` splitting the raster into one stripe of columns per
    worker, or None when the raster's layout calls for whole batches in turn
    (see the module doc).

    ``spans`` are the (col, width) of one row of tiles. The stripes are cut
    between tile columns so that the widest stripe *decodes* as little as it
    can: a stripe decodes every block column its tiles touch, so a tile that
    straddles a block boundary makes its stripe decode that block column too;
    the cut with the smallest largest stripe is found by bisection on the
    stripe's decoded width (:func:`balanced_cuts`). Without spans the block
    columns are shared out evenly."""
    bh, bw = info.block_shape
    if n_workers < 2 or bw >= info.width:
        return None
    n_bc = math.ceil(info.width / bw)
    if n_bc < n_workers:
        return None
    spans = sorted({(int(c), int(w)) for c, w in spans})
    if len(spans) >= n_workers:
        starts = [spans[i][0] for i in balanced_cuts(spans, bw, info.width, n_workers)]
    else:
        per = math.ceil(n_bc / n_workers)
        starts = [k * per * bw for k in range(n_workers)]
    starts[0] = -1 << 62
    last = n_workers - 1
    return lambda t: min(last, bisect.bisect_right(starts, t.col) - 1)


def balanced_cuts(spans: Sequence, bw: int, width: int, n: int) -> List[int]:
    """Indices of ``spans`` (sorted (col, width) tile columns) that start each
    of at most ``n`` stripes, the largest stripe's decoded width (pixels of the
    block columns its tiles touch) as small as possible."""
    def decoded(start: int, end: int) -> int:       # block-column pixels of [start, end)
        return min(width, -(-end // bw) * bw) - start

    def greedy(limit: int) -> Optional[List[int]]:
        """Stripes as wide as ``limit`` allows, from the left; None when they need more
        than ``n`` or one tile column alone is wider."""
        cuts, start, end = [0], None, 0
        for j, (c, w) in enumerate(spans):
            if start is not None and decoded(start, max(end, c + w)) <= limit:
                end = max(end, c + w)
                continue
            if start is not None:                      # spans[j] starts the next stripe
                cuts.append(j)
                if len(cuts) > n:
                    return None
            start, end = c // bw * bw, c + w
            if decoded(start, end) > limit:
                return None
        return cuts

    lo, hi = 1, width + 2 * bw
    while lo < hi:
        mid = (lo + hi) // 2
        if greedy(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    cuts = greedy(lo) or [0]
    # fewer stripes than workers: split the widest further (never wider than before)
    while len(cuts) < n:
        bounds = cuts + [len(spans)]
        k = max(range(len(cuts)), key=lambda q: (bounds[q + 1] - bounds[q], -q))
        if bounds[k + 1] - bounds[k] < 2:
            break
        cuts.insert(k + 1, (bounds[k] + bounds[k + 1]) // 2)
    return cuts


def worker_cache_bytes(info, n_workers: int, striped: bool, itemsize: int = 1) -> int:
    """GDAL block cache for one worker: three block rows of the width it reads
    (a tile row spans at most two), between 32 MB and GDAL_CACHE_MB, so that
    many workers together do not hold many full-width caches."""
    from .reader import GDAL_CACHE_MB
    bh, bw = info.block_shape
    width = math.ceil(info.width / n_workers) + bw if striped else info.width
    need = 3 * min(bh, info.height) * width * info.count * max(1, itemsize)
    return int(min(GDAL_CACHE_MB << 20, max(32 << 20, need)))
