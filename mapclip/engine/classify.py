"""Open-vocabulary land-cover maps: class names -> a class-index raster.

The analyst names classes ("water", "forest", "farmland", ...); every cell of
the extent gets the class whose text it matches best. Training-free, from the
same dense patch features as dense detection (engine.model.dense: ClearCLIP /
SegEarth-OV style last block), with the prompt template ensemble of
engine.model.scoring: each class is encoded through the templates, and the classes
compete with each other in a softmax with the model's logit scale (no
background prompts: the classes are meant to cover the scene).

Method:

- the extent is cut into tiles of ``tile_px`` overlapping by ``overlap``
  (engine.geo.tiling); tiles are read by engine.raster.batches' reader threads;
- one forward pass per tile gives a patch-level score map per class; the
  maps are upsampled bilinearly to ``upsample`` cells per patch side,
  optionally smoothed (a Gaussian of ``smoothing`` cells, per tile), and
  blended into the extent's grid with linear ramps toward tile borders, as
  dense detection does;
- each cell's class is the best one (values 1..N in class order); a cell
  whose best score is below ``threshold`` is **unknown** (value 0); a cell
  no tile scored (nodata, skipped tiles) is :data:`NODATA` (255).

Streaming: tiles arrive row by row; once a row of tiles is done, the cells
above the next row are final and are classified and handed on (written to
the GeoTIFF, or kept in memory when no output path is given). Only one band
of tile rows of score accumulators is ever held, never the raster or the
whole score grid. Outputs are written to temporary files and renamed into
place only when everything succeeded (no partial output).

Models without ViT patch tokens (ResNets) fall back to one score per tile
(blended like the patch maps, so the map is coarse), with a warning.

Output grid: the cells of the tile grid that touch the extent; a cell is
``tile / (patches * upsample)`` native pixels (8 px for the demo model's
64 px tiles), with its own affine transform in the raster's CRS.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .core.errors import UsageError
from .core.jobs import atomic_path, check_outputs
from .core.options import MAX_CLASSES, ClassifyOptions, check, cls_token_lambda_for
from .core.outputs import VECTOR_DRIVERS
from .core.outputs import CLASS_FIELDS, _pyogrio_raw, write_features
from .core.wkb import read_polygons, rings_wkb
from .data.metrics import mask_agreement
from .geo.tiling import TileGrid
from .model.batching import BatchRunner
from .model.dense import dense_features
from .model.scoring import build_bank, resolve_templates, score_embeddings, score_maps
from .rasterjob import raster_job

if TYPE_CHECKING:
    from .model.models import LoadedModel

#: class value of a cell whose best score is below the threshold
UNKNOWN = 0
#: class value of a cell no tile scored
NODATA = 255
UNKNOWN_NAME = "unknown"
#: classes kept in memory (no output path) at most this many cells
MAX_MEMORY_CELLS = 64_000_000

#: colours for classes whose name holds one of these words (first match wins)
_NAMED_COLOURS: Tuple[Tuple[Tuple[str, ...], Tuple[int, int, int]], ...] = (
    (("water", "river", "lake", "sea", "ocean", "pond", "harbor", "harbour"), (31, 120, 180)),
    (("forest", "tree", "wood"), (27, 110, 45)),
    (("grass", "meadow", "pasture", "park", "lawn"), (130, 200, 90)),
    (("field", "farm", "crop", "agricultur", "cultivat"), (230, 200, 80)),
    (("bare", "sand", "soil", "desert", "barren", "rock"), (200, 160, 110)),
    (("urban", "building", "house", "city", "residential", "industrial", "settlement"),
     (215, 50, 40)),
    (("road", "street", "highway"), (90, 90, 90)),
    (("runway", "airport", "apron"), (160, 160, 170)),
    (("snow", "ice", "cloud"), (240, 240, 250)),
    (("wetland", "marsh", "swamp"), (80, 170, 160)),
)
#: colours for the other classes, in turn
_PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (166, 206, 227), (251, 154, 153), (253, 191, 111), (202, 178, 214), (255, 255, 153),
    (177, 89, 40), (106, 61, 154), (255, 127, 0), (178, 223, 138), (227, 26, 28),
    (51, 160, 44), (31, 120, 180), (128, 128, 0), (0, 128, 128), (128, 0, 128))
UNKNOWN_COLOUR = (0, 0, 0)


# --------------------------------------------------------------------------- #
# Classes.
# --------------------------------------------------------------------------- #
def clean_classes(classes: Sequence[str]) -> List[str]:
    """Class names stripped (inner spaces collapsed); UsageError when there are none,
    only one, a repeat (case-insensitive), the reserved name "unknown", or more than
    :data:`MAX_CLASSES`."""
    names = [" ".join(str(c).split()) for c in (classes or ())]
    if any(not n for n in names):
        raise UsageError("a class name is empty", "give every class a name, e.g. --class water",
                         option="classes")
    if not names:
        raise UsageError("no classes given", "name at least two classes, e.g. --class water "
                         "--class forest --class field", option="classes")
    if len(names) == 1:
        raise UsageError(f"only one class ({names[0]!r}): a class map needs classes that compete",
                         "add at least one more class (e.g. the other land covers of the scene), "
                         "or find one thing with `detect --mode dense`", option="classes")
    seen: Dict[str, str] = {}
    for n in names:
        if n.lower() in seen:
            raise UsageError(f"class {n!r} is given twice", "give each class once",
                             option="classes")
        seen[n.lower()] = n
    if UNKNOWN_NAME in seen:
        raise UsageError(f"{UNKNOWN_NAME!r} is reserved for cells below the threshold",
                         "name the class differently, or use --threshold for unknown cells",
                         option="classes")
    if len(names) > MAX_CLASSES:
        raise UsageError(f"{len(names)} classes: a class map holds at most {MAX_CLASSES}",
                         f"give at most {MAX_CLASSES} classes", option="classes")
    return names


def check_class_lengths(lm: LoadedModel, classes: Sequence[str], templates: Any = None) -> None:
    """UsageError naming the first class that, put into the prompt templates, does not fit
    the model's text context (the tokenizer would cut it off silently)."""
    tok = lm.tokenizer
    context = int(getattr(tok, "context_length", 0) or lm.model_cfg.get("text_cfg", {})
                  .get("context_length", 77))
    encode = getattr(tok, "encode", None)
    temps = resolve_templates(templates, lm)
    for c in classes:
        longest = max((t.replace("{}", c) for t in temps), key=len)
        if encode is not None:
            n = len(encode(longest)) + 2  # start and end tokens
        else:
            ids = tok([longest])[0]
            n = context + 1 if int(ids[-1]) != 0 else int((ids != 0).sum())
        if n > context:
            raise UsageError(f"class {c!r} is too long for {lm.arch}'s text context "
                             f"({n} tokens in {longest!r}, at most {context})",
                             "shorten the class name to a few words", option="classes")


def class_colours(classes: Sequence[str]) -> List[Tuple[int, int, int]]:
    """One RGB colour per class: a natural colour for common land covers, else a palette."""
    out: List[Tuple[int, int, int]] = []
    used = set()
    k = 0
    for name in classes:
        low = name.lower()
        colour = next((c for words, c in _NAMED_COLOURS if any(w in low for w in words)), None)
        if colour is None or colour in used:
            while _PALETTE[k % len(_PALETTE)] in used and k < 2 * len(_PALETTE):
                k += 1
            colour = _PALETTE[k % len(_PALETTE)]
            if colour in used:  # more classes than colours: vary the shade
                colour = tuple(int((v + 37 * (k // len(_PALETTE))) % 256) for v in colour)
            k += 1
        used.add(colour)
        out.append(colour)
    return out


# --------------------------------------------------------------------------- #
# Result.
# --------------------------------------------------------------------------- #
@dataclass
class ClassifyResult:
    """A class map: values 1..N are ``classes`` in order, 0 unknown, 255 not scored."""

    classes: List[str]
    colours: List[Tuple[int, int, int]]
    class_map: Optional[np.ndarray]       # (H, W) uint8; None when written to a file only
    scores: Optional[np.ndarray]          # (N, H, W) float32 softmax per class, NaN = not scored
    transform: Any                        # affine.Affine of the cells
    crs: Optional[str]
    shape: Tuple[int, int]                # (rows, cols) of cells
    cell_px: Tuple[float, float]          # native pixels per cell (x, y)
    counts: Dict[str, int]                # cells per class (and "unknown")
    tiles: int
    skipped: int
    seconds: float
    device: str
    precision: str
    model: str
    method: str = "dense"                 # "dense" or "tile" (the fallback for ResNets)
    threshold: Optional[float] = None
    out: Optional[str] = None
    scores_out: Optional[str] = None
    polygons_out: Optional[str] = None
    style_out: Optional[str] = None
    polygons: int = 0
    warnings: List[str] = field(default_factory=list)
    cache: str = "off"                       # where the tiles' features came from (engine.rasterjob)

    @property
    def from_cache(self) -> bool:
        return self.cache in ("memory", "disk")

    @property
    def shares(self) -> Dict[str, float]:
        total = sum(self.counts.values())
        return {k: (v / total if total else 0.0) for k, v in self.counts.items()}

    def to_json(self) -> Dict[str, Any]:
        return {
            "classes": list(self.classes), "values": {n: i + 1 for i, n in enumerate(self.classes)},
            "unknown_value": UNKNOWN, "nodata": NODATA,
            "colours": {n: "#%02x%02x%02x" % c for n, c in zip(self.classes, self.colours)},
            "shape": list(self.shape), "cell_px": [round(v, 6) for v in self.cell_px],
            "transform": list(self.transform)[:6] if self.transform is not None else None,
            "crs": self.crs, "counts": dict(self.counts),
            "shares": {k: round(v, 6) for k, v in self.shares.items()},
            "threshold": self.threshold, "method": self.method,
            "tiles": self.tiles, "skipped": self.skipped, "seconds": round(self.seconds, 4),
            "device": self.device, "precision": self.precision, "model": self.model,
            "out": self.out, "scores_out": self.scores_out, "polygons_out": self.polygons_out,
            "style_out": self.style_out, "polygons": self.polygons,
            "cache": self.cache, "from_cache": self.from_cache,
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------- #
# The grid of cells.
# --------------------------------------------------------------------------- #
@dataclass
class _Plan:
    grid: Any            # TileGrid
    cov: Any             # PixelWindow the tiles cover
    hh: int              # cells per tile, rows
    hw: int              # cells per tile, cols
    cx: float            # native px per cell
    cy: float
    Hh: int              # cells of the covered window
    Wh: int
    i0: int              # the output: cell rows [i0, i1), cols [j0, j1) of the covered grid
    i1: int
    j0: int
    j1: int
    transform: Any

    @property
    def shape(self) -> Tuple[int, int]:
        return self.i1 - self.i0, self.j1 - self.j0


def _plan(info, area, tile_px: int, overlap: float, gsd, hh: int, hw: int) -> _Plan:
    from affine import Affine

    ov = int(round(tile_px * overlap))
    grid = TileGrid.for_raster(info, area, tile_px, stride_px=max(1, tile_px - ov), gsd=gsd)
    cov = grid.covered()
    cx, cy = grid.tile_width / hw, grid.tile_height / hh
    Wh = int(math.ceil(cov.width / cx - 1e-9))
    Hh = int(math.ceil(cov.height / cy - 1e-9))
    j0 = max(0, int(math.floor((area.col - cov.col) / cx + 1e-9)))
    i0 = max(0, int(math.floor((area.row - cov.row) / cy + 1e-9)))
    j1 = min(Wh, int(math.ceil((area.col_end - cov.col) / cx - 1e-9)))
    i1 = min(Hh, int(math.ceil((area.row_end - cov.row) / cy - 1e-9)))
    tf = info.transform @ Affine.translation(cov.col + j0 * cx, cov.row + i0 * cy) @ Affine.scale(cx, cy)
    return _Plan(grid, cov, hh, hw, cx, cy, Hh, Wh, i0, i1, j0, j1, tf)


def _cell_pos(start: int, origin: int, size: int, end: int, cell: float, n_cells: int,
              tile_cells: int) -> int:
    """The first cell of a tile along one axis; a tile flush with the covered window's end
    (edge tiles are shifted inward) is placed flush with the last cell, so no cell is left
    between it and the end."""
    if start + size >= end:
        return max(0, n_cells - tile_cells)
    return int(round((start - origin) / cell))


def _ramp(n: int, ramp: float) -> np.ndarray:
    i = np.arange(n, dtype=np.float32) + 0.5
    w = np.minimum(1.0, np.minimum(i, n - i) / max(ramp, 1.0))
    return np.maximum(w, 1e-3).astype(np.float32)


def _score_bands(rj, plan: _Plan, encoder, P: int, opts: ClassifyOptions, runner,
                 facts: Dict[str, int]) -> Iterator[Tuple[int, np.ndarray]]:
    """Yield ``(row0, probs)``: final blended scores (P, k, W) of output rows
    [row0, row0 + k), in order, NaN where no tile scored. ``facts["skipped"]``
    counts the tiles the reader skipped (nodata, blank). The tiles' features are the
    job's embedding pass (engine.rasterjob): kept, another set of classes on the same
    area scores them without reading the raster again."""
    import cv2

    features, scores, _, _, params = encoder
    job = rj.job
    grid, hh, hw = plan.grid, plan.hh, plan.hw
    Hb = hh + 2
    acc = np.zeros((P, Hb, plan.Wh), np.float32)
    wsum = np.zeros((Hb, plan.Wh), np.float32)
    band_y0 = 0
    ramp_cells = max(1.0, float(opts.overlap) * hw)
    weight = np.outer(_ramp(hh, ramp_cells), _ramp(hw, ramp_cells))
    row_y = [_cell_pos(r, plan.cov.row, grid.tile_height, plan.cov.row_end, plan.cy, plan.Hh, hh)
             for r in grid.row_starts]
    sigma = float(opts.smoothing or 0.0)

    def flush(y_end: int) -> Iterator[Tuple[int, np.ndarray]]:
        nonlocal band_y0
        y_end = min(y_end, plan.Hh)
        while band_y0 < y_end:
            k = min(y_end - band_y0, Hb)
            a, w = acc[:, :k], wsum[:k]
            # the part of these rows inside the output
            r0, r1 = max(band_y0, plan.i0), min(band_y0 + k, plan.i1)
            if r1 > r0:
                sl = slice(r0 - band_y0, r1 - band_y0)
                ws = w[sl, plan.j0:plan.j1]
                with np.errstate(invalid="ignore", divide="ignore"):
                    probs = np.where(ws > 0, a[:, sl, plan.j0:plan.j1] / np.where(ws > 0, ws, 1.0),
                                     np.nan).astype(np.float32)
                yield r0 - plan.i0, probs
            acc[:, :Hb - k] = acc[:, k:]
            acc[:, Hb - k:] = 0
            wsum[:Hb - k] = wsum[k:]
            wsum[Hb - k:] = 0
            band_y0 += k

    job.set_total(len(grid.tiles))
    params = dict(params, tile_px=int(opts.tile_px), overlap=float(opts.overlap),
                  min_valid=float(opts.min_valid))
    for tiles, feats in rj.tile_features("classify", params, grid.tiles, lambda b: runner(features, b),
                                         opts.batch_size, prefetch=opts.prefetch,
                                         workers=opts.workers, min_valid=opts.min_valid):
        job.check()
        probs = runner(scores, feats).numpy()
        for tile, pr in zip(tiles, probs):
            r = tile.index // grid.n_cols
            yield from flush(row_y[r])  # rows above this tile row are final
            if sigma > 0:
                pr = np.stack([cv2.GaussianBlur(m, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
                               for m in pr])
            x = _cell_pos(tile.col, plan.cov.col, grid.tile_width, plan.cov.col_end, plan.cx,
                          plan.Wh, hw)
            y = row_y[r] - band_y0
            x1, y1 = min(plan.Wh, x + hw), min(Hb, y + hh, plan.Hh - band_y0)
            if y1 <= y or x1 <= x:
                continue
            w = weight[:y1 - y, :x1 - x]
            acc[:, y:y1, x:x1] += pr[:, :y1 - y, :x1 - x] * w
            wsum[y:y1, x:x1] += w
    yield from flush(plan.Hh)
    facts["skipped"] = rj.skipped


def _classify_band(probs: np.ndarray, threshold: Optional[float]) -> Tuple[np.ndarray, np.ndarray]:
    """(P, k, W) scores -> uint8 classes (k, W) and the best score (k, W) (NaN where not scored)."""
    scored = ~np.isnan(probs[0])
    filled = np.where(np.isnan(probs), -1.0, probs)
    best = filled.argmax(axis=0)
    conf = np.take_along_axis(filled, best[None], axis=0)[0].astype(np.float32)
    classes = (best + 1).astype(np.uint8)
    if threshold is not None:
        classes[conf < threshold] = UNKNOWN
    classes[~scored] = NODATA
    conf[~scored] = np.nan
    return classes, conf


# --------------------------------------------------------------------------- #
# Public API.
# --------------------------------------------------------------------------- #
def classify(raster: str, classes: Sequence[str], model: Union[str, LoadedModel],  # long: outputs opened together, all or none
             extent: Optional[Tuple[float, float, float, float]] = None,
             extent_crs: Optional[str] = None, options: Optional[ClassifyOptions] = None,
             progress=None, cancel=None, out: Optional[str] = None,
             scores_out: Optional[str] = None, polygons_out: Optional[str] = None,
             overwrite: bool = False, within: Optional[Sequence[Dict[str, Any]]] = None,
             within_crs: Optional[str] = None) -> ClassifyResult:
    """Classify ``raster`` (within ``extent``) into ``classes``; see the module doc.

    Without ``out`` the class map (and, with ``options.scores``, the score
    arrays) are returned in memory (refused above :data:`MAX_MEMORY_CELLS`
    cells). With ``out`` (a .tif) they are streamed to a uint8 GeoTIFF with a
    colour table, the class names in its metadata and a QGIS style (.qml)
    beside it; ``scores_out`` writes the per-class scores (float32, one band a
    class); ``polygons_out`` (.gpkg/.geojson) the map vectorised (fields class,
    value, score = mean best score, cells). All outputs, or none on error.
    ``within``: polygons (GeoJSON geometry mappings, in ``within_crs``, default
    the raster's CRS, e.g. from :func:`read_within`): only cells whose centre
    lies inside one are classified, the others are not scored (255); the
    extent becomes the polygons' bounds (within ``extent`` when both are given).
    ``progress(done, total)`` counts tiles; ``cancel`` stops within a batch.
    """
    from .model.dense import dense_unsupported  # deferred: a test replaces it at call time
    t0 = time.perf_counter()
    opts = check(options or ClassifyOptions())
    names = clean_classes(classes)
    for path, suffixes, what in ((out, (".tif", ".tiff"), "class map"),
                                 (scores_out, (".tif", ".tiff"), "scores")):
        if path is not None and Path(path).suffix.lower() not in suffixes:
            raise UsageError(f"the {what} output {path} must be a GeoTIFF", "name it .tif")
    if polygons_out is not None:
        if Path(polygons_out).suffix.lower() not in VECTOR_DRIVERS:
            raise UsageError(f"cannot write polygons to {polygons_out}: unknown format",
                             "name the polygons output .gpkg or .geojson")
        if out is None:
            raise UsageError("polygons need the class map written to a file", "give out= (--out)")
    if scores_out is not None and out is None:
        raise UsageError("scores are written beside the class map", "give out= (--out) too")
    from .raster.reader import raster_files
    check_outputs([("--out", out), ("--scores", scores_out), ("--polygons", polygons_out),
                   ("style", _style_path(out) if out else None)],
                  [("raster", f) for f in raster_files(raster)], overwrite=overwrite)
    from .geo.extent import extent_to_window
    with raster_job(raster, model, extent, extent_crs, options=opts, progress=progress,
                    cancel=cancel) as rj:
        info, area, lm, job, notes = rj.info, rj.area, rj.lm, rj.job, rj.notes
        geoms = None
        if within is not None:
            geoms = _within_in_raster_crs(within, within_crs, info)
            area = area.intersection(extent_to_window(info, _geoms_bounds(geoms)))
            if area.is_empty():
                raise UsageError("the polygons do not overlap the extent",
                                 "give polygons inside the extent, or leave the extent out")
            rj.area = area          # the pass (and its cache key) is over this area
        job.check()
        opts = rj.with_defaults(opts, auto_batch=False)
        check_class_lengths(lm, names, opts.templates)
        bank = build_bank(lm, names, (), opts.templates)
        reason = dense_unsupported(lm)
        method = "dense" if reason is None else "tile"
        if reason:
            notes.append(f"patch-level scores are not available: {reason}; each tile got one "
                         "score per class instead (a coarse map)")
        encoder = _encoder(lm, bank, opts, method)
        hh, hw = encoder[2], encoder[3]
        plan = _plan(info, area, int(opts.tile_px), opts.overlap, opts.read.gsd, hh, hw)
        H, W = plan.shape
        if out is None and H * W * (1 + (len(names) if opts.scores else 0)) > MAX_MEMORY_CELLS:
            raise UsageError(f"the class map would be {W} x {H} cells, too large to hold in memory",
                             "write it to a file (out=, --out), or classify a smaller extent")
        runner = BatchRunner(opts.batch_size)
        colours = class_colours(names)
        counts = np.zeros(256, np.int64)
        mem_map = np.full((H, W), NODATA, np.uint8) if out is None else None
        mem_scores = (np.full((len(names), H, W), np.nan, np.float32)
                      if out is None and opts.scores else None)
        with ExitStack() as stack:
            sinks = []
            tmp_out = tmp_scores = tmp_conf = tmp_poly = None
            if out is not None:
                tmp_out = stack.enter_context(atomic_path(out))
                sinks.append(_Writer(tmp_out, plan, info.crs, 1, "uint8", NODATA))
                stack.callback(sinks[-1].close)
                _describe_class_file(sinks[-1].ds, names, colours, lm.spec, opts.threshold)
            if scores_out is not None:
                tmp_scores = stack.enter_context(atomic_path(scores_out))
                sinks.append(_Writer(tmp_scores, plan, info.crs, len(names), "float32",
                                     float("nan")))
                stack.callback(sinks[-1].close)
                for i, n in enumerate(names, start=1):
                    sinks[-1].ds.set_band_description(i, n)
            if polygons_out is not None:
                tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mapclip-classify-"))
                tmp_conf = Path(tmpdir) / "conf.tif"
                sinks.append(_Writer(tmp_conf, plan, info.crs, 1, "float32", float("nan")))
                stack.callback(sinks[-1].close)
                tmp_poly = stack.enter_context(atomic_path(polygons_out))
            facts = {"skipped": 0}
            for row0, probs in _score_bands(rj, plan, encoder, len(names), opts, runner,
                                            facts):
                cls_band, conf = _classify_band(probs, opts.threshold)
                if geoms is not None:
                    outside = _outside(geoms, plan, row0, cls_band.shape[0])
                    cls_band[outside] = NODATA
                    conf[outside] = np.nan
                    probs[:, outside] = np.nan
                counts += np.bincount(cls_band.ravel(), minlength=256)
                k = cls_band.shape[0]
                if mem_map is not None:
                    mem_map[row0:row0 + k] = cls_band
                if mem_scores is not None:
                    mem_scores[:, row0:row0 + k] = probs
                if out is not None:
                    sinks[0].write(cls_band[None], row0)
                if scores_out is not None:
                    sinks[1].write(probs, row0)
                if tmp_conf is not None:
                    sinks[-1].write(conf[None], row0)
            skipped = facts["skipped"]
            for s in sinks:
                s.close()
            n_poly = 0
            if tmp_poly is not None:
                n_poly = write_polygons(tmp_out, tmp_conf, tmp_poly, names, lm.spec,
                                        driver=VECTOR_DRIVERS[Path(polygons_out).suffix.lower()])
            if out is not None:
                style = _style_path(out)
                with atomic_path(style) as tmp_style:
                    tmp_style.write_text(class_style_qml(names, colours), encoding="utf-8")
        notes.extend(runner.notes)
    count_map = {n: int(counts[i + 1]) for i, n in enumerate(names)}
    count_map[UNKNOWN_NAME] = int(counts[UNKNOWN])
    return ClassifyResult(
        classes=names, colours=colours, class_map=mem_map, scores=mem_scores,
        transform=plan.transform, crs=info.crs, shape=(H, W), cell_px=(plan.cx, plan.cy),
        counts=count_map, tiles=len(plan.grid.tiles), skipped=int(skipped),
        seconds=time.perf_counter() - t0, device=str(lm.device), precision=lm.precision,
        model=lm.spec, method=method, threshold=opts.threshold,
        out=str(out) if out else None, scores_out=str(scores_out) if scores_out else None,
        polygons_out=str(polygons_out) if polygons_out else None,
        style_out=str(_style_path(out)) if out else None, polygons=n_poly if out else 0,
        warnings=notes, cache=rj.cache)


def _within_in_raster_crs(within, within_crs, info) -> List[Dict[str, Any]]:
    geoms = [dict(g) for g in within]
    if not geoms:
        raise UsageError("no polygons given to classify within",
                         "give at least one polygon, or leave them out for the whole extent")
    bad = sorted({str(g.get("type")) for g in geoms} - {"Polygon", "MultiPolygon"})
    if bad:
        raise UsageError(f"classify within needs polygons, not {', '.join(bad)}",
                         "give a polygon layer (areas, not points or lines)")
    if within_crs:
        from rasterio.crs import CRS
        from rasterio.warp import transform_geom
        try:
            src = CRS.from_user_input(within_crs)
        except Exception as exc:
            raise UsageError(f"unknown CRS of the polygons {within_crs!r} ({exc})",
                             "give it as EPSG:N or WKT") from None
        if not info.crs:
            raise UsageError(f"{info.path} has no CRS, so polygons in {within_crs} cannot be placed",
                             "give the polygons in the raster's pixel coordinates, without a CRS")
        dst = CRS.from_wkt(info.crs)
        if src != dst:
            geoms = [transform_geom(src, dst, g) for g in geoms]
    return geoms


def _geoms_bounds(geoms) -> Tuple[float, float, float, float]:
    xs, ys = [], []

    def walk(c):
        if c and isinstance(c[0], (int, float)):
            xs.append(float(c[0]))
            ys.append(float(c[1]))
        else:
            for x in c:
                walk(x)
    for g in geoms:
        walk(g["coordinates"])
    if not xs:
        raise UsageError("the polygons are empty", "give polygons with area")
    return min(xs), min(ys), max(xs), max(ys)


def _outside(geoms, plan: _Plan, row0: int, k: int) -> np.ndarray:
    """True for the cells of output rows [row0, row0 + k) whose centre is in no polygon."""
    from affine import Affine
    from rasterio.features import geometry_mask
    return geometry_mask(geoms, out_shape=(k, plan.shape[1]),
                         transform=plan.transform @ Affine.translation(0, row0))


def read_within(path) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """The polygons of a vector file (.gpkg, .geojson, .shp, ...) as GeoJSON mappings,
    and the file's CRS (WKT, None if it has none), for ``classify(within=...)``."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"polygon file {p} does not exist", "check the path")
    try:
        meta, _, geometry, _ = _pyogrio_raw().read(str(p), read_geometry=True)
    except Exception as exc:
        raise UsageError(f"cannot read polygons from {p} ({str(exc).splitlines()[0] if str(exc) else exc})",
                         "give a GeoPackage, GeoJSON or shapefile of polygons") from None
    geoms: List[Dict[str, Any]] = []
    for wkb in geometry if geometry is not None else ():
        if wkb is not None:
            geoms.extend(read_polygons(bytes(wkb))[0])
    if not geoms:
        raise UsageError(f"{p} holds no polygons", "give a file with at least one polygon")
    return geoms, meta.get("crs")


def _encoder(lm: LoadedModel, bank, opts: ClassifyOptions, method: str):
    """``(features, scores, hh, hw, params)``: ``features`` takes a uint8 batch (B, S, S, 3)
    to what the pass keeps (dense: patch features; tile: one embedding per tile), ``scores``
    those to (B, P, hh, hw) float32 CPU class scores; ``params`` name the pass (engine.rasterjob)."""
    import torch
    import torch.nn.functional as F

    from .model.encode import to_model_input
    P = bank.n_prompts
    if method == "tile":
        hh = hw = 2 * int(opts.upsample)

        def tile_features(arr):
            return F.normalize(lm.model.encode_image(to_model_input(lm, arr)).float(), dim=-1)

        def tile_scores(emb):
            with torch.inference_mode():
                probs, _ = score_embeddings(emb, bank)
            return probs.float().cpu()[:, :, None, None].expand(-1, P, hh, hw).contiguous()
        return tile_features, tile_scores, hh, hw, {"method": "tile"}
    size = int(opts.dense_input_px or lm.image_size)
    if lm.patch_size and size % lm.patch_size:
        raise UsageError(f"dense input {size} px is not a multiple of {lm.arch}'s "
                         f"{lm.patch_size} px patch", f"give a multiple of {lm.patch_size}",
                         option="dense_input_px")
    crop = lm.image_size if opts.dense_slide and size > lm.image_size else None
    g = max(1, size // max(1, lm.patch_size))
    hh = hw = g * int(opts.upsample)
    lam = cls_token_lambda_for(opts.attention, opts.cls_token_lambda)

    def features(arr):
        return dense_features(lm, arr, mode=opts.attention, cls_token_lambda=lam,
                              input_size=size, crop=crop).float()

    def scores(feats):
        with torch.inference_mode():
            probs, _ = score_maps(feats, bank)
            probs = F.interpolate(probs, size=(hh, hw), mode="bilinear", align_corners=False)
        return probs.float().cpu()
    return features, scores, hh, hw, {"method": "dense", "input_px": size, "crop": crop,
                                      "attention": opts.attention,
                                      "cls_token_lambda": lam}


# --------------------------------------------------------------------------- #
# Writing.
# --------------------------------------------------------------------------- #
class _Writer:
    """A GeoTIFF of the plan's cells, written band of rows by band of rows."""

    def __init__(self, path: Path, plan: _Plan, crs, count: int, dtype: str, nodata):
        import rasterio
        H, W = plan.shape
        profile = dict(driver="GTiff", width=W, height=H, count=count, dtype=dtype,
                       transform=plan.transform, nodata=nodata, compress="deflate")
        if crs:
            profile["crs"] = crs
        if H >= 256 and W >= 256:
            profile.update(tiled=True, blockxsize=256, blockysize=256)
        self.W = W
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.ds = rasterio.open(path, "w", **profile)

    def write(self, data: np.ndarray, row0: int) -> None:
        from rasterio.windows import Window
        self.ds.write(data, window=Window(0, row0, self.W, data.shape[1]))

    def close(self) -> None:
        if self.ds is not None and not self.ds.closed:
            self.ds.close()


def _describe_class_file(ds, names: Sequence[str], colours, model: str,
                         threshold: Optional[float]) -> None:
    cmap = {UNKNOWN: UNKNOWN_COLOUR + (255,)}
    for i, c in enumerate(colours, start=1):
        cmap[i] = tuple(c) + (255,)
    ds.write_colormap(1, cmap)
    ds.set_band_description(1, "class")
    tags = {"MAPCLIP_CLASSES": json.dumps(list(names)), "MAPCLIP_MODEL": model,
            "MAPCLIP_UNKNOWN": str(UNKNOWN), "MAPCLIP_THRESHOLD": "" if threshold is None
            else str(threshold)}
    tags.update({f"CLASS_{i}": n for i, n in enumerate(names, start=1)})
    tags[f"CLASS_{UNKNOWN}"] = UNKNOWN_NAME
    ds.update_tags(**tags)


def _style_path(out) -> Path:
    return Path(out).with_suffix(".qml")


def class_style_qml(names: Sequence[str], colours) -> str:
    """A QGIS paletted-raster style: one legend entry per class, plus "unknown"."""
    from xml.sax.saxutils import quoteattr
    entries = [f'        <paletteEntry value="{UNKNOWN}" color="#%02x%02x%02x" alpha="255" '
               f'label={quoteattr(UNKNOWN_NAME)}/>' % UNKNOWN_COLOUR]
    for i, (n, c) in enumerate(zip(names, colours), start=1):
        entries.append(f'        <paletteEntry value="{i}" color="#%02x%02x%02x" alpha="255" '
                       f'label={quoteattr(n)}/>' % tuple(c))
    body = "\n".join(entries)
    return ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
            '<qgis version="3.22.0" styleCategories="AllStyleCategories">\n'
            "  <pipe>\n"
            '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" '
            'nodataColor="">\n'
            "      <rasterTransparency/>\n"
            "      <minMaxOrigin><limits>None</limits><extent>WholeRaster</extent>"
            "<statAccuracy>Estimated</statAccuracy><cumulativeCutLower>0.02</cumulativeCutLower>"
            "<cumulativeCutUpper>0.98</cumulativeCutUpper><stdDevFactor>2</stdDevFactor>"
            "</minMaxOrigin>\n"
            "      <colorPalette>\n" + body + "\n      </colorPalette>\n"
            "      <colorramp type=\"randomcolors\" name=\"[source]\"/>\n"
            "    </rasterrenderer>\n"
            "    <brightnesscontrast brightness=\"0\" contrast=\"0\" gamma=\"1\"/>\n"
            "    <huesaturation saturation=\"0\" colorizeOn=\"0\" grayscaleMode=\"0\" "
            "colorizeRed=\"255\" colorizeGreen=\"128\" colorizeBlue=\"128\" colorizeStrength=\"100\"/>\n"
            "    <rasterresampler maxOversampling=\"2\"/>\n"
            "  </pipe>\n"
            "  <blendMode>0</blendMode>\n"
            "</qgis>\n")


def read_class_names(path) -> List[str]:
    """The class names of a class map written by :func:`classify` (value i+1 = names[i])."""
    import rasterio
    with rasterio.open(path) as ds:
        raw = ds.tags().get("MAPCLIP_CLASSES")
    if not raw:
        raise UsageError(f"{path} is not a MapCLIP class map (no class names in its metadata)",
                         "give a GeoTIFF written by `python -m engine classify`")
    return list(json.loads(raw))


def write_polygons(class_tif, conf_tif, path, names: Sequence[str], model: str,
                   driver: str = "GPKG") -> int:
    """Vectorise a class map (rasterio.features.shapes, 4-connected) into ``path``.

    Each polygon: ``class`` (name), ``value`` (the map value), ``score`` (the mean
    best-class score of its cells), ``cells``, ``model``. Unknown cells are
    polygons of class "unknown"; unscored cells are left out. Returns the count.
    The map is read whole: one byte (plus four for labels, four for scores) per
    cell, a cell being many native pixels.
    """
    import cv2
    import rasterio
    from rasterio.features import shapes

    with rasterio.open(class_tif) as ds:
        cls = ds.read(1)
        tf, crs = ds.transform, ds.crs
    with rasterio.open(conf_tif) as ds:
        conf = ds.read(1)
    labels = np.zeros(cls.shape, np.int32)
    label_value: List[int] = [0]
    for v in np.unique(cls):
        if v == NODATA:
            continue
        n, lab = cv2.connectedComponents((cls == v).astype(np.uint8), connectivity=4,
                                         ltype=cv2.CV_32S)
        if n <= 1:
            continue
        base = len(label_value) - 1
        sel = lab > 0
        labels[sel] = lab[sel] + base
        label_value.extend([int(v)] * (n - 1))
    n_labels = len(label_value)
    cells = np.bincount(labels.ravel(), minlength=n_labels)
    sums = np.bincount(labels.ravel(), weights=np.nan_to_num(conf, nan=0.0).ravel().astype(np.float64),
                       minlength=n_labels)
    geoms, rows = [], []
    for geom, lab in shapes(labels, mask=labels > 0, connectivity=4, transform=tf):
        lab = int(lab)
        v = label_value[lab]
        geoms.append(rings_wkb(geom["coordinates"]))
        rows.append({"class": UNKNOWN_NAME if v == UNKNOWN else names[v - 1], "value": v,
                     "score": float(sums[lab] / cells[lab]) if cells[lab] else float("nan"),
                     "cells": int(cells[lab]), "model": model})
    write_features(path, CLASS_FIELDS, rows, geoms, crs.to_wkt() if crs else None, "classes", driver)
    return len(geoms)


# --------------------------------------------------------------------------- #
# Quality against a reference mask.
# --------------------------------------------------------------------------- #
def compare_to_mask(class_map: np.ndarray, transform, mask_path,
                    values: Sequence[Sequence[int]], names: Sequence[str]) -> Dict[str, Any]:
    """Pixel accuracy, per-class IoU and mIoU of a class map against a reference mask file
    (engine.data.metrics.mask_agreement: ``values[i]`` lists the mask values that are
    class ``names[i]``, map value i + 1)."""
    import rasterio

    with rasterio.open(mask_path) as ds:
        mask = ds.read(1)
        mtf = ds.transform
    return mask_agreement(class_map, transform, mask, mtf, values, names, NODATA)
