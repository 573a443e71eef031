"""Counting objects of one kind in a raster extent, two ways.

``prompt`` (RemoteCLIP's RemoteCount protocol)
    The image is scored against ten captions "there are {n} {objects} in the
    image", n = 1..10, in two variants: number words ("there are three
    ships in the image") and digits ("there are 3 ships in the image"), with
    correct agreement for one ("there is one ship in the image"). A count's
    score is the mean cosine of its two captions; the argmax is the count.
    The image is the whole extent read as one window (resampled to the
    model's input, the protocol's setting) or, with ``tile_px``, every tile
    of a grid over the extent; tile counts are summed, and tiles then also
    get an n = 0 caption ("there are no ships in the image"), since most
    tiles of a large scene hold none (an extension of the protocol, on by
    default only for tiles: ``CountOptions.zero``).

``dense``
    The dense heatmap (:func:`engine.dense_pass.dense_heatmap`, the pass of
    detect's dense mode) for the object's name; models without ViT patch
    tokens cannot give one and are refused; the count is the number of peaks of the heatmap at
    least ``peak_distance`` cells apart (default 2) inside the connected
    components of ``heatmap >= threshold`` (default
    :data:`engine.core.options.DENSE_THRESHOLD`) of at least ``min_area`` cells,
    each with its box (:func:`engine.geo.boxes.heatmap_peaks`), so touching
    objects that form one blob still count apart. ``peaks=False`` counts the
    components themselves (:func:`engine.geo.boxes.heatmap_components`).

The prompt method is calibrated: a model may carry ``count_bias`` (one
offset per count 1..10, engine.core.options.ModelDefaults), fitted by
:func:`fit_count_bias` on its own count sentences over synthetic chips whose
counts are known (scripts/train_demo_model.py ``--stage calibrate``); it is
added to the scores before the argmax unless ``CountOptions.calibrate`` is off.

Both report their method; the result's ``count`` is the dense count when both
ran (it localises its objects), and its summary says so. Plurals come from
:mod:`engine.data.grammar` (``plural``), so captions, summaries and Box-to-Caption agree on
"ships", "boxes", "ferries", "people"; a summary gives counts in digits ("36 storage tanks").
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .data.grammar import plural
from .core.errors import UsageError
from .core.options import DENSE_THRESHOLD, CountOptions, check
from .core.options import DetectOptions, ReadOptions
from .core.outputs import COUNT_FIELDS, count_rows, vector_driver, write_vector
from .data.grammar import IRREGULAR_PLURALS, O_ES, normalise_class_name
from .dense_pass import dense_heatmap
from .geo.boxes import heatmap_components, heatmap_peaks, pixel_to_bounds
from .geo.tiling import TileGrid
from .model import accel
from .model.batching import BatchRunner
from .model.scoring import build_bank, encode_prompts
from .rasterjob import raster_job

METHODS = ("prompt", "dense", "both")
#: RemoteCount's counts
COUNT_RANGE = tuple(range(1, 11))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty")
#: the caption template (RemoteCount); {be} is "is" or "are"
CAPTION = "there {be} {number} {objects} in the image"
ZERO_CAPTION = "there are no {objects} in the image"
VARIANTS = ("words", "digits")


# --------------------------------------------------------------------------- #
# Words.
# --------------------------------------------------------------------------- #
def counted(name: str, n: int) -> str:
    """``n`` objects named ``name`` in digits at any size ("1 ship", "36 storage tanks",
    "0 ships"): a count is a number, never grammar's vague "many ships"."""
    one = singular(name)
    return f"{n} {plural(one, n)}"


def number_word(n: int) -> str:
    """"one" .. "twenty"; digits beyond."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def singular(name: str) -> str:
    """The object name in the singular ("ships" -> "ship", "ferries" -> "ferry",
    "people" -> "person", "storage tanks" -> "storage tank").

    Inverts :func:`engine.data.grammar.plural` for the head noun: a candidate
    singular is accepted only if ``plural`` maps it back to the word given,
    so the noun rules live in one place. Words ending in -ss, -us, -is or
    -as ("glass", "bus", "chassis", "gas") are taken as singular already;
    "-es" is dropped only after s/x/z/ch/sh ("boxes", "buses"), otherwise
    "-s" ("houses" -> "house").
    """
    words = normalise_class_name(name).split()
    if not words:
        return ""
    head = len(words) - 1
    if "of" in words[1:]:
        head = words.index("of", 1) - 1
    w = words[head]
    low = w.lower()
    reverse = {v: k for k, v in IRREGULAR_PLURALS.items()}
    cand: List[str] = []
    if low in reverse:
        cand.append(reverse[low])
    elif low.endswith("s") and not low.endswith(("ss", "us", "is", "as")) and not w.isupper():
        if low.endswith("ies") and len(low) > 4:
            cand.append(w[:-3] + "y")                         # ferries -> ferry
        stem = low[:-2]
        if low.endswith("es") and (stem.endswith(("ss", "x", "z", "ch", "sh"))
                                   or (stem.endswith("us") and not stem.endswith("ous")) or stem in O_ES):
            cand.append(w[:-2])                               # boxes -> box, buses -> bus
        cand.append(w[:-1])                                   # houses -> house
    for c in cand:
        if c and plural(c, 2).lower() == low:
            words[head] = c
            break
    return " ".join(words)


def caption(name: str, n: int, variant: str = "words") -> str:
    """The RemoteCount caption for ``n`` objects ("there are three ships in the image")."""
    one = singular(name)
    if n == 0:
        return ZERO_CAPTION.format(objects=plural(one, 2))
    number = number_word(n) if variant == "words" else str(n)
    return CAPTION.format(be="is" if n == 1 else "are", number=number, objects=plural(one, n))


def count_captions(name: str, counts: Sequence[int] = COUNT_RANGE,
                   variants: Sequence[str] = VARIANTS) -> Dict[str, List[str]]:
    """Captions per variant, in the order of ``counts``."""
    if not str(name).strip():
        raise UsageError("no object name", "give --object, e.g. --object airplane")
    return {v: [caption(name, n, v) for n in counts] for v in variants}


def argmax_count(sims: np.ndarray, counts: Sequence[int] = COUNT_RANGE,
                 bias: Optional[Sequence[float]] = None) -> Tuple[int, np.ndarray]:
    """(count, per-count score) from cosines ``sims`` (variants, len(counts)):
    the variants' mean per count plus ``bias`` (one value per count, the
    model's calibration), its argmax (the smaller count on ties)."""
    s = np.asarray(sims, dtype=np.float64).reshape(-1, len(counts)).mean(axis=0)
    if bias is not None:
        s = s + np.asarray(bias, dtype=np.float64)
    return int(counts[int(np.argmax(s))]), s


def count_bias_for(counts: Sequence[int], bias: Optional[Sequence[float]]) -> Optional[np.ndarray]:
    """The calibration (one value per count of COUNT_RANGE) for ``counts``; 0 for counts outside it."""
    if bias is None:
        return None
    table = dict(zip(COUNT_RANGE, bias))
    return np.array([float(table.get(n, 0.0)) for n in counts])


def fit_count_bias(scores: np.ndarray, truth: Sequence[int], rounds: int = 6,
                   step: float = 0.0025, reach: float = 0.05) -> Tuple[float, ...]:
    """Per-count offsets that make the prompt method's argmax count right more often.

    ``scores`` (N, 10): the mean caption cosine per count 1..10 of N images
    (``PromptCount.scores`` without calibration) whose true counts are
    ``truth``. Coordinate ascent over offsets in [-reach, reach] (grid
    ``step``) of: the share within one + half the exact share - 0.05 x the
    mean absolute error. Offsets sum to 0. Store the result as the model's
    ``count_bias`` (engine.core.options.ModelDefaults).
    """
    x = np.asarray(scores, dtype=np.float64).reshape(-1, len(COUNT_RANGE))
    y = np.asarray(truth, dtype=np.int64)
    if len(x) != len(y) or not len(y):
        raise ValueError("fit_count_bias needs one true count per row of scores")
    counts = np.asarray(COUNT_RANGE)

    def quality(b: np.ndarray) -> float:
        err = np.abs(counts[np.argmax(x + b, axis=1)] - y)
        return float((err <= 1).mean() + 0.5 * (err == 0).mean() - 0.05 * err.mean())

    grid = np.arange(-reach, reach + step / 2, step)
    b = np.zeros(len(counts))
    best = quality(b)
    for _ in range(rounds):
        changed = False
        for j in range(len(counts)):
            for g in grid:
                trial = b.copy()
                trial[j] = g
                q = quality(trial)
                if q > best + 1e-12:
                    best, b, changed = q, trial, True
        if not changed:
            break
    b -= b.mean()
    return tuple(round(float(v), 5) for v in b)


# --------------------------------------------------------------------------- #
# Options and results.
# --------------------------------------------------------------------------- #
@dataclass
class CountBox:
    """One counted object (dense method): its box and heatmap peak."""

    bounds: Tuple[float, float, float, float]   # raster CRS
    pixel: Tuple[int, int, int, int]            # col0, row0, col1, row1 native pixels
    score: float                                # peak heatmap score
    area: int                                   # heatmap cells

    def to_json(self) -> Dict[str, Any]:
        return {"bounds": list(self.bounds), "pixel": list(self.pixel),
                "score": round(self.score, 6), "area": self.area}


@dataclass
class PromptCount:
    """RemoteCount result: the count, the score per count, per-variant counts."""

    count: int
    counts: List[int]                  # the candidate counts scored
    scores: List[float]                # mean cosine per candidate count (one window) / summed tiles: mean
    by_variant: Dict[str, int]         # argmax per caption variant
    captions: Dict[str, List[str]]
    tiles: List[Dict[str, Any]] = field(default_factory=list)   # per tile: pixel, bounds, count
    method: str = "prompt"
    calibrated: bool = False           # the model's count_bias was added to the scores
    cache: str = "off"                 # tiled: where the tiles' embeddings came from (engine.rasterjob)

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["scores"] = [round(s, 6) for s in self.scores]
        return d


@dataclass
class DenseCount:
    """Connected components of the dense heatmap above a threshold."""

    count: int
    threshold: float
    min_area: int
    boxes: List[CountBox]
    mode: str = "dense"
    method: str = "dense"
    peaks: bool = False                # one object per heatmap peak (else per component)
    cache: str = "off"                 # where the dense features came from (engine.rasterjob)

    def to_json(self) -> Dict[str, Any]:
        return {"method": self.method, "count": self.count, "threshold": self.threshold,
                "min_area": self.min_area, "mode": self.mode, "peaks": self.peaks,
                "cache": self.cache,
                "boxes": [b.to_json() for b in self.boxes]}


@dataclass
class CountResult:
    """Counts by the methods asked for; ``count`` is the dense count when both ran
    (it localises its objects), else the one method's count."""

    object: str
    method: str
    prompt: Optional[PromptCount]
    dense: Optional[DenseCount]
    crs: Optional[str]
    model: str
    device: str
    seconds: float
    extent: Optional[Tuple[float, float, float, float]] = None   # raster CRS, area counted
    warnings: List[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.dense.count if self.dense is not None else (self.prompt.count if self.prompt else 0)

    @property
    def boxes(self) -> List[CountBox]:
        return list(self.dense.boxes) if self.dense is not None else []

    @property
    def counted_by(self) -> str:
        """The method whose number is :attr:`count` ("dense" when both ran)."""
        return "dense" if self.dense is not None else "prompt"

    def method_summary(self, method: str) -> str:
        """One method's number in words, with how it was found: "3 ships (prompt method:
        RemoteCount captions, the area as one image)"; digits at any size ("36 storage tanks")."""
        part = self.prompt if method == "prompt" else self.dense
        if method == "prompt":
            how = (f"summed over {len(part.tiles)} tiles" if part.tiles
                   else f"the area as one image, {COUNT_RANGE[0]} to {COUNT_RANGE[-1]}")
            how = f"RemoteCount captions, {how}"
        else:
            how = f"heatmap {'peaks' if part.peaks else 'components'} >= {part.threshold:g}"
        return f"{counted(self.object, part.count)} ({method} method: {how})"

    def summary(self) -> str:
        """Which method's number is the count, then the other method's, if it ran:
        "count: 53 storage tanks (dense method: ...); also run: 1 storage tank (prompt method: ...)"."""
        text = f"count: {self.method_summary(self.counted_by)}"
        others = [m for m in ("prompt", "dense") if m != self.counted_by and getattr(self, m) is not None]
        return text + "".join(f"; also run: {self.method_summary(m)}" for m in others)

    def __str__(self) -> str:
        return self.summary()

    def to_json(self) -> Dict[str, Any]:
        return {"object": self.object, "method": self.method, "count": self.count,
                "prompt": self.prompt.to_json() if self.prompt else None,
                "dense": self.dense.to_json() if self.dense else None,
                "summary": self.summary(), "crs": self.crs, "extent": list(self.extent) if self.extent else None,
                "model": self.model, "device": self.device, "seconds": round(self.seconds, 4),
                "warnings": list(self.warnings)}


# --------------------------------------------------------------------------- #
# Dense: components of a heatmap.
# --------------------------------------------------------------------------- #
def heatmap_count(heat: np.ndarray, transform, threshold: float, min_area: int = 1,
                  raster_transform=None, peaks: bool = False, peak_distance: int = 2) -> List[CountBox]:
    """Objects in a (H, W) heatmap with cell transform ``transform``: the
    connected components of ``heat >= threshold`` with at least ``min_area``
    cells or, with ``peaks``, one object per peak of those components at least
    ``peak_distance`` cells apart (engine.geo.boxes.heatmap_peaks: touching objects
    count apart); best peak first, boxes in map coordinates (and native pixels
    when ``raster_transform`` is given)."""
    out = []
    inv = ~raster_transform if raster_transform is not None else None
    comps = (heatmap_peaks(heat, threshold, peak_distance, min_area=max(1, int(min_area))) if peaks
             else heatmap_components(heat, threshold, min_area=max(1, int(min_area))))
    for c in comps:
        bounds = pixel_to_bounds(transform, c.box)
        if inv is not None:
            xs, ys = [], []
            for x, y in ((bounds[0], bounds[1]), (bounds[2], bounds[3])):
                xs.append(inv.a * x + inv.b * y + inv.c)
                ys.append(inv.d * x + inv.e * y + inv.f)
            pixel = (int(np.floor(min(xs) + 1e-6)), int(np.floor(min(ys) + 1e-6)),
                     int(np.ceil(max(xs) - 1e-6)), int(np.ceil(max(ys) - 1e-6)))
        else:
            pixel = tuple(int(v) for v in c.box)
        out.append(CountBox(bounds=bounds, pixel=pixel, score=c.peak, area=c.area))
    return out


# --------------------------------------------------------------------------- #
# The entry point.
# --------------------------------------------------------------------------- #
def _check(method: str, options: CountOptions) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown count method {method!r}", "use --method prompt, dense or both",
                         option="method")
    check(options)


def _prompt_count(rj, name: str, options: CountOptions) -> PromptCount:
    import torch

    from .model.encode import encode_images

    reader, area, lm, job = rj.reader, rj.area, rj.lm, rj.job
    tiled = options.tile_px is not None
    zero = options.zero if options.zero is not None else tiled
    counts = ([0] if zero else []) + list(COUNT_RANGE)
    caps = count_captions(name, counts)
    # RemoteCount's captions are whole sentences, scored as the protocol writes them
    text = encode_prompts(lm, [c for v in VARIANTS for c in caps[v]], "raw")  # (V * N, D)
    n = len(counts)
    info = reader.info
    bias = count_bias_for(counts, lm.defaults.count_bias) if options.calibrate else None
    if not tiled:
        S = lm.image_size
        job.set_total(1)
        img, valid = reader.read(area, out_shape=(S, S))
        if not valid.any():
            raise UsageError("the extent holds no valid pixels (all nodata)", "pick another extent")
        emb = encode_images(lm, img[None])
        sims = (emb @ text.T).reshape(len(VARIANTS), n).cpu().numpy()
        c, s = argmax_count(sims, counts, bias)
        job.step()
        by = {v: int(counts[int(np.argmax(sims[i]))]) for i, v in enumerate(VARIANTS)}
        return PromptCount(count=c, counts=counts, scores=[float(x) for x in s], by_variant=by,
                           captions=caps, calibrated=bias is not None)
    gsd = options.read.gsd if options.read is not None else None
    grid = TileGrid.for_raster(info, area, int(options.tile_px), None, gsd)
    job.set_total(len(grid))
    per_tile: List[Dict[str, Any]] = []
    total_scores = np.zeros(n)
    by = {v: 0 for v in VARIANTS}
    # the tiles' embeddings are the job's pass (engine.rasterjob): another object on the
    # same tiles is counted from them without reading the raster again
    for tiles, emb in rj.tile_features("count-tiles", {"tile_px": int(options.tile_px)}, grid.tiles,
                                       lambda b: encode_images(lm, b), int(options.batch_size)):
        with torch.inference_mode():
            sims = (emb @ text.T).reshape(len(tiles), len(VARIANTS), n).cpu().numpy()
        for t, sm in zip(tiles, sims):
            c, s = argmax_count(sm, counts, bias)
            total_scores += s
            for i, v in enumerate(VARIANTS):
                by[v] += int(counts[int(np.argmax(sm[i]))])
            per_tile.append({"tile": t.index, "pixel": [t.col, t.row, t.col + t.width, t.row + t.height],
                             "bounds": list(t.bounds(info.transform)), "count": c})
    k = max(1, len(per_tile))
    return PromptCount(count=int(sum(t["count"] for t in per_tile)), counts=counts,
                       scores=[float(x) for x in total_scores / k], by_variant=by, captions=caps,
                       tiles=per_tile, calibrated=bias is not None, cache=rj.cache)


def _dense_count(raster: str, lm, name: str, extent, extent_crs, options: CountOptions,
                 progress, cancel, raster_transform) -> Tuple[DenseCount, List[str]]:
    """The dense pass (engine.dense_pass, the one detect's dense mode runs) for the
    object's name, and its heatmap's peaks counted."""
    from .model.dense import dense_unsupported  # deferred: a test replaces it at call time
    thr = DENSE_THRESHOLD if options.threshold is None else float(options.threshold)
    opts = check(DetectOptions(mode="dense", tile_px=int(options.dense_tile_px or lm.image_size), top_k=1,
                               threshold=thr, batch_size=int(options.batch_size),
                               read=options.read or ReadOptions(), device=options.device,
                               precision=options.precision, heatmap=True, refine=False,
                               templates=getattr(options, "templates", None), cache=options.cache))
    with raster_job(raster, lm, extent, extent_crs, options=opts, progress=progress,
                    cancel=cancel) as rj:
        why = dense_unsupported(rj.lm)
        if why:
            raise UsageError(f"the dense count needs patch features: {why}",
                             "count with --method prompt, or with a ViT model", option="method")
        opts = rj.with_defaults(opts, auto_batch=opts.dense_input_px is None)
        bank = build_bank(rj.lm, [plural(singular(name), 2)], opts.background, opts.templates)
        runner = BatchRunner(opts.batch_size)
        heat = dense_heatmap(rj, bank, opts, runner)
        notes = rj.notes + runner.notes + accel.notes(rj.lm)
    boxes = heatmap_count(heat.heat[0], heat.transform, thr, options.min_area,
                          raster_transform, peaks=options.peaks, peak_distance=options.peak_distance)
    return (DenseCount(len(boxes), thr, int(options.min_area), boxes, mode="dense",
                       peaks=bool(options.peaks), cache=rj.cache), notes)


def count(raster: str, object_name: str, model, extent: Optional[Tuple[float, float, float, float]] = None,
          extent_crs: Optional[str] = None, method: str = "prompt",
          options: Optional[CountOptions] = None, progress=None, cancel=None,
          read=None) -> CountResult:
    """Count ``object_name`` objects in ``raster`` (within ``extent``, in
    ``extent_crs``, default the raster's CRS) by ``method``: ``prompt``,
    ``dense`` or ``both`` (see the module doc). ``read`` (ReadOptions) is a
    shortcut for ``options.read``."""

    t0 = time.perf_counter()
    options = options or CountOptions()
    if read is not None:
        options.read = read
    method = (method or "prompt").lower()
    _check(method, options)
    name = str(object_name or "").strip()
    if not name:
        raise UsageError("no object name", "give --object, e.g. --object airplane")
    with raster_job(raster, model, extent, extent_crs, options=options, progress=progress,
                    cancel=cancel) as rj:
        notes, info, area, lm = rj.notes, rj.info, rj.area, rj.lm
        options = rj.with_defaults(options, auto_batch=False)
        prompt_res = (_prompt_count(rj, name, options) if method in ("prompt", "both") else None)
    dense_res = None
    if method in ("dense", "both"):
        dense_res, more = _dense_count(raster, lm, name, extent, extent_crs, options, progress, cancel,
                                       info.transform)
        notes.extend(m for m in more if m not in notes)
    return CountResult(object=name, method=method, prompt=prompt_res, dense=dense_res, crs=info.crs,
                       model=str(lm.spec), device=str(lm.device), seconds=time.perf_counter() - t0,
                       extent=area.bounds(info.transform), warnings=notes)


def check_boxes_output(method: str) -> None:
    """Refuse an output of counted objects' boxes for a method that gives none (prompt)."""
    if (method or "prompt").lower() == "prompt":
        raise UsageError("--out holds the dense method's boxes; the prompt method does not localise",
                         "add --method dense or both")


def write_count_boxes(result: CountResult, path, overwrite: bool = False):
    """Write the dense method's boxes (.gpkg or .geojson) in the raster's CRS, atomically.
    Fields: engine.core.outputs.COUNT_FIELDS."""
    vector_driver(path)
    if result.dense is None:
        raise UsageError("this count has no boxes (the prompt method does not localise)",
                         "count with method dense or both")
    rows, bounds = count_rows(result.dense.boxes, singular(result.object), result.model)
    return write_vector(path, COUNT_FIELDS, rows, bounds, result.crs, "objects", overwrite)
