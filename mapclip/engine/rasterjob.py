"""One setup for every raster job, and the embedding pass it keeps.

detect, count, classify and caption start the same way: check the options,
open the raster, turn the extent (any CRS) into raster pixels, load the model,
fix the device's path (autocast, compile), size batches from free GPU memory
and fill in the model's own defaults. :func:`raster_job` does that once and
hands the job a :class:`RasterJob`; its two halves (engine.model.setup for the model,
engine.raster.sources.open_job_raster for the raster) start the index build, which opens
many rasters, too.

The part of a job that does not depend on the prompt (read, resize, encode)
is an *embedding pass*. ``RasterJob.cached(kind, params)`` looks a pass up in
the embedding cache (engine.cache) under a key made of the raster's identity,
the area, the read options, the job's tiling ``params`` and the model's
fingerprint; ``RasterJob.keep`` stores what a pass computed. A job that finds
its pass answers a new prompt with one matrix product over the kept vectors.
``RasterJob.cache`` says what happened, for the result's JSON: ``"off"``
(turned off, or a raster whose identity cannot be had: a remote one without
GDAL's Python bindings or whose server does not answer), ``"computed"``
(embedded now, kept for the next question), ``"too large"`` (embedded now,
larger than the cache's bounds), ``"memory"`` or ``"disk"`` (the embeddings
came from the cache). A remote raster is opened past GDAL's in-process cache
of remote files at the job's start, so a replaced object is read as it is now.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

from .core.jobs import Job
from .core.options import MIN_VALID
from .cache.keys import model_facts, pass_key, raster_identity, reader_facts
from .cache.store import CACHE
from .model.setup import job_defaults, job_model

if TYPE_CHECKING:
    from .cache.store import Entry

#: the values RasterJob.cache takes (see the module doc)
CACHE_STATES = ("off", "computed", "too large", "memory", "disk")


@dataclass
class RasterJob:
    """An opened raster, the area to work on, the model and the job's plumbing."""

    raster: str
    reader: Any                     # engine.raster.reader.RasterReader (open)
    area: Any                       # engine.geo.tiling.PixelWindow
    lm: Any                         # engine.model.models.LoadedModel
    job: Job
    use_cache: bool = True
    notes: List[str] = field(default_factory=list)
    cache: str = "off"
    skipped: int = 0                # tiles the last tile_features pass skipped
    _identity: Any = None

    @property
    def info(self):
        return self.reader.info

    def with_defaults(self, options, auto_batch: bool = True):
        """``options`` with the model's defaults filled in (engine.model.setup.job_defaults)."""
        return job_defaults(options, self.lm, auto_batch)

    # ------------------------------------------------------------ the cache --
    def key(self, kind: str, params: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The cache key of this job's pass ``kind`` with ``params``; None when not cached."""
        if not self.use_cache:
            return None
        if self._identity is None:
            self._identity = raster_identity(self.raster) or False
        if not self._identity:
            return None
        return pass_key(kind, self._identity, self.area, self.reader.options, params,
                        model_facts(self.lm), reader_facts(self.reader))

    def cached(self, key: Optional[Dict[str, Any]]) -> Optional["Entry"]:
        """The kept pass for ``key`` (None: compute it)."""
        if key is None:
            return None
        entry = CACHE.get(key)
        if entry is not None:
            self.cache = entry.source
        return entry

    def keep(self, key: Optional[Dict[str, Any]], arrays, meta: Dict[str, Any]) -> None:
        """Store a pass just computed (``arrays``: name -> NumPy array)."""
        if key is None:
            return
        self.cache = "computed" if CACHE.put(key, arrays, meta) else "too large"

    def tile_features(self, kind: str, params: Dict[str, Any], tiles, features, batch_size: int, *,
                      prefetch: int = 2, workers: int = 2, min_valid: float = MIN_VALID):
        """Yield ``(tiles, feats)`` (a torch tensor on the model's device, one row per tile)
        for every valid tile of ``tiles``, in order: read and computed by ``features(uint8
        batch)`` and kept at the end, or, when this pass was kept, from the cache without
        reading anything. Counts progress per tile (job.set_total is the caller's);
        ``self.skipped`` ends as the tiles the reader skipped (nodata, blank)."""
        import torch

        from .raster.stream import iter_tile_batches
        key = self.key(kind, params)
        hit = self.cached(key)
        if hit is not None:
            idx, feats = hit.arrays["rows"], hit.arrays["values"]
            self.skipped = int(hit.meta["skipped"])
            for i in range(0, len(idx), batch_size):
                chunk = [tiles[int(j)] for j in idx[i:i + batch_size]]
                yield chunk, torch.from_numpy(feats[i:i + batch_size]).to(self.lm.device)
                self.job.step(len(chunk))
            self.job.step(self.skipped)
            return
        recorder = self.recorder(key)
        batches = iter_tile_batches(self.reader, tiles, batch_size, job=self.job, prefetch=prefetch,
                                    workers=workers, min_valid=min_valid)
        done = 0
        with batches:
            for chunk, arr in batches:
                with torch.inference_mode():
                    feats = features(torch.from_numpy(arr))
                yield chunk, feats
                recorder.add([t.index for t in chunk], feats)
                self.job.step(batches.done - done)
                done = batches.done
            self.skipped = batches.skipped
        if batches.done > done:
            self.job.step(batches.done - done)
        recorder.keep({"skipped": int(self.skipped)})

    def recorder(self, key: Optional[Dict[str, Any]]) -> "PassRecorder":
        """Collects a pass while it is computed, to :meth:`keep` it under ``key``."""
        return PassRecorder(self, key)


class PassRecorder:
    """A pass being computed: ``rows`` (what each value belongs to: tile indices, window
    positions) and ``values`` (embeddings, patch features), collected while they fit the
    cache's bounds (past them the job says ``"too large"`` and stops collecting)."""

    def __init__(self, rj: RasterJob, key: Optional[Dict[str, Any]]):
        self.rj, self.key = rj, key
        self.rows: List[Any] = []
        self.values: List[Any] = []
        self.nbytes = 0

    @property
    def on(self) -> bool:
        return self.key is not None

    def add(self, rows, values) -> None:
        import numpy as np

        if not self.on:
            return
        self.rows.append(np.asarray(rows, np.int64))
        self.values.append(values.float().cpu().numpy())
        self.nbytes += self.values[-1].nbytes + self.rows[-1].nbytes
        if not CACHE.fits(self.nbytes):
            self.key, self.rows, self.values = None, [], []
            self.rj.cache = "too large"

    def keep(self, meta: Dict[str, Any]) -> None:
        import numpy as np
        if self.on and self.values:
            self.rj.keep(self.key, {"rows": np.concatenate(self.rows),
                                    "values": np.concatenate(self.values)}, meta)


@contextmanager
def raster_job(raster: str, model, extent=None, extent_crs: Optional[str] = None, *,
               options, read=None, progress=None, cancel: Optional[threading.Event] = None,
               job: Optional[Job] = None) -> Iterator[RasterJob]:
    """Open ``raster`` for a job (module doc); the reader closes when the block ends.

    ``options`` carries ``device``, ``precision`` and, where the job has them,
    ``compile`` and ``cache``; ``read`` (ReadOptions) defaults to ``options.read``.
    """
    from .geo.extent import extent_to_window
    from .raster.sources import open_job_raster
    job = job or Job(progress, cancel)
    with open_job_raster(raster, read if read is not None else getattr(options, "read", None)) as reader:
        notes = list(reader.warnings)
        # what reading adds later (reader processes that gave way to threads) is a job note too
        reader.warnings = notes
        area = extent_to_window(reader.info, extent, extent_crs)
        job.check()
        lm, model_notes = job_model(model, options)
        notes.extend(model_notes)
        yield RasterJob(str(raster), reader, area, lm, job,
                        use_cache=bool(getattr(options, "cache", False)), notes=notes)
