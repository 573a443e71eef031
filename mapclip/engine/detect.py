"""Text prompts -> scored, georeferenced boxes and a heatmap over a raster.

Two methods (``DetectOptions.mode``):

``"window"`` (the method of Ibaraki's thesis, made fast)
    The extent is cut into base tiles of ``tile_px`` pixels; windows of
    ``window`` x ``window`` tiles slide over them ``stride`` tiles at a time.
    Each base tile is read ONCE (by the reader threads of engine.raster.reader) and
    pasted into a band of tile rows on the model's device; every window is a
    slice of that band, resized and normalised on the device, and scored in
    batches against prompts encoded once. Overlapping high-scoring windows
    are merged into one box per object (``merge="nms"``, or ``"union"``
    which grows the kept window to the union of its strong neighbours).
    Windows at the raster's right/bottom edge are shifted inward, so every
    pixel of the extent is in some window and no window leaves the raster.

``"dense"`` (training-free dense CLIP, see engine.model.dense)
    Tiles of ``tile_px`` pixels overlapping by ``overlap`` of a tile give one
    patch-level score map each in one forward pass; maps are upsampled
    (x2), weighted by a linear ramp toward tile borders and blended into one
    heatmap for the extent. Boxes are the connected components of
    ``heatmap >= threshold`` (default 0.5). Models without ViT patch tokens
    (ResNets) fall back to window mode, with a warning in the result.

Fitting boxes to objects (``DetectOptions.refine``, on by default, both modes)
    A window (or a dense component) is larger than the object it found, so
    its IoU with the object is small even when it is in the right place. Each
    kept box is read again with a margin of a quarter of its side; the
    class-agnostic regions of that image that stand out from its median
    colour (engine.geo.boxes.object_proposals), are centred inside the box and
    cover 15-150 % of its area are proposals; each proposal, with a quarter
    of its size of context, is scored by the model against the same prompts,
    and the best replaces the box if its score keeps ``refine_min`` (default 0.3) of the box's score.
    The box keeps its score and rank; fitted boxes that now cover the same
    object (IoU > 0.5) are one. Turn it off (``refine=False``, CLI
    ``--no-refine``) for window-sized boxes.

Scores (engine.model.scoring): the softmax share of each prompt among the prompts
and the background prompts, with the model's logit scale; the raw cosine is
reported too. Ties in the (often saturated) softmax are broken by cosine.

Geometry: all box arithmetic is in native raster pixels; map bounds come
from the raster's affine transform (engine.geo.boxes.pixel_to_bounds), so boxes
are exact in the raster's CRS. The heatmap is returned with its own affine
transform (one cell per base tile in window mode, per half patch in dense
mode), cropped to the cells that touch the extent; cells never scored are NaN.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .geo.boxes import heatmap_components, nms, object_proposals, pixel_to_bounds, union_merge
from .core.errors import UsageError
from .core.jobs import Job
from .core.options import DetectOptions, check
from .core.outputs import BOX_FIELDS, box_rows, write_heatmap_tif, write_vector
from .dense_pass import crop_heat, dense_heatmap, tile_grid
from .model.batching import BatchRunner
from .model.scoring import PromptBank, Scorer
from .geo.tiling import PixelWindow
from .model import accel
from .model.scoring import build_bank, example_scorer
from .rasterjob import raster_job

if TYPE_CHECKING:  # torch, rasterio and open_clip load on first use, not on import
    import torch

    from .model.models import LoadedModel


#: fitting boxes: margin read around a box (share of its side), least area of a
#: proposal and most (shares of the box's), context around a proposal when it is scored
#: (share of its side), IoU above which two fitted boxes are one object
REFINE_MARGIN = 0.25
REFINE_MIN_AREA = 0.15
REFINE_MAX_AREA = 1.5
REFINE_CONTEXT = 0.25
REFINE_SAME_IOU = 0.5
#: window mode: least seconds between two previews of the boxes found so far
PREVIEW_SECONDS = 2.0


@dataclass
class Box:
    """One detection: prompt, scores and where it is."""

    prompt: str
    score: float
    cosine: float
    rank: int
    bounds: Tuple[float, float, float, float]   # raster CRS
    pixel: Tuple[int, int, int, int]            # col0, row0, col1, row1 native pixels

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["bounds"] = list(self.bounds)
        d["pixel"] = list(self.pixel)
        return d


@dataclass
class DetectResult:
    """Boxes (best first per prompt), heatmap and run facts."""

    boxes: List[Box]
    crs: Optional[str]
    heatmap: Optional[np.ndarray]          # (P, H, W) float32 softmax score per prompt, NaN = unscored
    heatmap_transform: Any                 # affine.Affine of the heatmap cells
    tiles: int
    windows: int
    skipped: int
    seconds: float
    device: str
    precision: str
    model: str
    mode: str = "window"
    refined: int = 0                       # boxes fitted to the object inside them
    prompts: List[str] = field(default_factory=list)
    background: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    cache: str = "off"                     # where the embeddings came from (engine.rasterjob.CACHE_STATES)

    @property
    def from_cache(self) -> bool:
        return self.cache in ("memory", "disk")

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> Dict[str, Any]:
        return {
            "mode": self.mode, "model": self.model, "device": self.device,
            "precision": self.precision, "prompts": list(self.prompts),
            "background": list(self.background), "crs": self.crs,
            "tiles": self.tiles, "windows": self.windows, "skipped": self.skipped,
            "refined": self.refined, "cache": self.cache, "from_cache": self.from_cache,
            "seconds": round(self.seconds, 4), "tiles_per_s": round(self.tiles_per_s, 2),
            "windows_per_s": round(self.windows / self.seconds, 2) if self.seconds > 0 else 0.0,
            "boxes": [b.to_json() for b in self.boxes],
            "heatmap_shape": list(self.heatmap.shape) if self.heatmap is not None else None,
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------- #
# Public API.
# --------------------------------------------------------------------------- #
def detect(raster: str, prompts: Sequence[str], model: Union[str, LoadedModel],
           extent: Optional[Tuple[float, float, float, float]] = None,
           extent_crs: Optional[str] = None, options: Optional[DetectOptions] = None,
           progress=None, cancel=None, preview=None, examples=None,
           examples_crs: Optional[str] = None) -> DetectResult:
    """Score ``raster`` (within ``extent``) against ``prompts``; see the module doc.

    ``model`` is a spec for :func:`engine.model.models.load_model` or a loaded
    model. ``progress(done, total)`` is called once per batch (windows in
    window mode, tiles in dense mode); setting ``cancel`` stops the run
    within one batch (raising :class:`engine.core.errors.Cancelled`).
    ``preview(boxes, done, total)``, in window mode, is called during a pass over the
    raster at most every :data:`PREVIEW_SECONDS` with the best boxes so far (merged,
    not yet fitted), so a front end can show them while the pass goes on.
    ``examples`` (engine.data.examples.Example: places marked 1 "what I mean" / 0 "not
    this", in ``examples_crs``, default the raster's) move each prompt's text embedding
    toward the windows at the positives and away from those at the negatives
    (``options.examples_method``, engine.model.scoring.refine_query) before windows are
    ranked; window mode only. With a kept pass no pixel is read again.
    """
    from .model.dense import dense_unsupported  # deferred: a test replaces it at call time
    from .model.encode import clean_prompts
    t0 = time.perf_counter()
    opts = check(options or DetectOptions())
    prompts = clean_prompts(prompts)
    with raster_job(raster, model, extent, extent_crs, options=opts, progress=progress,
                    cancel=cancel) as rj:
        lm, info = rj.lm, rj.info
        opts = rj.with_defaults(opts, auto_batch=opts.mode == "window" or opts.dense_input_px is None)
        bank = build_bank(lm, prompts, opts.background, getattr(opts, "templates", None))
        mode = opts.mode
        if mode == "dense":
            reason = dense_unsupported(lm)
            if reason:
                rj.notes.append(f"dense mode is not available: {reason}; used window mode instead")
                mode = "window"
        runner = BatchRunner(opts.batch_size)
        scoring = {"scorer": Scorer(bank),
                   "examples": _examples_in_pixels(rj, examples, examples_crs, mode)}
        run = _run_window if mode == "window" else _run_dense
        boxes, heat, heat_tf, n_tiles, n_windows, skipped = run(rj, bank, opts, runner, preview,
                                                                scoring)
        bank = scoring["scorer"].bank   # moved by the examples, when there are any
        refined = 0
        if opts.refine and boxes:
            boxes, refined = _refine(rj.reader, boxes, lm, scoring["scorer"], opts, rj.job, runner)
        notes = rj.notes
        notes.extend(runner.notes)
        notes.extend(n for n in accel.notes(lm) if n not in notes)
    return DetectResult(boxes=boxes, crs=info.crs, heatmap=heat, heatmap_transform=heat_tf,
                        tiles=n_tiles, windows=n_windows, skipped=skipped,
                        seconds=time.perf_counter() - t0, device=str(lm.device),
                        precision=lm.precision, model=lm.spec, mode=mode, refined=refined,
                        prompts=list(bank.prompts), background=list(bank.background),
                        warnings=notes, cache=rj.cache)


def _make_boxes(prompt: str, pix: np.ndarray, scores: np.ndarray, cosine: np.ndarray,
                transform, raster_size: Tuple[int, int], start_rank: int = 1) -> List[Box]:
    out = []
    w, h = raster_size
    for k in range(len(scores)):
        c0, r0, c1, r1 = (int(round(v)) for v in pix[k])
        c0, r0 = max(0, c0), max(0, r0)
        c1, r1 = min(w, c1), min(h, r1)
        out.append(Box(prompt, float(scores[k]), float(cosine[k]), start_rank + k,
                       pixel_to_bounds(transform, (c0, r0, c1, r1)), (c0, r0, c1, r1)))
    return out


# --------------------------------------------------------------------------- #
# Window mode.
# --------------------------------------------------------------------------- #
def _window_starts(n: int, k: int, stride: int) -> List[int]:
    """First tile index of each window along an axis of ``n`` tiles (last one flush)."""
    k = min(k, n)
    starts = list(range(0, n - k + 1, stride))
    if starts[-1] != n - k:
        starts.append(n - k)
    return starts


def _examples_in_pixels(rj, examples, examples_crs, mode: str):
    """Examples as (col, row, positive) in raster pixels; those outside the area are left
    out with a note. None without examples."""
    if not examples:
        return None
    if mode != "window":
        raise UsageError("examples refine window-mode searches only",
                         "search in window mode (--mode window) to use examples", option="examples")
    from .geo.extent import places_to_pixels
    area = rj.area
    pixels = places_to_pixels(rj.info, [e.x for e in examples], [e.y for e in examples], examples_crs)
    out, outside = [], 0
    for (c, r), e in zip(pixels, examples):
        if area.col <= c < area.col_end and area.row <= r < area.row_end:
            out.append((c, r, bool(e.positive)))
        else:
            outside += 1
    if outside:
        rj.notes.append(f"{outside} of {len(examples)} examples lie outside the searched area "
                        "and were not used")
    if not out:
        raise UsageError("no example lies inside the searched area",
                         "mark places inside the area you search", option="examples")
    return out


def _example_scorer(bank: PromptBank, boxes: np.ndarray, emb, examples, method: str,
                    notes: List[str]):
    """The scorer of ``bank`` refined by the windows at the examples (the window holding
    the place whose centre is nearest to it; engine.model.scoring.example_scorer)."""
    import torch

    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    pos, neg = [], []
    for c, r, positive in examples:
        inside = np.flatnonzero((boxes[:, 0] <= c) & (c < boxes[:, 2]) & (boxes[:, 1] <= r) & (r < boxes[:, 3]))
        if not len(inside):
            continue                 # on a skipped (nodata) window
        k = inside[np.argmin((cx[inside] - c) ** 2 + (cy[inside] - r) ** 2)]
        (pos if positive else neg).append(int(k))
    if not pos and not neg:
        notes.append("no example lies on a scored window; the prompts were used as typed")
        return Scorer(bank)
    emb = torch.as_tensor(emb)
    notes.append(f"refined by {len(pos)} positive and {len(neg)} negative examples ({method})")
    return example_scorer(bank, emb[pos] if pos else None, emb[neg] if neg else None, method)


def _run_window(rj, bank: PromptBank, opts: DetectOptions, runner: BatchRunner, preview,  # long: one streaming pass
                scoring: Dict[str, Any]):
    """Score every window (module doc). The windows' embeddings are one pass
    (engine.rasterjob): kept after the first run, every later prompt on the same
    extent scores the kept vectors without reading or encoding anything."""
    import torch
    import torch.nn.functional as F

    from .model.encode import to_model_input
    from .raster.stream import iter_tile_batches
    info, area, lm, job = rj.info, rj.area, rj.lm, rj.job
    grid = tile_grid(info, area, opts)
    cov = grid.covered()
    S = grid.out_px
    sx, sy = S / grid.tile_width, S / grid.tile_height          # mosaic px per native px
    posx = [int(round((c - cov.col) * sx)) for c in grid.col_starts]
    posy = [int(round((r - cov.row) * sy)) for r in grid.row_starts]
    Wm, Hm = posx[-1] + S, posy[-1] + S                         # mosaic of the covered window
    k = int(opts.window)
    wx, wy = min(k * S, Wm), min(k * S, Hm)                     # window size in mosaic px
    xs = list(dict.fromkeys(min(posx[j], Wm - wx) for j in _window_starts(grid.n_cols, k, opts.stride)))
    ys = list(dict.fromkeys(min(posy[i], Hm - wy) for i in _window_starts(grid.n_rows, k, opts.stride)))

    def overlapping(pos: List[int], a: int, size: int) -> List[int]:
        return [t for t, p in enumerate(pos) if p < a + size and p + S > a]

    cols_of = [overlapping(posx, x0, wx) for x0 in xs]
    rows_of = [overlapping(posy, y0, wy) for y0 in ys]
    last_need = {}
    for a, rows in enumerate(rows_of):
        for r in rows:
            last_need[r] = a
    job.set_total(len(xs) * len(ys))

    dev = lm.device
    P = bank.n_prompts
    strips: Dict[int, torch.Tensor] = {}
    valid = np.zeros((grid.n_rows, grid.n_cols), bool)
    win_boxes: List[np.ndarray] = []
    win_probs: List[np.ndarray] = []
    win_cos: List[np.ndarray] = []
    pending: List[torch.Tensor] = []
    pending_meta: List[Tuple[int, int]] = []
    cell_cols = math.ceil(Wm / S)
    cell_rows = math.ceil(Hm / S)
    heat = np.full((P, cell_rows, cell_cols), -1.0, np.float32) if opts.heatmap else None
    cell_cx = (np.arange(cell_cols) * S + np.minimum(np.arange(1, cell_cols + 1) * S, Wm)) / 2.0
    cell_cy = (np.arange(cell_rows) * S + np.minimum(np.arange(1, cell_rows + 1) * S, Hm)) / 2.0
    # the pass kept for later prompts: window positions and embeddings, in scoring order
    key = rj.key("detect-window", {"tile_px": int(opts.tile_px), "window": k, "stride": int(opts.stride),
                                   "min_valid": float(opts.min_valid)})
    recorder = rj.recorder(key)

    def encode(batch: torch.Tensor):
        return F.normalize(accel.encode_image(lm, to_model_input(lm, batch)).float(), dim=-1)

    examples = scoring.get("examples")
    held: List[Tuple[np.ndarray, torch.Tensor]] = []    # with examples: scored after the pass

    def native_boxes(meta) -> np.ndarray:
        """Windows at mosaic positions ``meta`` as native pixel boxes."""
        m = np.asarray(meta, np.float64).reshape(-1, 2)
        return np.column_stack([cov.col + m[:, 0] / sx, cov.row + m[:, 1] / sy,
                                cov.col + (m[:, 0] + wx) / sx, cov.row + (m[:, 1] + wy) / sy])

    def consume(meta, emb: torch.Tensor) -> None:
        """Scores, boxes and heat of windows at mosaic positions ``meta`` from their embeddings."""
        if examples is not None and not scoring.get("ready"):
            held.append((np.asarray(meta, np.int64).reshape(-1, 2), emb.cpu()))
            return
        probs, cos = scoring["scorer"](emb)
        probs, cos = probs.cpu().numpy(), cos.cpu().numpy()
        boxes = native_boxes(meta)
        win_boxes.append(boxes)
        win_probs.append(probs)
        win_cos.append(cos)
        if heat is not None:
            for (x0, y0), pr in zip(meta, probs):
                # cells whose centre (of the part inside the raster) the window covers
                j0, j1 = np.searchsorted(cell_cx, [x0, x0 + wx])
                i0, i1 = np.searchsorted(cell_cy, [y0, y0 + wy])
                view = heat[:, i0:i1, j0:j1]
                np.maximum(view, pr[:, None, None], out=view)

    def flush(force: bool = False) -> None:
        nonlocal pending, pending_meta
        while pending and (force or len(pending) >= opts.batch_size):
            take = pending[:opts.batch_size]
            meta = pending_meta[:opts.batch_size]
            pending, pending_meta = pending[opts.batch_size:], pending_meta[opts.batch_size:]
            with torch.inference_mode():
                emb = runner(encode, torch.stack(take))
                consume(meta, emb)
            recorder.add(np.asarray(meta, np.int64).reshape(-1, 2), emb)
            job.step(len(take))
            show_preview()

    last_preview = [time.perf_counter()]

    def show_preview() -> None:
        if preview is None or examples is not None or time.perf_counter() - last_preview[0] < PREVIEW_SECONDS:
            return
        so_far = _window_boxes(np.concatenate(win_boxes), np.concatenate(win_probs),
                               np.concatenate(win_cos), scoring["scorer"], opts, info)
        preview(so_far, job.done, job.total)
        last_preview[0] = time.perf_counter()

    def window_row(a: int) -> None:
        y0 = ys[a]
        parts = []   # (strip, first row, end row, top) of the tile rows this window row covers
        for r in rows_of[a]:
            strip = strips.get(r)
            if strip is None:
                continue
            top = posy[r] - y0
            parts.append((strip, max(0, -top), min(S, wy - top), top))
        rows = rows_of[a]
        skipped_here = 0
        for j, x0 in enumerate(xs):
            cells = valid[np.ix_(rows, cols_of[j])]
            if cells.mean() < 0.5:
                skipped_here += 1
                continue
            # each window is cut from the strips on its own: no full-width band, so
            # memory does not grow with the raster's width (issue 16)
            win = torch.zeros((wy, wx, 3), dtype=torch.uint8, device=dev)
            for strip, s0, s1, top in parts:
                win[top + s0: top + s1] = strip[s0:s1, x0:x0 + wx]
            pending.append(win)
            pending_meta.append((x0, y0))
            if len(pending) >= opts.batch_size:
                flush()
        if skipped_here:
            job.step(skipped_here)
        flush()
        for r in rows:
            if last_need.get(r) == a:
                strips.pop(r, None)

    hit = rj.cached(key)
    if hit is not None:
        meta_all, emb_all = hit.arrays["rows"], hit.arrays["values"]
        skipped = int(hit.meta["skipped"])
        with torch.inference_mode():     # the same chunks as the pass that kept them
            for i in range(0, len(meta_all), opts.batch_size):
                consume(meta_all[i:i + opts.batch_size].tolist(),
                        torch.from_numpy(emb_all[i:i + opts.batch_size]).to(dev))
        job.step(len(xs) * len(ys))
    else:
        next_row = 0
        batches = iter_tile_batches(rj.reader, grid.tiles, opts.batch_size, job=job,
                                    prefetch=opts.prefetch, workers=opts.workers,
                                    min_valid=opts.min_valid)
        with batches:
            for tiles, arr in batches:
                data = torch.from_numpy(arr)
                if dev.type == "cuda":
                    data = data.pin_memory().to(dev, non_blocking=True)
                for t, img in zip(tiles, data):
                    r, c = divmod(t.index, grid.n_cols)
                    strip = strips.get(r)
                    if strip is None:
                        strip = strips[r] = torch.zeros((S, Wm, 3), dtype=torch.uint8, device=dev)
                    strip[:, posx[c]:posx[c] + S] = img
                    valid[r, c] = True
                done_rows = tiles[-1].index // grid.n_cols  # rows before this one are complete
                while next_row < len(ys) and max(rows_of[next_row]) < done_rows:
                    window_row(next_row)
                    next_row += 1
                job.check()
            skipped = batches.skipped
        while next_row < len(ys):
            window_row(next_row)
            next_row += 1
        flush(force=True)
        recorder.keep({"skipped": int(skipped)})

    if examples is not None and held:     # move the prompts, then score every window
        meta_all = np.concatenate([m for m, _ in held])
        emb_all = torch.cat([e for _, e in held])
        scoring["scorer"] = _example_scorer(bank, native_boxes(meta_all), emb_all, examples,
                                            opts.examples_method, rj.notes)
        bank = scoring["scorer"].bank
        scoring["ready"] = True
        with torch.inference_mode():
            for i in range(0, len(meta_all), opts.batch_size):
                consume(meta_all[i:i + opts.batch_size].tolist(),
                        emb_all[i:i + opts.batch_size].to(dev))
    boxes_all = np.concatenate(win_boxes) if win_boxes else np.zeros((0, 4))
    probs_all = np.concatenate(win_probs) if win_probs else np.zeros((0, P), np.float32)
    cos_all = np.concatenate(win_cos) if win_cos else np.zeros((0, P), np.float32)
    out_boxes = _window_boxes(boxes_all, probs_all, cos_all, scoring["scorer"], opts, info)
    heat_out, heat_tf = None, None
    if heat is not None:
        heat[heat < 0] = np.nan
        heat_out, heat_tf = crop_heat(heat, (cov.col, cov.row), (S / sx, S / sy), area,
                                       info.transform)
    return out_boxes, heat_out, heat_tf, len(grid.tiles), len(boxes_all), skipped


def _window_boxes(boxes_all: np.ndarray, probs_all: np.ndarray, cos_all: np.ndarray,
                  scorer: Scorer, opts: DetectOptions, info) -> List[Box]:
    """Scored windows (native px) -> the boxes of each prompt, merged, best first."""
    out_boxes: List[Box] = []
    threshold = scorer.threshold(opts.threshold)
    for p, prompt in enumerate(scorer.bank.prompts):
        sc, co = probs_all[:, p].astype(np.float64), cos_all[:, p].astype(np.float64)
        keep_idx = np.arange(len(sc))
        if threshold is not None:
            keep_idx = keep_idx[sc >= threshold]
        if not len(keep_idx):
            continue
        b, s, c = boxes_all[keep_idx], sc[keep_idx], co[keep_idx]
        if opts.merge == "nms":
            kept = nms(b, s, iou=opts.iou, max_keep=opts.top_k, tiebreak=c)
            pix, s, c = b[kept], s[kept], c[kept]
        else:
            pix, _, seeds = union_merge(b, s, iou=opts.iou, max_keep=opts.top_k, tiebreak=c)
            s, c = s[seeds], c[seeds]
        out_boxes.extend(_make_boxes(prompt, pix, s, c, info.transform, (info.width, info.height)))
    return out_boxes


# --------------------------------------------------------------------------- #
# Dense mode.
# --------------------------------------------------------------------------- #
def _run_dense(rj, bank: PromptBank, opts: DetectOptions, runner: BatchRunner, preview,
               scoring: Dict[str, Any]):
    dh = dense_heatmap(rj, bank, opts, runner)
    heat_a, cos_a, info = dh.heat, dh.cosine, rj.info
    (base_c, base_r), (cx, cy) = dh.origin, dh.cell
    thr = opts.threshold
    out_boxes: List[Box] = []
    for p, prompt in enumerate(bank.prompts):
        comps = heatmap_components(heat_a[p], thr)[:opts.top_k]
        if not comps:
            continue
        pix = np.array([[base_c + c.box[0] * cx, base_r + c.box[1] * cy,
                         base_c + c.box[2] * cx, base_r + c.box[3] * cy] for c in comps])
        pix = np.column_stack([np.floor(pix[:, 0]), np.floor(pix[:, 1]),
                               np.ceil(pix[:, 2]), np.ceil(pix[:, 3])])
        scores = np.array([c.peak for c in comps])
        cosines = []
        for c in comps:
            x0, y0, x1, y1 = c.box
            sub_h = heat_a[p, y0:y1, x0:x1]
            sub_c = cos_a[p, y0:y1, x0:x1]
            mask = np.nan_to_num(sub_h, nan=-1.0) >= thr
            cosines.append(float(np.nanmax(np.where(mask, sub_c, np.nan))))
        out_boxes.extend(_make_boxes(prompt, pix, scores, np.array(cosines), info.transform,
                                     (info.width, info.height)))
    return (out_boxes, heat_a if opts.heatmap else None, dh.transform if opts.heatmap else None,
            dh.tiles, 0, dh.skipped)


# --------------------------------------------------------------------------- #
# Fitting boxes to objects.
# --------------------------------------------------------------------------- #
def _proposals_for(reader, box: Box) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Proposals (native px) centred inside ``box`` and their crops with context."""
    info = reader.info
    c0, r0, c1, r1 = box.pixel
    m = int(round(REFINE_MARGIN * max(c1 - c0, r1 - r0)))
    x0, y0 = max(0, c0 - m), max(0, r0 - m)
    x1, y1 = min(info.width, c1 + m), min(info.height, r1 + m)
    if x1 - x0 < 8 or y1 - y0 < 8:
        return np.zeros((0, 4)), []
    rgb, _ = reader.read(PixelWindow(x0, y0, x1 - x0, y1 - y0))
    props = object_proposals(rgb) + np.array([x0, y0, x0, y0])
    centre_c = (props[:, 0] + props[:, 2]) / 2.0
    centre_r = (props[:, 1] + props[:, 3]) / 2.0
    area = (props[:, 2] - props[:, 0]) * (props[:, 3] - props[:, 1])
    ok = ((centre_c >= c0) & (centre_c <= c1) & (centre_r >= r0) & (centre_r <= r1)
          & (area >= REFINE_MIN_AREA * max(1, (c1 - c0) * (r1 - r0)))
          & (area <= REFINE_MAX_AREA * (c1 - c0) * (r1 - r0)))
    props = props[ok]
    crops = []
    for a0, b0, a1, b1 in props:
        pc, pr = REFINE_CONTEXT * (a1 - a0), REFINE_CONTEXT * (b1 - b0)
        q0, q1 = int(max(x0, a0 - pc)), int(min(x1, a1 + pc))
        p0, p1 = int(max(y0, b0 - pr)), int(min(y1, b1 + pr))
        crops.append(rgb[p0 - y0:p1 - y0, q0 - x0:q1 - x0])
    return props, crops


def _refine(reader, boxes: List[Box], lm, scorer: Scorer, opts: DetectOptions, job: Job,
            runner: BatchRunner) -> Tuple[List[Box], int]:
    """Each box fitted to the best-scoring object proposal inside it (module doc), scored
    as the search scored its windows (``scorer``: the prompts, refined by any examples)."""
    import torch
    import torch.nn.functional as F

    from .model.encode import to_model_input
    info = reader.info
    which = {p: i for i, p in enumerate(scorer.bank.prompts)}
    owner: List[int] = []
    props_all: List[np.ndarray] = []
    inputs: List[torch.Tensor] = []
    for bi, b in enumerate(boxes):
        job.check()
        props, crops = _proposals_for(reader, b)
        for prop, crop in zip(props, crops):
            owner.append(bi)
            props_all.append(prop)
            inputs.append(to_model_input(lm, np.ascontiguousarray(crop)[None])[0])
    if not inputs:
        return boxes, 0

    def encode(batch: torch.Tensor):
        return scorer(F.normalize(accel.encode_image(lm, batch).float(), dim=-1))

    with torch.inference_mode():
        probs, cos = runner(encode, torch.stack(inputs))
    probs, cos = probs.cpu().numpy(), cos.cpu().numpy()
    best: Dict[int, Tuple[float, float, np.ndarray]] = {}
    for k, bi in enumerate(owner):
        p = which[boxes[bi].prompt]
        cand = (float(probs[k, p]), float(cos[k, p]), props_all[k])
        if bi not in best or cand[:2] > best[bi][:2]:
            best[bi] = cand
    fitted: List[Box] = []
    n_fit = 0
    for bi, b in enumerate(boxes):
        got = best.get(bi)
        if got is not None and got[0] >= opts.refine_min * b.score:
            pix = tuple(int(v) for v in got[2])
            b = Box(b.prompt, b.score, b.cosine, b.rank, pixel_to_bounds(info.transform, pix), pix)
            n_fit += 1
        fitted.append(b)
    out: List[Box] = []
    for prompt in scorer.bank.prompts:
        mine = [b for b in fitted if b.prompt == prompt]
        if not mine:
            continue
        keep = nms(np.array([b.pixel for b in mine], np.float64), np.array([b.score for b in mine]),
                   iou=REFINE_SAME_IOU, tiebreak=np.array([b.cosine for b in mine]))
        for rank, i in enumerate(keep, start=1):
            b = mine[i]
            out.append(Box(b.prompt, b.score, b.cosine, rank, b.bounds, b.pixel))
    return out, n_fit


# --------------------------------------------------------------------------- #
# Writing results.
# --------------------------------------------------------------------------- #
def write_boxes(result: DetectResult, path, overwrite: bool = False) -> Path:
    """Write the boxes as polygons (.gpkg or .geojson) in the raster's CRS, atomically
    (fields: engine.core.outputs.BOX_FIELDS); an existing file is refused unless ``overwrite``."""
    rows, bounds = box_rows(result.boxes, result.model)
    return write_vector(path, BOX_FIELDS, rows, bounds, result.crs, "detections", overwrite)


def write_heatmap(result: DetectResult, path, overwrite: bool = False) -> Path:
    """Write the heatmap as a float32 GeoTIFF, one band per prompt (NaN = not scored)."""
    if result.heatmap is None:
        raise UsageError("this result has no heatmap", "run detect with heatmap=True")
    return write_heatmap_tif(result.heatmap, result.heatmap_transform, result.crs,
                             result.prompts, path, overwrite)
