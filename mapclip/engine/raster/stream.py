"""Tiles streamed in batches: the one entry (:func:`iter_tile_batches`) that chooses
reader threads (:mod:`engine.raster.batches`) or reader processes
(:mod:`engine.raster.workers`) for a job, as ``ReadOptions.workers`` says
(:func:`engine.raster.process_plan.resolve_workers`)."""
from __future__ import annotations

from typing import Optional, Sequence

from ..core.jobs import Job
from ..core.options import MIN_VALID
from ..geo.tiling import Tile
from .batches import BatchIterator, TileBatches
from .process_plan import resolve_workers
from .reader import RasterReader
from .workers import ProcessTileBatches


def iter_tile_batches(reader: RasterReader, tiles: Sequence[Tile], batch_size: int,
                      job: Optional[Job] = None, prefetch: int = 2, workers: int = 2,
                      min_valid: float = MIN_VALID, skip_empty: bool = True) -> BatchIterator:
    """Stream ``tiles`` as ``(tiles, uint8 (B, S, S, 3))`` batches, read ahead in threads.

    ``S`` is the tiles' ``out_px`` (all tiles must share it); tiles are read
    at their native window and resampled to ``S`` when it differs. Batches
    keep the order of ``tiles``; ``B <= batch_size`` because tiles whose
    valid fraction is below ``min_valid`` or (``skip_empty``) whose image is
    one constant colour are skipped, not yielded (a batch left empty is not
    yielded at all). ``reader.options.workers`` may select reader processes
    instead of threads (:class:`engine.raster.workers.ProcessTileBatches`, same batches and bytes;
    where they cannot start, threads read instead and the iterator's ``notes``
    and ``reader.warnings`` say so).
    Otherwise ``workers`` threads, each with its own dataset handle,
    read whole batches; at most ``max(prefetch, workers)`` batches are read
    ahead, which bounds memory to about that many batches plus the one the
    consumer holds. The returned iterator (a :class:`TileBatches` or its twin) counts ``skipped``,
    ``yielded`` and ``done``; it raises :class:`Cancelled` once ``job`` is
    cancelled and :class:`RasterReadError` when a reader thread fails.
    Progress is left to the consumer (``job.step`` per scored batch).
    """
    if not hasattr(tiles, "__len__"):
        tiles = list(tiles)
    procs = resolve_workers(getattr(reader.options, "workers", "auto"), len(tiles), reader.path)
    if procs > 0:  # ReadOptions.workers: reader processes (engine.raster.workers)
        return ProcessTileBatches(reader, tiles, batch_size, procs, job=job, prefetch=prefetch,
                                  min_valid=min_valid, skip_empty=skip_empty, threads=workers)
    return TileBatches(reader, tiles, batch_size, job=job, prefetch=prefetch, workers=workers,
                       min_valid=min_valid, skip_empty=skip_empty)
