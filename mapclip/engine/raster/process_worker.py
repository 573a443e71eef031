"""The reader process: how it is started, and its loop.

A worker gets the reader's band choice, stretch and validity rules once
(:func:`reader_state`), opens the raster itself, then for each task reads the
tiles it owns into the batch's shared-memory slot, one GDAL read per run of
tiles (the thread reader's ``RasterReader._read_group``, so the bytes are the
same), and reports ``ok``, ``stopped`` or the error described as plain data
(:func:`describe_error`; the consumer raises it in the thread reader's words).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from multiprocessing import shared_memory
from typing import Dict

import numpy as np

from ..core.errors import MapClipError, UsageError
from ..core.faults import fault_point
from .batches import group_end
from ..geo.tiling import Tile


def process_context(python: str):
    """A multiprocessing context whose children run ``python`` (the running interpreter as
    a program, engine.core.interpreter: never a Python that comes first on PATH)."""
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    ctx.set_executable(python)
    if ctx.get_start_method() == "forkserver":
        # the server imports the reader (and GDAL) once; each worker is a fork of it
        ctx.set_forkserver_preload([__name__, __name__.rsplit(".", 1)[0] + ".reader",
                                   __name__.rsplit(".", 1)[0] + ".batches"])
    return ctx


_MAIN_LOCK = threading.Lock()


class main_hidden:
    """Start a worker without it re-running the caller's ``__main__`` script.

    Spawned and forkserver children import the parent's main module by path
    to unpickle objects defined there; the reader needs nothing from it
    (its worker is :func:`worker_main`), and a script without the
    ``if __name__ == "__main__"`` guard would run itself again in every
    worker. So the main module's ``__file__`` and ``__spec__`` are hidden
    while a worker starts.
    """

    def __enter__(self):
        _MAIN_LOCK.acquire()
        self.main = sys.modules.get("__main__")
        self.saved = {}
        if self.main is not None:
            for attr in ("__file__", "__spec__"):
                if attr in vars(self.main):
                    self.saved[attr] = vars(self.main)[attr]
            self.main.__spec__ = None
            vars(self.main).pop("__file__", None)
        return self

    def __exit__(self, *exc):
        try:
            if self.main is not None:
                vars(self.main).pop("__spec__", None)
                for attr, val in self.saved.items():
                    setattr(self.main, attr, val)
        finally:
            _MAIN_LOCK.release()


def reader_state(reader) -> dict:
    """What a worker needs of a RasterReader to read exactly as it does."""
    keep = ("path", "options", "info", "bands", "unique_bands", "band_slot", "dtype",
            "mask_mode", "nodata", "palette", "stretch", "_lut")
    return {k: getattr(reader, k) for k in keep}


def _worker_reader(state: dict):
    from . import reader as R
    r = R.RasterReader.__new__(R.RasterReader)
    r.__dict__.update(state)
    r._lock = threading.Lock()
    r._local = threading.local()
    r._handles = []
    r._closed = False
    r.warnings = []
    return r


def _attach(name: str) -> shared_memory.SharedMemory:
    return shared_memory.SharedMemory(name=name, create=False)


def worker_main(wid: int, state: dict, tasks, results, stop) -> None:
    """Reader process: read the tiles of each task into its shared-memory slot.

    Ctrl-C in a terminal reaches every process of its group: a reader ignores it
    (and SIGTERM's default stays), the command that started it stops it
    (:meth:`ProcessTileBatches.close`), so no reader prints a traceback."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from . import reader as R
    try:
        cache = state.pop("gdal_cache_bytes", None)
        if cache and "GDAL_CACHEMAX" not in os.environ:
            from rasterio.env import set_gdal_config
            set_gdal_config("GDAL_CACHEMAX", int(cache))
        R._limit_gdal_cache()
        reader = _worker_reader(state)
        ds = R.open_dataset(reader.path)
        scratch = R.Scratch()
    except BaseException as exc:  # noqa: BLE001 - reported to the consumer
        results.put((-1, wid, "error", describe_error(exc)))
        return
    results.put((-1, wid, "ready", None))
    slots: Dict[str, shared_memory.SharedMemory] = {}
    try:
        while True:
            msg = tasks.get()
            if msg is None:
                break
            k, name, cap, n, S, rows = msg
            if stop.is_set():
                continue
            try:
                shm = slots.get(name)
                if shm is None:
                    shm = slots[name] = _attach(name)
                frac = np.ndarray((n,), np.float64, buffer=shm.buf)
                out = np.ndarray((n, S, S, 3), np.uint8, buffer=shm.buf, offset=8 * cap)
                _read_rows(reader, ds, scratch, rows, S, out, frac, stop, Tile)
                fault_point("reader.task")
                del frac, out
                results.put((k, wid, "stopped" if stop.is_set() else "ok", time.process_time()))
            except BaseException as exc:  # noqa: BLE001 - reported to the consumer
                results.put((k, wid, "error", describe_error(exc)))
    finally:
        for shm in slots.values():
            try:
                shm.close()
            except Exception:  # noqa: BLE001
                pass
        try:
            ds.close()
        except Exception:  # noqa: BLE001
            pass


def _read_rows(reader, ds, scratch, rows: np.ndarray, S: int, out: np.ndarray,
               frac: np.ndarray, stop, Tile) -> None:
    """Read the tiles ``rows`` (position, index, col, row, width, height) into
    ``out``/``frac`` at their positions, one GDAL read per run of tiles."""
    pos = rows[:, 0]
    # runs of consecutive batch positions; each run is cut like the thread reader cuts a batch
    breaks = np.flatnonzero(np.diff(pos) != 1) + 1
    for seg in np.split(np.arange(len(rows)), breaks):
        if not len(seg):
            continue
        p0 = int(pos[seg[0]])
        tiles = [Tile(int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]), S) for r in rows[seg]]
        o, f = out[p0:p0 + len(tiles)], frac[p0:p0 + len(tiles)]
        i = 0
        while i < len(tiles):
            if stop.is_set():
                return
            j = group_end(tiles, i)
            reader._read_group(ds, tiles, i, j, o, f, scratch)
            i = j


def describe_error(exc: BaseException) -> dict:
    from rasterio.errors import RasterioError

    from .reader import gdal_message
    kind = ("mapclip" if isinstance(exc, MapClipError) else
            "rasterio" if isinstance(exc, RasterioError) else "other")
    return {"kind": kind, "type": type(exc).__name__,
            "usage": isinstance(exc, UsageError),
            "message": getattr(exc, "message", None) or str(exc),
            "fix": getattr(exc, "fix", "") or "",
            "option": getattr(exc, "option", None),
            "gdal": gdal_message(exc) if kind == "rasterio" else "",
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}
