"""Building an index over raster archives: sources, layout, resume and append,
the tiles embedded in batches and committed shard by shard, the footprints.

A build resumes exactly after its last commit: no tile is embedded twice and
none is missed (skipped, empty tiles are re-checked, not stored).
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union
import numpy as np
from ..core.errors import ModelError, UsageError
from ..core.faults import fault_point
from ..core.jobs import Job
from ..core.options import MIN_VALID, IndexOptions, check
from ..core.outputs import same_crs
from ..model.identity import describe_model, same_space
from ..model.space import model_identity
from . import ann
from .distributed import embed_plan_on_ray
from .embed import embed_window_batch, read_facts, read_options
from .format import LOCK, MANIFEST, TILE_DTYPE, file_checksum, read_manifest
from .store import Index
from .writer import IndexWriter, WriteLock, write_footprints
from ..core.options import UNBOUNDED_DRIVERS
from ..geo.tiling import TileGrid
from ..model.batching import BatchRunner
from ..model.setup import job_defaults, job_model
from ..raster.remote import gdal_path, is_remote
from ..core.errors import Cancelled


#: rasters a FOLDER source contributes (searched recursively)
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".img", ".vrt", ".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------- #
# Options and results.
# --------------------------------------------------------------------------- #
@dataclass
class IndexInfo:
    """What a build did and what the index holds now."""

    path: str
    rows: int
    rasters: int
    shards: int
    embedded: int            # tiles embedded by this call
    skipped: int             # empty / nodata tiles passed over by this call
    added: List[str] = field(default_factory=list)       # new rasters
    resumed: List[str] = field(default_factory=list)     # finished an interrupted build
    replaced: List[str] = field(default_factory=list)    # changed rasters re-embedded
    unchanged: List[str] = field(default_factory=list)   # already indexed, same checksum
    seconds: float = 0.0
    model: str = ""
    device: str = ""
    precision: str = ""
    embed_dim: int = 0
    scales: List[int] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def tiles_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["tiles_per_s"] = round(self.tiles_per_s, 2)
        d["seconds"] = round(self.seconds, 3)
        return d


def expand_sources(sources: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                   exclude: Optional[Path] = None) -> List[Union[Path, str]]:
    """Raster files from files and folders (folders searched recursively, sorted);
    remote rasters (raster/remote.py) as their GDAL path, never normalised."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: List[Union[Path, str]] = []
    seen = set()
    for s in sources or ():
        if is_remote(s):
            url = gdal_path(s)
            if url not in seen:
                seen.add(url)
                out.append(url)
            continue
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*")
                           if q.is_file() and q.suffix.lower() in RASTER_SUFFIXES
                           and not (exclude and exclude.resolve() in q.resolve().parents))
            if not found:
                raise UsageError(f"folder {p} holds no rasters",
                                 f"rasters are found by suffix: {', '.join(RASTER_SUFFIXES)}")
            files = found
        elif p.is_file():
            files = [p]
        else:
            raise UsageError(f"raster {p} does not exist", "check the path")
        for f in files:
            key = str(f.resolve())
            if key not in seen:
                seen.add(key)
                out.append(f.resolve())
    if not out:
        raise UsageError("no rasters given", "name raster files or folders to index")
    return out


# --------------------------------------------------------------------------- #
# Building: create, append, resume.
# --------------------------------------------------------------------------- #
def _layout(options: IndexOptions, stored: Optional[Dict[str, Any]], image_size: int) -> Dict[str, Any]:
    """The index's tiling layout: the stored one, checked against what was asked,
    or (new index) the asked one with defaults filled in."""
    if options.gsd is None and options.read is not None and getattr(options.read, "gsd", None):
        options = IndexOptions(**{**options.__dict__, "gsd": options.read.gsd})   # ReadOptions.gsd
    asked_scales = [int(s) for s in options.scales] if options.scales else (
        [int(options.tile_px)] if options.tile_px else None)
    if asked_scales is not None and (not asked_scales or min(asked_scales) < 1):
        raise UsageError(f"tile sizes must be positive, got {asked_scales}", "e.g. --scales 224,448")
    if options.stride_px is not None and int(options.stride_px) < 1:
        raise UsageError(f"stride must be positive, got {options.stride_px}", "e.g. --stride 112")
    if options.gsd is not None and not float(options.gsd) > 0:
        raise UsageError(f"GSD must be positive, got {options.gsd}", "e.g. --gsd 0.5")
    if options.min_valid is not None and not 0.0 <= float(options.min_valid) <= 1.0:
        raise UsageError(f"min_valid must lie in 0..1, got {options.min_valid}", f"e.g. {MIN_VALID}")
    if stored is not None:
        mismatch = []
        if asked_scales is not None and asked_scales != stored["scales"]:
            mismatch.append(f"tile sizes {asked_scales} (index: {stored['scales']})")
        if options.stride_px is not None and int(options.stride_px) != stored["stride_px"]:
            mismatch.append(f"stride {options.stride_px} (index: {stored['stride_px']})")
        if options.gsd is not None and float(options.gsd) != stored["gsd"]:
            mismatch.append(f"GSD {options.gsd} (index: {stored['gsd']})")
        if options.read is not None and read_facts(options.read) != stored["read"]:
            mismatch.append(f"band/stretch options {read_facts(options.read)} (index: {stored['read']})")
        if options.min_valid is not None and float(options.min_valid) != stored["min_valid"]:
            mismatch.append(f"min_valid {options.min_valid} (index: {stored['min_valid']})")
        if mismatch:
            raise UsageError("the index was built with other tiling options: " + "; ".join(mismatch),
                             "leave those options out to use the index's own, or build a new index")
        return stored
    scales = asked_scales or [int(image_size)]
    stride = int(options.stride_px) if options.stride_px is not None else scales[0]
    return {"scales": scales, "stride_px": stride,
            "gsd": float(options.gsd) if options.gsd is not None else None,
            "read": read_facts(options.read),
            "min_valid": float(options.min_valid) if options.min_valid is not None else MIN_VALID}


def _stride_for(layout: Dict[str, Any], tile_px: int) -> int:
    """Stride of one scale: the first scale's stride, same overlap fraction for the others."""
    base = layout["scales"][0]
    return max(1, int(round(layout["stride_px"] * tile_px / base)))


def _existing_manifest(out: Path) -> Optional[Dict[str, Any]]:
    """The manifest of an existing index at ``out``; None for a new (absent/empty) folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} is a file, not an index folder", "give a folder path for --out")
    if out.is_dir() and (out / MANIFEST).exists():
        return read_manifest(out)
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise UsageError(f"output folder {out} exists and is not a MapCLIP index",
                         "choose a new or empty folder for --out")
    return None


def _check_append(out: Path, m: Dict[str, Any], identity: Dict[str, Any]) -> None:
    if not same_space(m["model"], identity):
        raise ModelError(
            f"index {out} was built with model {describe_model(m['model'])}; cannot add "
            f"embeddings from {describe_model(identity)} (a different embedding space)",
            f"index with --model {m['model'].get('spec')}, or write to a new --out folder")


@dataclass
class _Source:
    path: Union[Path, str]   # a str for a remote raster
    checksum: str
    georef: Dict[str, Any]
    grids: Dict[int, Any]
    area: Optional[Dict[str, Any]] = None     # the asked extent ({"extent", "crs"}), None: all


def _source_area(reader, options: IndexOptions):
    """The pixel window of the asked extent in one raster (None: the whole raster).
    An unbounded web source (a GDAL WMS/TMS XML) without an extent is refused; an
    extent that misses the raster raises ExtentMisses."""
    from ..geo.extent import extent_to_window
    ri = reader.info
    if options.extent is None:
        if ri.driver in UNBOUNDED_DRIVERS:
            raise UsageError(
                f"{reader.path} is a web map service (GDAL {ri.driver}) of {ri.width} x {ri.height} "
                "pixels: indexing all of it would fetch the whole world",
                "give the area to index: --extent xmin,ymin,xmax,ymax (with --extent-crs EPSG:N "
                "when it is not in the service's CRS)", option="extent")
        return None
    return extent_to_window(ri, tuple(options.extent), options.extent_crs)


def _probe_sources(paths: Sequence[Path], layout: Dict[str, Any],
                   options: Optional[IndexOptions] = None) -> Tuple[List[_Source], List[str]]:
    """Open every raster once (metadata only): checksum, georeferencing, tile grids
    (over ``options.extent`` when given: rasters it misses are left out, with a note);
    and the build's notes about them (:func:`_raster_notes`).

    Runs before anything is written, so an unreadable raster leaves no trace.
    """
    from ..geo.extent import ExtentMisses
    from ..raster.sources import open_job_raster, remote_checksum
    options = options or IndexOptions()
    read_opts = read_options(layout)
    out, no_georef, no_crs, notes = [], [], [], []
    for p in paths:
        # a remote raster is asked for again, not taken from GDAL's cache (raster/sources.py);
        # warnings about georeferencing are noted once per build, below
        with open_job_raster(str(p), read_opts) as reader:
            ri = reader.info
            try:
                area = _source_area(reader, options)
            except ExtentMisses as exc:
                if len(paths) == 1:
                    raise
                notes.append(f"{p} left out: {exc}")
                continue
            grids = {int(s): TileGrid.for_raster(ri, area, int(s), _stride_for(layout, int(s)),
                                                 layout["gsd"], max_tiles=None)
                     for s in layout["scales"]}
            if not ri.georeferenced:
                no_georef.append(p)
            elif ri.crs is None:
                no_crs.append(p)
            else:
                notes.extend(reader.warnings)
        georef = {"crs": ri.crs, "transform": [float(v) for v in list(ri.transform)[:6]],
                  "width": int(ri.width), "height": int(ri.height)}
        asked = None if options.extent is None else \
            {"extent": [float(v) for v in options.extent], "crs": options.extent_crs}
        out.append(_Source(p, remote_checksum(p) if isinstance(p, str) else file_checksum(p),
                           georef, grids, asked))
    if not out:
        raise UsageError(f"the extent {tuple(options.extent)} misses every raster given",
                         "give an extent that overlaps the rasters (and --extent-crs if it is "
                         "in another CRS)", option="extent")
    return out, _raster_notes(no_georef, no_crs) + list(dict.fromkeys(notes))


#: rasters named in a note, the rest counted
NOTE_NAMES = 5


def _raster_notes(no_georef: Sequence, no_crs: Sequence) -> List[str]:
    """One note per kind for the build ("16 images have no georeferencing: a.png, ...")
    instead of a warning per raster and per opening."""
    def named(paths: Sequence) -> str:
        names = ", ".join(str(p).replace("\\", "/").rsplit("/", 1)[-1] for p in paths[:NOTE_NAMES])
        return names + (f" and {len(paths) - NOTE_NAMES} more" if len(paths) > NOTE_NAMES else "")

    def some(paths: Sequence) -> str:
        return "1 image has" if len(paths) == 1 else f"{len(paths)} images have"

    notes = []
    if no_georef:
        notes.append(f"{some(no_georef)} no georeferencing: {named(no_georef)}; indexed in pixel "
                     "coordinates (x = column, y = -row)")
    if no_crs:
        notes.append(f"{some(no_crs)} a geotransform but no CRS: {named(no_crs)}; their "
                     "coordinates are in an unknown CRS")
    return notes


def _reconcile(writer: IndexWriter, src: _Source, reindex: bool) -> Tuple[Dict[str, Any], str]:
    """The manifest entry for a source and what to do: added, resumed, replaced or unchanged."""
    key = str(src.path)
    entry = writer.raster_entry(key)
    if entry is not None:
        g = src.georef
        same = (entry.get("checksum") == src.checksum and entry.get("width") == g["width"]
                and entry.get("height") == g["height"] and same_crs(entry.get("crs"), g["crs"])
                and np.allclose(entry.get("transform") or [0] * 6, g["transform"])
                and entry.get("area") == src.area)      # another extent: other tiles
        if same and not reindex:
            status = "unchanged" if entry.get("complete") else "resumed"
        else:
            writer.drop_rows(entry)
            status = "replaced"
        entry.update(g, checksum=src.checksum, area=src.area)
    else:
        rid = int(writer.manifest["next_raster"])
        writer.manifest["next_raster"] = rid + 1
        entry = dict({"id": rid, "path": key, "name": key.rsplit("/", 1)[-1] if isinstance(src.path, str) else src.path.name, "checksum": src.checksum,
                      "progress": {}, "complete": False, "area": src.area}, **src.georef)
        writer.manifest["rasters"].append(entry)
        status = "added"
    entry["grids"] = {str(s): {"tiles": len(g), "cols": g.n_cols, "rows": g.n_rows,
                               "tile_width": g.tile_width, "tile_height": g.tile_height,
                               "stride": list(g.stride), "out_px": g.out_px}
                      for s, g in src.grids.items()}
    return entry, status


def build_index(sources, out: Union[str, os.PathLike], model, options: Optional[IndexOptions] = None,
                progress=None, cancel=None) -> IndexInfo:
    """Embed every tile of ``sources`` (raster files and folders) into index ``out``.

    Creates the index, appends new rasters to an existing one, finishes an
    interrupted build where its last commit stopped, and replaces the rows
    of rasters whose checksum (or georeferencing) changed. Tiles stream
    through :func:`engine.raster.stream.iter_tile_batches` and
    :func:`engine.model.encode.encode_images`, like detect. On cancel the tiles
    embedded so far are committed (the index stays consistent and resumable)
    and :class:`Cancelled` is raised. A new index that fails before its first
    commit is removed.
    """
    import shutil

    from ..raster.sources import open_job_raster

    t0 = time.perf_counter()
    options = check(options or IndexOptions())
    out = Path(out).expanduser().resolve()
    paths = expand_sources(sources, exclude=out)
    job = Job(progress, cancel)
    existing = _existing_manifest(out)
    # the model side of the one job setup (engine.model.setup): the device path, a batch
    # size on CUDA from free GPU memory, the model's defaults
    lm, model_notes = job_model(model, options)
    options = job_defaults(options, lm)
    identity = model_identity(lm)
    if existing is not None:
        _check_append(out, existing, identity)
        Index(out).verify()      # a damaged index is refused before anything is written
    layout = _layout(options, existing["options"] if existing else None, lm.image_size)
    sources_, notes = _probe_sources(paths, layout, options)
    job.check()

    info = IndexInfo(path=str(out), rows=0, rasters=0, shards=0, embedded=0, skipped=0,
                     model=str(lm.spec), device=str(lm.device), precision=lm.precision,
                     embed_dim=int(lm.embed_dim), scales=list(layout["scales"]),
                     warnings=model_notes + notes)
    created = existing is None and not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        with WriteLock(out):
            m = _existing_manifest(out)   # again, under the lock
            if m is None:
                writer = IndexWriter.create(out, identity, layout)
            else:
                _check_append(out, m, identity)
                m["options"] = _layout(options, m["options"], lm.image_size)
                writer = IndexWriter(out, m)
            writer.clean()
            read_opts = read_options(writer.manifest["options"],
                                     options.read.workers if options.read is not None else "auto")
            plan = []
            for src in sources_:
                entry, status = _reconcile(writer, src, options.reindex)
                plan.append((src, entry, status))
                getattr(info, status).append(str(src.path))
            writer.save()
            job.set_total(sum(0 if st == "unchanged" else
                              sum(len(g) - int(e["progress"].get(str(s), 0)) for s, g in src.grids.items())
                              for src, e, st in plan))
            if options.ray is not None:      # the same chunks of tiles, on Ray workers
                embed_plan_on_ray(writer, plan, lm, options, job, info)
            for src, entry, status in plan:
                if status == "unchanged" or entry.get("complete"):
                    continue
                with open_job_raster(str(src.path), read_opts) as reader:   # noted in the probe
                    for s, grid in src.grids.items():
                        start = int(entry["progress"].get(str(s), 0))
                        if start < len(grid):
                            _embed_grid(writer, entry, s, grid, start, reader, lm,
                                        writer.manifest["options"], options, job, info)
                entry["complete"] = True
                writer.save()
            if options.footprints:
                with warnings.catch_warnings():   # no CRS: said in the note on georeferencing
                    warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
                    write_footprints(writer)
            if ann.use_ivf(sum(int(s["rows"]) for s in writer.manifest["shards"])):
                ann.load_or_build(Index(out))      # search's IVF-PQ index, built once here
            m = writer.manifest
            info.rows = int(sum(int(s["rows"]) for s in m["shards"]))
            info.rasters = len(m["rasters"])
            info.shards = len(m["shards"])
    except BaseException as exc:
        if created and not isinstance(exc, (Cancelled, KeyboardInterrupt)) and \
                (writer is None or not writer.manifest["shards"]):
            shutil.rmtree(out, ignore_errors=True)
        raise
    info.seconds = time.perf_counter() - t0
    return info


def _embed_grid(writer: IndexWriter, entry, tile_px: int, grid, start: int, reader, lm, layout,
                options: IndexOptions, job: Job, info: IndexInfo) -> None:
    """Embed ``grid.tiles[start:]``, committing a shard every ``commit_tiles`` tiles."""
    from ..raster.stream import iter_tile_batches
    ri = reader.info
    runner = BatchRunner(int(options.batch_size))
    todo = grid.tiles[start:]
    batches = iter_tile_batches(reader, todo, int(options.batch_size), job=job,
                                min_valid=layout["min_valid"])
    embs: List[np.ndarray] = []
    recs: List[np.ndarray] = []
    first = start
    pending = 0
    consumed = 0   # tiles of ``todo`` consumed (embedded or skipped) and not yet committed

    def flush(next_tile: int) -> None:
        nonlocal embs, recs, first, pending
        emb = np.concatenate(embs) if embs else np.zeros((0, lm.embed_dim), np.float16)
        rec = np.concatenate(recs) if recs else np.zeros(0, TILE_DTYPE)
        writer.commit(entry, tile_px, emb, rec, first, next_tile)
        fault_point("index.commit")
        embs, recs, first, pending = [], [], next_tile, 0

    try:
        try:
            for tiles, arr in batches:
                e, r = embed_window_batch(lm, runner, int(entry["id"]), tile_px, tiles, arr, ri)
                embs.append(e)
                recs.append(r)
                pending += len(tiles)
                info.embedded += len(tiles)
                step = batches.done - consumed
                consumed = batches.done
                if pending >= options.commit_tiles:
                    flush(start + consumed)
                job.step(step)
        except (Cancelled, KeyboardInterrupt):
            if pending:
                flush(start + consumed)
            raise
        info.skipped += batches.skipped
        info.warnings.extend(n for n in [*runner.notes, *batches.notes] if n not in info.warnings)
        flush(len(grid))
        tail = len(grid) - start - consumed
        if tail:
            job.step(tail)
    finally:
        batches.close()
