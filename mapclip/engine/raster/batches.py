"""Tiles read ahead in batches: groups of neighbouring tiles read in one call by
reader threads (each with its own dataset handle), cut into the model's tile
size, empty tiles flagged, handed out in order; cancel and errors reach the
caller within one batch.
"""
from __future__ import annotations

import sys
import threading
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple
import numpy as np
from rasterio.errors import RasterioError
from ..core.errors import Cancelled, MapClipError
from ..core.faults import fault_point
from ..core.jobs import Job
from ..core.options import MIN_VALID
from ..geo.tiling import Tile
from .memory import trim_heap
from .reader import Scratch, RasterReadError, RasterReader, ReaderThreadError, gdal_message, open_dataset


#: 8-bit values that, filling a whole tile in every band, mean "no data here"
EMPTY_FILL_VALUES = (0, 255)


def group_end(tiles: Sequence[Tile], i: int, max_width: int = 16384) -> int:
    """End (exclusive) of the run of tiles from ``i`` that can share one read.

    Tiles share a read when they lie on the same row with the same size and
    each starts no further than one tile width after the previous one; for
    resampled tiles their offsets must also land on whole output pixels.
    """
    t0 = tiles[i]
    j = i + 1
    prev = t0
    while j < len(tiles):
        t = tiles[j]
        if (t.row != t0.row or t.height != t0.height or t.width != t0.width
                or t.out_px != t0.out_px or t.col <= prev.col or t.col - prev.col > t0.width
                or t.col + t.width - t0.col > max_width):
            break
        if t0.resampled and ((t.col - t0.col) * t0.out_px) % t0.width:
            break
        prev = t
        j += 1
    return j


# ---------------------------------------------------------------- batches --
@dataclass
class Batch:
    tiles: List[Tile]
    array: np.ndarray
    valid: np.ndarray


class BatchIterator:
    """What both tile-batch iterators (threads here, processes in raster.workers) share:
    the tiles, the batch cut, the validity rules, the counters, stopping on cancel or at the
    end, and closing on exit."""

    def __init__(self, reader, tiles: Sequence[Tile], batch_size: int, job: Optional[Job],
                 min_valid: float, skip_empty: bool):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not (hasattr(tiles, "__getitem__") and hasattr(tiles, "__len__")):
            tiles = list(tiles)
        # a grid's tiles are made on demand: nothing here grows with the tile count
        self._tiles = tiles
        self._batch_size = int(batch_size)
        self._out_px = tiles[0].out_px if len(tiles) else None
        self.reader = reader
        self.job = job
        self.min_valid = float(min_valid)
        self.skip_empty = skip_empty
        self.total = len(tiles)
        self.skipped = 0
        self.yielded = 0
        self.done = 0
        #: notes for the job's result (reader processes that gave way to threads)
        self.notes: List[str] = []
        self._n_batches = (len(tiles) + self._batch_size - 1) // self._batch_size

    def close(self) -> None:
        raise NotImplementedError

    # -- shared by both iterators --
    def _batch(self, k: int) -> List[Tile]:
        """Batch ``k``, made and checked when it is submitted."""
        bs = self._batch_size
        tiles = list(self._tiles[k * bs:(k + 1) * bs])
        for t in tiles:
            if t.out_px != self._out_px:
                raise ValueError(f"tiles have different out_px ({self._out_px}, {t.out_px}); "
                                 "batch them separately")
            self.reader._check_window(t.window())
        return tiles

    def _cancelled(self) -> bool:
        return self.job is not None and self.job.cancelled

    def _stop_if_cancelled(self) -> None:
        if self._cancelled():
            self.close()
            raise Cancelled()

    def _next_check(self) -> None:
        """The start of each ``__next__``: keep the heap trimmed (memory flat in raster
        size, raster.memory.trim_heap), stop when cancelled or when nothing is left."""
        trim_heap()
        self._stop_if_cancelled()
        if not self._in_flight:
            self.close()
            raise StopIteration

    def _keep(self, batch: Batch) -> np.ndarray:
        keep = batch.valid >= self.min_valid
        if self.skip_empty:
            flat = batch.array.reshape(len(batch.tiles), -1)
            # cheap test on a strided sample first, full test only for candidates
            sample = flat[:, ::97]
            cand = np.flatnonzero(keep & (sample == sample[:, :1]).all(axis=1))
            for i in cand:
                row = flat[i]
                if row[0] in EMPTY_FILL_VALUES and (row == row[0]).all():
                    keep[i] = False
        return keep

    def _kept(self, batch: Batch) -> Optional[Tuple[List[Tile], np.ndarray]]:
        """Count ``batch`` and drop its tiles below ``min_valid`` or empty: what to yield,
        or None when no tile is left."""
        fault_point("read.batch")
        keep = self._keep(batch)
        n, n_keep = len(batch.tiles), int(keep.sum())
        self.skipped += n - n_keep
        self.done += n
        if n_keep == 0:
            return None
        self.yielded += n_keep
        if n_keep == n:
            return batch.tiles, batch.array
        idx = np.flatnonzero(keep)
        return [batch.tiles[i] for i in idx], batch.array[idx]

    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class TileBatches(BatchIterator):
    """Iterator of ``(tiles, uint8 array (B, S, S, 3))``, read ahead by threads.

    Made by :func:`iter_tile_batches`. Attributes, updated as it goes:
    ``skipped`` (tiles skipped as nodata/empty so far), ``yielded`` (tiles
    yielded), ``done`` (tiles consumed: yielded + skipped; use it for
    progress), ``total`` (tiles asked for). Stops (and closes its threads and
    dataset handles) when exhausted, on :meth:`close`, on error, and when the
    job's cancel flag is set (raising :class:`Cancelled` before the next
    batch is yielded; a wait for a batch is interrupted within 50 ms).
    """

    def __init__(self, reader: RasterReader, tiles: Sequence[Tile], batch_size: int,
                 job: Optional[Job] = None, prefetch: int = 2, workers: int = 2,
                 min_valid: float = MIN_VALID, skip_empty: bool = True):
        super().__init__(reader, tiles, batch_size, job, min_valid, skip_empty)
        self._next_submit = 0
        self._in_flight: deque = deque()
        self._stop = threading.Event()
        self._local = threading.local()
        self._handles: list = []
        self._hlock = threading.Lock()
        self._pool_bufs: List[np.ndarray] = []
        self._depth = max(1, int(prefetch), int(workers))
        self._pool: Optional[ThreadPoolExecutor] = None
        if self._n_batches:
            self._pool = ThreadPoolExecutor(max_workers=max(1, int(workers)),
                                            thread_name_prefix="mapclip-read")
            self._fill()

    # worker side
    def _worker_state(self):
        st = getattr(self._local, "state", None)
        if st is None:
            ds = open_dataset(self.reader.path)
            st = (ds, Scratch())
            self._local.state = st
            with self._hlock:
                self._handles.append(ds)
        return st

    def _buffer(self, n: int, S: int) -> np.ndarray:
        """A (n, S, S, 3) batch array, reusing one the consumer no longer holds."""
        with self._hlock:
            for k, buf in enumerate(self._pool_bufs):
                # free when only the pool list, this loop and getrefcount's
                # argument refer to it (a consumer's array, view or tensor adds one)
                if buf.shape[0] == n and buf.shape[1] == S and sys.getrefcount(buf) <= 3:
                    del self._pool_bufs[k]
                    return buf
        return np.empty((n, S, S, 3), np.uint8)

    def _release(self, buf: np.ndarray) -> None:
        with self._hlock:
            if len(self._pool_bufs) < self._depth + 2:
                self._pool_bufs.append(buf)

    def _work(self, tiles: List[Tile]) -> Optional[Batch]:
        if self._stop.is_set():
            return None
        S = tiles[0].out_px
        out = self._buffer(len(tiles), S)
        frac = np.empty(len(tiles), np.float64)
        ds, scratch = self._worker_state()
        r = self.reader
        i = 0
        while i < len(tiles):
            if self._stop.is_set():
                return None
            j = group_end(tiles, i)
            r._read_group(ds, tiles, i, j, out, frac, scratch)
            i = j
        return Batch(tiles, out, frac)

    # consumer side
    def _fill(self) -> None:
        while (not self._stop.is_set() and len(self._in_flight) < self._depth
               and self._next_submit < self._n_batches):
            tiles = self._batch(self._next_submit)
            self._in_flight.append((tiles, self._pool.submit(self._work, tiles)))
            self._next_submit += 1

    def _wait(self, fut: Future):
        while True:
            self._stop_if_cancelled()
            try:
                return fut.result(timeout=0.05)
            except FutureTimeout:
                continue

    def __next__(self) -> Tuple[List[Tile], np.ndarray]:
        while True:
            self._next_check()
            tiles, fut = self._in_flight.popleft()
            try:
                batch = self._wait(fut)
            except (Cancelled, CancelledError):
                self.close()
                raise Cancelled() from None
            except MapClipError:
                self.close()
                raise
            except RasterioError as exc:
                self.close()
                w = tiles[0].window()
                raise RasterReadError(
                    f"reading {self.reader.path} failed near pixel window "
                    f"col={w.col} row={w.row}: {gdal_message(exc)}",
                    "check that the file is complete and readable (gdalinfo -checksum FILE)"
                ) from exc
            except Exception as exc:
                self.close()
                w = tiles[0].window()
                raise ReaderThreadError(
                    f"the raster reader thread failed on {self.reader.path} near pixel window "
                    f"col={w.col} row={w.row}: {type(exc).__name__}: {exc}",
                    "this is a bug or an I/O problem; the traceback above the error has details"
                ) from exc
            self._fill()
            if batch is None:  # stopped meanwhile
                self.close()
                raise Cancelled()
            out = self._kept(batch)
            self._release(batch.array)   # reused once the consumer no longer holds it
            if out is not None:
                return out

    def close(self) -> None:
        """Stop the reader threads, drop read-ahead batches, close their handles."""
        self._stop.set()
        for _, fut in self._in_flight:
            fut.cancel()
        self._in_flight.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        with self._hlock:
            handles, self._handles = self._handles, []
        for ds in handles:
            try:
                ds.close()
            except Exception:  # pragma: no cover
                pass
