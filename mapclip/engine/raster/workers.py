"""Reader processes: tiles read, decoded and cut in worker processes, handed
back through shared memory.

Why processes: GDAL releases the GIL while it decodes, but cutting tiles out
of the decoded window and interleaving bands is Python and numpy work that
holds it, so more reader *threads* made the reader slower (issue 16: 5,240
tiles/s with one thread, 3,312 with two). Each reader process has its own
interpreter, its own dataset handle and its own GDAL block cache.

How it works (:class:`ProcessTileBatches`, made by
:func:`engine.raster.stream.iter_tile_batches` when ``ReadOptions.workers`` selects
processes):

* ``workers`` processes are started from a ``forkserver`` context (``spawn``
  where there is none), with the reader's band choice, stretch and validity
  rules handed over once (a few kB); each opens the raster itself.
* The consumer cuts the tile list into batches, exactly as the thread reader
  does, and sends each worker the positions and windows of the batch's tiles
  it owns (a small integer array; pixel data is never pickled).
* Ownership follows the raster's internal blocks: on a tiled raster the
  tile columns are split into one stripe per worker, and a tile belongs to
  the worker of its stripe. The cuts are chosen so that the stripe that
  decodes the most block columns decodes as few as possible
  (:func:`engine.raster.process_plan.stripe_owner`): only the block column that a tile straddles at a
  cut is decoded by both neighbours, every other block by one process, once:
  while the tile rows that a block row holds are cut, the
  block stays in that process's GDAL block cache (the reader caps it at
  :data:`engine.raster.reader.GDAL_CACHE_MB`, well above one stripe's block row).
  Rasters in strips (one block spans the width) or with fewer block columns
  than workers hand out whole batches in turn instead.
* Workers cut every tile of a run of tiles from one read (the thread
  reader's ``RasterReader._read_group``, so the bytes are the same) straight
  into a shared-memory slot (``multiprocessing.shared_memory``): the
  consumer gets a numpy view of it, with no copy. A slot is reused once the
  consumer no longer holds its array (the thread reader's rule).
* Batches come out in order; at most ``depth`` batches are read ahead, so
  memory stays bounded whatever the raster's size.

Stopping: :meth:`ProcessTileBatches.close` (also on exhaustion, cancel and
errors) sets a stop event the workers check between reads, joins them
(terminating any that do not stop within :data:`STOP_TIMEOUT_S`) and
unlinks every shared-memory slot, so nothing outlives the iterator; the
resource tracker of :mod:`multiprocessing` unlinks what a killed parent
leaves. An error in a worker reaches the caller as the same error the thread
reader raises (:class:`engine.raster.reader.RasterReadError` for GDAL failures);
a worker that dies while reading is reported with its exit code. Processes
that cannot start never fail a job: the children run the running interpreter
as a program, found by what it is (:mod:`engine.core.interpreter`), and where
there is none, or a child dies before it opened the raster, the rest is read
with threads and the job's result says so (:func:`engine.raster.process_plan.threads_note`).

The pieces: how many processes and which tiles each reads
(:mod:`engine.raster.process_plan`), the reader process itself
(:mod:`engine.raster.process_worker`), and here the consumer side.
"""
from __future__ import annotations

import math
import os
import queue
import secrets
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Dict, List, Optional, Sequence, Set

import numpy as np

from ..core.errors import Cancelled, MapClipError, UsageError
from ..core.options import MIN_VALID
from .batches import Batch, BatchIterator, TileBatches
from .process_plan import THREADS_FIX, stripe_owner, threads_note, worker_cache_bytes
from .process_worker import main_hidden, process_context, reader_state, worker_main
from ..core.errors import reason
from ..core.interpreter import qgis_python

#: read-ahead memory (bytes of batches in flight) the reader aims to stay under
READ_AHEAD_BYTES = 512 << 20
#: seconds a worker gets to stop before it is terminated
STOP_TIMEOUT_S = 2.0
#: prefix of the reader's shared-memory names (in /dev/shm on Linux)
SHM_PREFIX = "mapclip-rd"


class _CannotStart(Exception):
    """The reader processes could not start: read with threads instead."""


#: why reader processes could not start in this process (later jobs read with threads at once)
_START_FAILED: List[str] = []


class _Slot:
    """One shared-memory batch buffer: B valid fractions then (B, S, S, 3) uint8."""

    def __init__(self, cap: int, S: int):
        self.cap, self.S = cap, S
        size = 8 * cap + cap * S * S * 3
        self.shm = shared_memory.SharedMemory(
            name=f"{SHM_PREFIX}-{os.getpid()}-{secrets.token_hex(6)}", create=True, size=size)
        self.name = self.shm.name
        self.frac = np.ndarray((cap,), np.float64, buffer=self.shm.buf)
        self.arr = np.ndarray((cap, S, S, 3), np.uint8, buffer=self.shm.buf, offset=8 * cap)

    def free(self) -> bool:
        # only this slot's attribute and getrefcount's argument refer to the array;
        # a consumer's view or tensor of it adds one
        return sys.getrefcount(self.arr) <= 2

    def destroy(self) -> None:
        """Unlink the name now; unmap once no array of the consumer uses it."""
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass
        self.frac = None
        if self.free():
            self.arr = None
            try:
                self.shm.close()
                return
            except BufferError:  # pragma: no cover - an array still exported
                pass
        # the consumer still holds a batch: keep the mapping alive through its
        # array (it owns a reference to the buffer) and only close the descriptor
        self.arr = None
        shm = self.shm
        fd = getattr(shm, "_fd", -1)
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass
            shm._fd = -1
        shm._buf = None
        shm._mmap = None


@dataclass
class _Pending:
    k: int
    tiles: list
    slot: _Slot
    waiting: Set[int] = field(default_factory=set)
    error: Optional[dict] = None
    stopped: bool = False


class ProcessTileBatches(BatchIterator):
    """:class:`engine.raster.batches.TileBatches`' twin whose tiles are read by worker
    processes (see the module doc); same iteration, counters, cancel and errors.

    Processes that cannot start (no interpreter matching this one, a start that
    fails, a worker that dies or fails before it opened the raster) never fail the
    job: the tiles not yet handed out are read by ``threads`` reader threads
    instead, and :func:`threads_note` goes to ``notes`` and ``reader.warnings``."""

    def __init__(self, reader, tiles: Sequence, batch_size: int, workers: int,
                 job=None, prefetch: int = 2, min_valid: float = MIN_VALID, skip_empty: bool = True,
                 threads: int = 2):
        super().__init__(reader, tiles, batch_size, job, min_valid, skip_empty)
        self.n_workers = max(1, int(workers))
        self._prefetch, self._threads = prefetch, threads
        #: the thread reader that took over when the processes could not start
        self._fallback = None
        self._counted = (0, 0, 0)            # skipped, yielded, done before it took over
        self._ready: Set[int] = set()
        self._next_submit = 0
        self._in_flight: deque = deque()
        self._slots: List[_Slot] = []
        self._procs: list = []
        self._task_qs: list = []
        self._results = None
        self._stop = None
        self._closed = False
        #: CPU seconds each worker had used at its last finished task (benchmarks)
        self.worker_cpu_s: Dict[int, float] = {}
        row = self._first_row()
        self._owner = stripe_owner(reader.info, self.n_workers, [(t.col, t.width) for t in row])
        self._depth = self._read_ahead(prefetch, len(row))
        if self._n_batches:
            try:
                self._start()
                self._fill()
            except _CannotStart as exc:
                self._use_threads(str(exc))
            except BaseException:
                self.close()
                raise

    # -- setup --
    def _first_row(self) -> list:
        """The tiles of the first row (at most 100,000 of them)."""
        n = min(self.total, 100_000)
        if not n:
            return []
        r0 = self._tiles[0].row
        k = 1
        while k < n and self._tiles[k].row == r0:
            k += 1
        return [self._tiles[i] for i in range(k)]

    def _read_ahead(self, prefetch: int, row_len: int) -> int:
        """Batches in flight: enough for every worker to have work while the
        consumer drains a row of tiles in order, within READ_AHEAD_BYTES."""
        if not self.total:
            return 1
        want = max(int(prefetch), 2 * self.n_workers)
        if self._owner is not None:
            # stripes: a batch may hold one stripe's tiles only; keep two rows in flight
            want = max(want, math.ceil(2 * row_len / self._batch_size) + 1)
        S = self._out_px
        batch_bytes = self._batch_size * (S * S * 3 + 8)
        return max(2, min(want, READ_AHEAD_BYTES // max(1, batch_bytes)))

    def _start(self) -> None:
        if _START_FAILED:
            raise _CannotStart(_START_FAILED[0])
        python = qgis_python()
        if python.path is None:
            raise _CannotStart(python.why_none())
        try:
            self._spawn(process_context(python.path))
        except Exception as exc:  # noqa: BLE001 - any failure to start: threads instead
            raise _CannotStart(f"starting them with {python.path} failed: {reason(exc)}") from exc

    def _spawn(self, ctx) -> None:
        self._stop = ctx.Event()
        self._results = ctx.Queue()
        state = reader_state(self.reader)
        state["gdal_cache_bytes"] = worker_cache_bytes(
            self.reader.info, self.n_workers, self._owner is not None, self.reader.dtype.itemsize)
        for w in range(self.n_workers):
            q = ctx.Queue()
            p = ctx.Process(target=worker_main, args=(w, state, q, self._results, self._stop),
                            name=f"mapclip-reader-{w}", daemon=True)
            with main_hidden():
                p.start()
            self._task_qs.append(q)
            self._procs.append(p)

    # -- consumer side --
    def _slot(self, S: int) -> _Slot:
        busy = {id(p.slot) for p in self._in_flight}
        for s in self._slots:
            if id(s) not in busy and s.S == S and s.free():
                return s
        s = _Slot(self._batch_size, S)
        self._slots.append(s)
        return s

    def _fill(self) -> None:
        while (not self._closed and len(self._in_flight) < self._depth
               and self._next_submit < self._n_batches):
            k = self._next_submit
            tiles = self._batch(k)
            S = tiles[0].out_px
            slot = self._slot(S)
            rows = np.array([(p, t.index, t.col, t.row, t.width, t.height)
                             for p, t in enumerate(tiles)], np.int64)
            if self._owner is None:
                parts = {k % self.n_workers: rows}
            else:
                own = np.array([self._owner(t) for t in tiles])
                parts = {int(w): rows[own == w] for w in np.unique(own)}
            pend = _Pending(k, tiles, slot, set(parts))
            self._in_flight.append(pend)
            for w, part in parts.items():
                self._task_qs[w].put((k, slot.name, slot.cap, len(tiles), S, part))
            self._next_submit += 1

    def _collect(self, timeout: float) -> None:
        """Take one result from the workers (or check their health on timeout)."""
        try:
            k, w, status, info = self._results.get(timeout=timeout)
        except queue.Empty:
            waiting = {w for p in self._in_flight for w in p.waiting}
            for w in waiting:
                p = self._procs[w]
                if p.exitcode is not None and w not in self._ready:
                    raise _CannotStart(f"a reader process exited with code {p.exitcode} "
                                       f"before it opened the raster")
                if p.exitcode is not None:
                    err = _died(self.reader.path, p)
                    self.close()
                    raise err
            return
        if k < 0 and status == "ready":
            self._ready.add(w)
            return
        if k < 0:  # a worker failed to set up
            if info["kind"] == "other":           # not the raster's fault: threads instead
                raise _CannotStart(f"a reader process could not start: {info['type']}: "
                                   f"{info['message']}")
            self.close()
            raise self._error(None, info)
        if status == "ok":
            self.worker_cpu_s[w] = info   # CPU seconds the worker has used so far
        for pend in self._in_flight:
            if pend.k == k:
                pend.waiting.discard(w)
                if status == "error" and pend.error is None:
                    pend.error = info
                if status == "stopped":
                    pend.stopped = True
                break

    def _error(self, tiles, info: dict) -> MapClipError:
        from .reader import RasterReadError, ReaderThreadError
        path = self.reader.path
        where = ""
        if tiles:
            where = f" near pixel window col={tiles[0].col} row={tiles[0].row}"
        cause = _WorkerTraceback(info["traceback"])
        if info["kind"] == "mapclip":
            cls = UsageError if info["usage"] else MapClipError
            err = cls(info["message"], info["fix"], option=info["option"])
        elif info["kind"] == "rasterio":
            err = RasterReadError(
                f"reading {path} failed{where}: {info['gdal']}",
                "check that the file is complete and readable (gdalinfo -checksum FILE)")
        else:
            err = ReaderThreadError(
                f"a raster reader process failed on {path}{where}: {info['type']}: "
                f"{info['message']}",
                "this is a bug or an I/O problem; the reader's traceback follows the error "
                f"({THREADS_FIX} instead)", option="read_workers")
        err.__cause__ = cause
        return err

    def __next__(self):
        if self._fallback is None:
            try:
                return self._next_from_processes()
            except _CannotStart as exc:
                self._use_threads(str(exc))
        try:
            return next(self._fallback)
        finally:
            fb, (skipped, yielded, done) = self._fallback, self._counted
            self.skipped, self.yielded, self.done = (skipped + fb.skipped, yielded + fb.yielded,
                                                     done + fb.done)

    def _use_threads(self, why: str) -> None:
        """Stop the processes; threads read the batches not yet handed out."""
        first = self._in_flight[0].k if self._in_flight else self._next_submit
        self._stop_processes()
        start = first * self._batch_size
        rest = self._tiles[start:] if start else self._tiles
        self._counted = (self.skipped, self.yielded, self.done)
        self._fallback = TileBatches(self.reader, rest, self._batch_size, job=self.job,
                                     prefetch=self._prefetch, workers=self._threads,
                                     min_valid=self.min_valid, skip_empty=self.skip_empty)
        if why not in _START_FAILED:
            _START_FAILED[:] = [why]
        note = threads_note(why)
        for notes in (self.notes, self.reader.warnings):
            if note not in notes:
                notes.append(note)

    def _next_from_processes(self):
        while True:
            self._next_check()
            head = self._in_flight[0]
            while head.waiting and head.error is None:
                self._stop_if_cancelled()
                self._collect(0.05)
            if head.error is not None:
                err = self._error(head.tiles, head.error)
                self.close()
                raise err
            if head.stopped:
                self.close()
                raise Cancelled()
            self._in_flight.popleft()
            n = len(head.tiles)
            batch = Batch(head.tiles, head.slot.arr[:n], head.slot.frac[:n])
            self._fill()
            out = self._kept(batch)
            if out is not None:
                return out

    # -- closing --
    def close(self) -> None:
        """Stop the workers (terminating stragglers), unlink every slot."""
        if self._closed:
            return
        self._closed = True
        self._stop_processes()
        if self._fallback is not None:
            self._fallback.close()

    def _stop_processes(self) -> None:
        if self._stop is not None:
            self._stop.set()
        for q in self._task_qs:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001 - a closed queue
                pass
        deadline = STOP_TIMEOUT_S
        t0 = time.monotonic()
        for p in self._procs:
            p.join(max(0.0, deadline - (time.monotonic() - t0)))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(1.0)
            if p.is_alive():  # pragma: no cover - ignores SIGTERM
                p.kill()
                p.join(1.0)
        for q in self._task_qs + ([self._results] if self._results is not None else []):
            try:
                q.cancel_join_thread()
                q.close()
            except Exception:  # noqa: BLE001
                pass
        for p in self._procs:
            try:
                p.close()
            except Exception:  # noqa: BLE001 - still running (cannot happen after kill)
                pass
        self._procs = []
        self._task_qs = []
        self._results = None
        self._in_flight.clear()
        slots, self._slots = self._slots, []
        for s in slots:
            s.destroy()

    @property
    def pids(self) -> List[int]:
        """Process ids of the running workers (for tests)."""
        return [p.pid for p in self._procs]

    @property
    def slot_names(self) -> List[str]:
        return [s.name for s in self._slots]


class _WorkerTraceback(Exception):
    """The traceback of a failure in a reader process (chained as the cause)."""

    def __str__(self) -> str:
        return "in the reader process:\n" + (self.args[0] if self.args else "")


def _died(path: str, proc) -> MapClipError:
    from .reader import ReaderThreadError
    return ReaderThreadError(
        f"a raster reader process (pid {proc.pid}) stopped unexpectedly with exit code "
        f"{proc.exitcode} while reading {path}",
        "the system may have run out of memory or GDAL crashed on this file; check it with "
        f"gdalinfo -checksum FILE, or {THREADS_FIX}", option="read_workers")
