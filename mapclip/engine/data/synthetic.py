"""Procedural, seeded, georeferenced aerial-like scenes with exact ground truth.

No real imagery can be shipped or downloaded, so the demo model, the demo and
the end-to-end quality tests run on scenes this module draws: land cover
(water, forest, fields, bare ground, grass, urban blocks, roads, a runway and
its apron) and seven object classes, each with its own shape, colours and
context:

==============  =========================================================
storage-tank    light round discs with a rim and a shadow, clustered on
                bare-ground pads (tank farms), a few alone
ship            elongated hulls with a pointed bow, on water, some moored
                side by side (harbours)
airplane        cross shapes (fuselage, swept wings, tail) in rows on the
                apron beside the runway
building        rectangles with flat or gabled roofs and shadows, in urban
                blocks between streets
vehicle         small coloured rectangles along roads
sports-field    green rectangles with white border, centre line and circle
swimming-pool   small cyan rectangles in urban yards
==============  =========================================================

A scene is written as a tiled GeoTIFF (512 px blocks, RGB uint8) in a
projected CRS (default UTM 33N, 0.5 m/px), strip by strip: only one 512-row
strip and the plan (a coarse grid, one value per ``CELL`` pixels, plus lists of
rectangles and objects) live in memory, so a 10000 x 10000 scene takes
seconds. Ground truth is exact: a class-mask GeoTIFF (values in
:data:`MASK_CLASSES`; objects over land cover, shadows excluded), COCO JSON
boxes in pixel coordinates (each the tight box of that object's pixels in the
mask; objects never overlap) with map coordinates beside them, so
Box-to-Caption and Mask-to-Box run on it as on DOTA or LoveDA.

Everything is a function of the seed (and the size): the same call writes the
same bytes.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..core.errors import UsageError
from ..core.jobs import Job, atomic_path, check_output_path

#: object classes (DOTA-style names; Box-to-Caption turns "-" into a space)
OBJECT_CLASSES: Tuple[str, ...] = ("storage-tank", "ship", "airplane", "building", "vehicle",
                                   "sports-field", "swimming-pool")
#: land-cover classes, in mask value order starting at 1
LANDCOVER_CLASSES: Tuple[str, ...] = ("water", "forest", "field", "bare-ground", "grass", "urban",
                                      "road", "runway", "apron")
WATER, FOREST, FIELD, BARE, GRASS, URBAN, ROAD, RUNWAY, APRON = range(1, 10)
OBJECT_BASE = 20
#: class-mask values -> names (0 is never written)
MASK_CLASSES: Dict[int, str] = {**{i + 1: n for i, n in enumerate(LANDCOVER_CLASSES)},
                                **{OBJECT_BASE + i: n for i, n in enumerate(OBJECT_CLASSES)}}
CLASS_VALUE: Dict[str, int] = {n: v for v, n in MASK_CLASSES.items()}

BLOCK = 512          # GeoTIFF block size and strip height
CELL = 32            # coarse plan grid, pixels per cell
DEFAULT_GSD = 0.5
DEFAULT_CRS = "EPSG:32633"
DEFAULT_ORIGIN = (500000.0, 5300000.0)   # upper-left corner in the CRS (metres)
SUN = (0.6, 0.8)     # shadow direction (dx, dy) in pixels per unit of object height

# base colours (RGB) of the land-cover classes, index = mask value
_LC_COLOUR = np.array([
    (0, 0, 0),         # unused
    (38, 66, 92),      # water
    (46, 74, 40),      # forest
    (120, 140, 70),    # field (parcels recolour it)
    (168, 148, 118),   # bare ground
    (98, 138, 72),     # grass
    (132, 130, 124),   # urban ground
    (78, 78, 82),      # road
    (104, 104, 106),   # runway
    (158, 158, 154),   # apron
], dtype=np.float32)
# amplitude of fine noise, coarse variation and crown texture per land cover
_LC_NOISE = np.array([0, 2.0, 6, 5, 7, 5, 7, 3, 3, 3], dtype=np.float32)
_LC_VARY = np.array([0, 6.0, 10, 0, 14, 10, 8, 3, 4, 4], dtype=np.float32)
_LC_CROWN = np.array([0, 0, 34, 0, 6, 8, 0, 0, 0, 0], dtype=np.float32)

# furrow brightness over one 8-px period, for three furrow styles (rows of 8)
_FURROW = (7 * np.concatenate([np.sin(np.arange(8) * 2 * np.pi / 8), np.sign(np.sin(np.arange(8) * 2 * np.pi / 8)),
                               np.sin(np.arange(8) * 4 * np.pi / 8)])).astype(np.float32)
_ROOFS = np.array([(150, 70, 55), (170, 90, 70), (120, 120, 125), (190, 188, 182),
                   (90, 92, 98), (200, 160, 120), (110, 60, 50)], dtype=np.float32)
_CARS = np.array([(220, 220, 220), (30, 30, 35), (180, 30, 30), (40, 60, 150),
                  (150, 150, 155), (200, 180, 40), (90, 20, 20)], dtype=np.float32)
_HULLS = np.array([(230, 230, 228), (200, 60, 50), (70, 80, 100), (180, 180, 180),
                   (40, 40, 45)], dtype=np.float32)


# --------------------------------------------------------------------------- #
# Results.
# --------------------------------------------------------------------------- #
@dataclass
class TruthBox:
    """One object: class, tight pixel box (col0, row0, col1, row1; end exclusive), map box."""

    id: int
    cls: str
    pixel: Tuple[int, int, int, int]
    bounds: Tuple[float, float, float, float]   # xmin, ymin, xmax, ymax in the scene CRS
    angle: float
    area: int                                   # object pixels in the mask


@dataclass
class SceneTruth:
    """What :func:`make_scene` wrote and the exact ground truth."""

    path: str
    mask_path: Optional[str]
    coco_path: Optional[str]
    width: int
    height: int
    seed: int
    gsd: float
    crs: str
    transform: Tuple[float, ...]                # affine coefficients a, b, c, d, e, f
    boxes: List[TruthBox] = field(default_factory=list)

    @property
    def affine(self):
        from affine import Affine
        return Affine(*self.transform[:6])

    def of(self, cls: str) -> List[TruthBox]:
        return [b for b in self.boxes if b.cls == cls]

    def counts(self) -> Dict[str, int]:
        out = {c: 0 for c in OBJECT_CLASSES}
        for b in self.boxes:
            out[b.cls] += 1
        return out


@dataclass
class Chip:
    """A small image cut from a scene, with its class mask and the boxes inside it."""

    name: str
    image: np.ndarray                           # (S, S, 3) uint8
    mask: np.ndarray                            # (S, S) uint8, values of MASK_CLASSES
    boxes: List[Tuple[str, Tuple[int, int, int, int]]]   # class, chip pixel box (end exclusive)
    col: int
    row: int
    scene: str


# --------------------------------------------------------------------------- #
# The plan: coarse fields, rectangles, objects.
# --------------------------------------------------------------------------- #
@dataclass
class _Obj:
    cls: str
    cx: float
    cy: float
    length: float
    width: float
    angle: float          # radians, direction of the length axis (x right, y down)
    colour: Tuple[float, float, float]
    height: float         # shadow length in pixels
    style: int = 0
    box: Tuple[int, int, int, int] = (0, 0, 0, 0)   # tight pixel box, filled by _finalise
    area: int = 0


@dataclass
class _Plan:
    width: int
    height: int
    elev: np.ndarray              # coarse smooth fields (rows, cols) at CELL px
    veg: np.ndarray
    vary: np.ndarray
    water_t: float
    forest_t: float
    bare_t: float
    rects: List[Tuple[int, int, int, int, int]] = field(default_factory=list)   # c0,r0,c1,r1,value
    paint: List[Tuple[int, int, int, int, Tuple[int, int, int]]] = field(default_factory=list)
    objects: List[_Obj] = field(default_factory=list)
    parcel_h: int = 220
    parcel_w: np.ndarray = field(default_factory=lambda: np.array([260]))
    parcel_off: np.ndarray = field(default_factory=lambda: np.array([0]))
    parcel_col: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 3), np.float32))
    parcel_dir: np.ndarray = field(default_factory=lambda: np.zeros((1, 1), np.int32))
    parcel_per: np.ndarray = field(default_factory=lambda: np.zeros((1, 1), np.int32))
    base: Optional[int] = None    # a fixed land cover instead of the fields (count scenes)
    seed: int = 0


def _smooth_field(rng: np.random.Generator, rows: int, cols: int,
                  scales=(16, 6, 2), weights=(1.0, 0.5, 0.25)) -> np.ndarray:
    """Smooth noise on the coarse grid: random grids upsampled and summed, in [0, 1]."""
    out = np.zeros((rows, cols), np.float32)
    for s, w in zip(scales, weights):
        g = rng.random((max(2, rows // s + 2), max(2, cols // s + 2))).astype(np.float32)
        out += w * cv2.resize(g, (cols, rows), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def _interp_rows_cols(coarse: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Bilinear upsampling of a CELL-px coarse grid to pixels [r0:r1, c0:c1].

    cv2.resize over a crop of whole coarse rows with one row of margin either
    side, so every strip gets exactly the values the whole grid would give.
    """
    i0 = max(0, r0 // CELL - 1)
    i1 = min(coarse.shape[0], (r1 + CELL - 1) // CELL + 1)
    crop = np.ascontiguousarray(coarse[i0:i1])
    big = cv2.resize(crop, (crop.shape[1] * CELL, crop.shape[0] * CELL), interpolation=cv2.INTER_LINEAR)
    off = r0 - i0 * CELL
    return big[off:off + (r1 - r0), c0:c1]


def _base_landcover(plan: _Plan, r0: int, r1: int, c0: int, c1: int,
                    step: int = 1) -> np.ndarray:
    """Land cover from the fields and rectangles for pixels [r0:r1:step, c0:c1:step]."""
    h, w = len(range(r0, r1, step)), len(range(c0, c1, step))
    if plan.base is not None:
        lc = np.full((h, w), plan.base, np.uint8)
    else:
        if step == 1:
            elev = _interp_rows_cols(plan.elev, r0, r1, c0, c1)
            veg = _interp_rows_cols(plan.veg, r0, r1, c0, c1)
        else:
            big = cv2.resize(plan.elev, None, fx=CELL / step, fy=CELL / step,
                             interpolation=cv2.INTER_LINEAR)
            elev = big[r0 // step:r0 // step + h, c0 // step:c0 // step + w]
            big = cv2.resize(plan.veg, None, fx=CELL / step, fy=CELL / step,
                             interpolation=cv2.INTER_LINEAR)
            veg = big[r0 // step:r0 // step + h, c0 // step:c0 // step + w]
        lc = np.full((h, w), FIELD, np.uint8)
        lc[veg > plan.forest_t] = FOREST
        lc[veg < plan.bare_t] = BARE
        lc[elev < plan.water_t] = WATER
    for rc0, rr0, rc1, rr1, v in plan.rects:
        a0, a1 = max(rr0, r0), min(rr1, r1)
        b0, b1 = max(rc0, c0), min(rc1, c1)
        if a0 < a1 and b0 < b1:
            lc[(a0 - r0 + step - 1) // step:(a1 - r0 + step - 1) // step,
               (b0 - c0 + step - 1) // step:(b1 - c0 + step - 1) // step] = v
    return lc


# --------------------------------------------------------------------------- #
# Object shapes.
# --------------------------------------------------------------------------- #
def _obj_extent(o: _Obj) -> float:
    """Radius of a circle holding the object and its shadow."""
    return 0.5 * math.hypot(o.length, o.width) + o.height + 2


def _obj_patch(o: _Obj, x0: int, y0: int, x1: int, y1: int):
    """Body mask, body colour and shadow mask of ``o`` on pixels [y0:y1, x0:x1]."""
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    ys += 0.5
    xs += 0.5
    ca, sa = math.cos(o.angle), math.sin(o.angle)

    def body_at(dx, dy):
        u = dx * ca + dy * sa
        v = -dx * sa + dy * ca
        L, W = o.length / 2, o.width / 2
        if o.cls == "storage-tank":
            return np.hypot(dx, dy) <= L, u, v
        if o.cls == "ship":
            bow = 0.25 * o.length
            taper = np.clip((L - u) / bow, 0, 1)
            return (np.abs(u) <= L) & (np.abs(v) <= W * np.maximum(taper, 0.05)), u, v
        if o.cls == "airplane":
            fw = max(2.0, o.length * 0.11)
            fus = (np.abs(v) <= fw / 2) & (np.abs(u) <= L)
            chord, sweep = o.length * 0.16, 0.35
            wing = (np.abs(v) <= W) & (np.abs(u - 0.05 * L + sweep * np.abs(v)) <= chord / 2)
            tail = (np.abs(v) <= W * 0.35) & (np.abs(u + 0.85 * L + sweep * np.abs(v)) <= chord / 3)
            return fus | wing | tail, u, v
        return (np.abs(u) <= L) & (np.abs(v) <= W), u, v

    dx, dy = xs - o.cx, ys - o.cy
    body, u, v = body_at(dx, dy)
    shadow = body_at(dx - SUN[0] * o.height, dy - SUN[1] * o.height)[0] & ~body
    col = np.empty(body.shape + (3,), np.float32)
    col[:] = o.colour
    L, W = o.length / 2, o.width / 2
    if o.cls == "storage-tank":
        r = np.hypot(dx, dy)
        shade = (1.0 - 0.18 * (r / max(L, 1)) ** 2)[..., None]
        col *= shade
        rim = (r > L - max(1.0, L * 0.12)) | (np.abs(r - 0.7 * L) < 0.6)
        col[rim] *= 0.72
    elif o.cls == "ship":
        deck = (np.abs(u + 0.25 * L) < 0.18 * L) & (np.abs(v) < 0.55 * W)
        col[deck] = np.minimum(col[deck] * 0.6 + 110, 255)
    elif o.cls == "airplane":
        col[np.abs(v) <= max(1.0, o.length * 0.03)] *= 0.93
    elif o.cls == "building":
        if o.style == 1:           # gabled roof: one side darker
            col[v > 0] *= 0.78
        else:
            edge = (np.abs(u) > L - 1.5) | (np.abs(v) > W - 1.5)
            col[edge] *= 0.85
    elif o.cls == "vehicle":
        glass = (u > 0.15 * L) & (u < 0.45 * L)
        col[glass] = (35, 40, 50)
    elif o.cls == "sports-field":
        m = max(2.0, 0.07 * W)
        line = ((np.abs(np.abs(u) - (L - m)) < 0.9) & (np.abs(v) <= W - m + 0.9)) | \
               ((np.abs(np.abs(v) - (W - m)) < 0.9) & (np.abs(u) <= L - m + 0.9)) | \
               ((np.abs(u) < 0.7) & (np.abs(v) <= W - m)) | \
               (np.abs(np.hypot(u, v) - 0.22 * W * 2) < 0.8)
        stripes = (np.floor((u + L) / max(3.0, L / 5)) % 2 == 0)
        col[stripes] *= 1.07
        col[line] = (235, 238, 232)
    elif o.cls == "swimming-pool":
        edge = (np.abs(u) > L - 1.2) | (np.abs(v) > W - 1.2)
        col[edge] = (225, 225, 218)
    return body, np.clip(col, 0, 255), shadow


def _obj_window(o: _Obj, width: int, height: int) -> Tuple[int, int, int, int]:
    r = _obj_extent(o)
    return (max(0, int(math.floor(o.cx - r))), max(0, int(math.floor(o.cy - r))),
            min(width, int(math.ceil(o.cx + r)) + 1), min(height, int(math.ceil(o.cy + r)) + 1))


def _finalise(o: _Obj, width: int, height: int) -> bool:
    """Fill ``o.box`` and ``o.area`` from its pixels; False if it is empty or leaves the raster."""
    x0, y0, x1, y1 = _obj_window(o, width, height)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return False
    body, _, _ = _obj_patch(o, x0, y0, x1, y1)
    rows = np.flatnonzero(body.any(axis=1))
    cols = np.flatnonzero(body.any(axis=0))
    if not len(rows):
        return False
    box = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
    if box[0] <= 0 or box[1] <= 0 or box[2] >= width or box[3] >= height:
        return False
    o.box, o.area = box, int(body.sum())
    return True


# --------------------------------------------------------------------------- #
# Placing things.
# --------------------------------------------------------------------------- #
class _Placer:
    """Land cover at 1/4 resolution and an occupancy grid, for placement checks."""

    Q = 4

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.lc = _base_landcover(plan, 0, plan.height, 0, plan.width, step=self.Q)
        self.occ = np.zeros(self.lc.shape, bool)

    def refresh(self) -> None:
        self.lc = _base_landcover(self.plan, 0, self.plan.height, 0, self.plan.width, step=self.Q)

    def cover(self, x: float, y: float) -> int:
        r = min(max(int(y) // self.Q, 0), self.lc.shape[0] - 1)
        c = min(max(int(x) // self.Q, 0), self.lc.shape[1] - 1)
        return int(self.lc[r, c])

    def axis_cover(self, o: _Obj, n: int = 5) -> List[int]:
        ca, sa = math.cos(o.angle), math.sin(o.angle)
        out = []
        for t in np.linspace(-0.5, 0.5, n):
            for s in (-0.5, 0.0, 0.5):
                x = o.cx + t * o.length * ca - s * o.width * sa
                y = o.cy + t * o.length * sa + s * o.width * ca
                out.append(self.cover(x, y))
        return out

    def try_place(self, o: _Obj, allowed: Sequence[int], gap: int = 2) -> bool:
        """Add ``o`` if it lies on allowed land cover, inside the raster, on free ground."""
        plan = self.plan
        if allowed and any(c not in allowed for c in self.axis_cover(o)):
            return False
        if not _finalise(o, plan.width, plan.height):
            return False
        c0, r0, c1, r1 = o.box
        q = self.Q
        sl = (slice(max(0, (r0 - gap) // q), (r1 + gap) // q + 1),
              slice(max(0, (c0 - gap) // q), (c1 + gap) // q + 1))
        if self.occ[sl].any():
            return False
        self.occ[sl] = True
        plan.objects.append(o)
        return True


def _colour(rng, palette: np.ndarray, jitter: float = 12) -> Tuple[float, float, float]:
    c = palette[rng.integers(len(palette))] + rng.normal(0, jitter, 3)
    return tuple(float(v) for v in np.clip(c, 0, 255))


def _mk(rng, cls: str, cx: float, cy: float, length: float, width: float, angle: float,
        gsd_scale: float = 1.0) -> _Obj:
    """An object of ``cls`` with class colours and shadow length."""
    if cls == "storage-tank":
        colour = tuple(float(v) for v in np.clip(rng.normal(222, 10) + rng.normal(0, 4, 3), 0, 255))
        return _Obj(cls, cx, cy, length, length, 0.0, colour, height=length * 0.22)
    if cls == "ship":
        return _Obj(cls, cx, cy, length, width, angle, _colour(rng, _HULLS), height=max(1.5, width * 0.25))
    if cls == "airplane":
        colour = tuple(float(v) for v in np.clip(rng.normal(236, 8) + rng.normal(0, 3, 3), 0, 255))
        return _Obj(cls, cx, cy, length, width, angle, colour, height=length * 0.08)
    if cls == "building":
        return _Obj(cls, cx, cy, length, width, angle, _colour(rng, _ROOFS),
                    height=rng.uniform(3, 10) / gsd_scale, style=int(rng.random() < 0.4))
    if cls == "vehicle":
        return _Obj(cls, cx, cy, length, width, angle, _colour(rng, _CARS, 8), height=1.2)
    if cls == "sports-field":
        colour = tuple(float(v) for v in np.clip(np.array((62, 140, 64)) + rng.normal(0, 8, 3), 0, 255))
        return _Obj(cls, cx, cy, length, width, angle, colour, height=0.0)
    if cls == "swimming-pool":
        colour = tuple(float(v) for v in np.clip(np.array((70, 175, 215)) + rng.normal(0, 10, 3), 0, 255))
        return _Obj(cls, cx, cy, length, width, angle, colour, height=0.0)
    raise ValueError(cls)


def _new_plan(width: int, height: int, seed: int, rng: np.random.Generator) -> _Plan:
    gh, gw = height // CELL + 3, width // CELL + 3
    elev = _smooth_field(rng, gh, gw, scales=(24, 8, 3), weights=(1.0, 0.45, 0.15))
    veg = _smooth_field(rng, gh, gw, scales=(12, 5, 2), weights=(1.0, 0.5, 0.25))
    vary = _smooth_field(rng, gh, gw, scales=(6, 2), weights=(1.0, 0.5))
    qw = rng.uniform(0.10, 0.22)
    plan = _Plan(width, height, elev, veg, vary,
                 water_t=float(np.quantile(elev, qw)),
                 forest_t=float(np.quantile(veg, rng.uniform(0.62, 0.75))),
                 bare_t=float(np.quantile(veg, rng.uniform(0.12, 0.22))), seed=seed)
    n_bands = height // 150 + 2
    plan.parcel_h = int(rng.integers(150, 260))
    plan.parcel_w = rng.integers(160, 360, n_bands + 1)
    plan.parcel_off = rng.integers(0, 400, n_bands + 1)
    fc = np.array([(118, 142, 64), (150, 160, 80), (176, 160, 96), (128, 112, 80),
                   (96, 130, 58), (170, 150, 70)], np.float32)
    plan.parcel_col = (fc[rng.integers(len(fc), size=(64, 64))]
                       + rng.normal(0, 8, (64, 64, 3))).astype(np.float32)
    plan.parcel_dir = rng.integers(0, 4, size=(64, 64)).astype(np.int32)
    plan.parcel_per = rng.integers(0, 3, size=(64, 64)).astype(np.int32)
    return plan


def _plan_mixed(width: int, height: int, seed: int, gsd: float) -> _Plan:
    """A mixed landscape: fields, forest, water, an airport, towns, tank farms, roads."""
    rng = np.random.default_rng([seed, 7])
    plan = _new_plan(width, height, seed, rng)
    s = 0.5 / gsd   # object sizes are set for 0.5 m/px and scale with the GSD
    area = width * height
    placer = _Placer(plan)

    def water_frac(c0, r0, c1, r1):
        q = _Placer.Q
        sub = placer.lc[r0 // q:r1 // q + 1, c0 // q:c1 // q + 1]
        return float((sub == WATER).mean()) if sub.size else 1.0

    def free_rect(w, h, tries=60, max_water=0.05):
        taken = [(a, b, c, d) for a, b, c, d, v in plan.rects if v in (URBAN, APRON, BARE, GRASS)]
        for _ in range(tries):
            c0 = int(rng.integers(8, max(9, width - w - 8)))
            r0 = int(rng.integers(8, max(9, height - h - 8)))
            c1, r1 = min(c0 + w, width - 8), min(r0 + h, height - 8)
            if any(c0 < d1 + 40 and d0 < c1 + 40 and r0 < b1 + 40 and b0 < r1 + 40
                   for d0, b0, d1, b1 in taken):
                continue
            if water_frac(c0, r0, c1, r1) <= max_water:
                return c0, r0, c1, r1
        return None

    # long roads across the scene
    n_roads = max(1, int(round(math.sqrt(area) / 3000))) + int(rng.integers(0, 2))
    roads = []
    for i in range(n_roads):
        rw = int(rng.integers(14, 20) * s)
        if i % 2 == 0:
            y = int(rng.integers(height // 8, height - height // 8 - rw))
            roads.append((0, y, width, y + rw, ROAD))
        else:
            x = int(rng.integers(width // 8, width - width // 8 - rw))
            roads.append((x, 0, x + rw, height, ROAD))
    plan.rects.extend(roads)
    placer.refresh()

    # an airport: grass ground, a runway with markings, an apron with airplanes
    airports = []
    if min(width, height) >= 700:
        n_air = max(1, area // (6000 * 6000))
        for _ in range(n_air):
            horizontal = bool(rng.random() < 0.5)
            along = width if horizontal else height
            run_len = int(min(along - 64, rng.uniform(0.55, 0.8) * along, 4200 * s))
            run_w = int(rng.uniform(60, 80) * s)
            apron_d = int(rng.uniform(150, 190) * s)
            depth = run_w + apron_d + int(90 * s)
            rect = free_rect(run_len, depth, max_water=0.6) if horizontal else \
                free_rect(depth, run_len, max_water=0.6)
            if rect is None:
                continue
            c0, r0, c1, r1 = rect
            plan.rects.append((c0, r0, c1, r1, GRASS))
            if horizontal:
                ry = r0 + int(30 * s)
                plan.rects.append((c0 + 10, ry, c1 - 10, ry + run_w, RUNWAY))
                ax0, ax1 = c0 + int(0.15 * (c1 - c0)), c0 + int(0.85 * (c1 - c0))
                ay0 = ry + run_w + int(30 * s)
                plan.rects.append((ax0, ay0, ax1, ay0 + apron_d, APRON))
                plan.rects.append((ax0 + 20, ry + run_w, ax0 + 20 + int(16 * s), ay0, APRON))
                for x in range(c0 + 40, c1 - 60, int(60 * s)):
                    plan.paint.append((x, ry + run_w // 2 - 1, x + int(30 * s), ry + run_w // 2 + 2,
                                       (235, 235, 230)))
                airports.append(("h", ax0, ay0, ax1, ay0 + apron_d))
            else:
                rx = c0 + int(30 * s)
                plan.rects.append((rx, r0 + 10, rx + run_w, r1 - 10, RUNWAY))
                ay0, ay1 = r0 + int(0.15 * (r1 - r0)), r0 + int(0.85 * (r1 - r0))
                ax0 = rx + run_w + int(30 * s)
                plan.rects.append((ax0, ay0, ax0 + apron_d, ay1, APRON))
                plan.rects.append((rx + run_w, ay0 + 20, ax0, ay0 + 20 + int(16 * s), APRON))
                for y in range(r0 + 40, r1 - 60, int(60 * s)):
                    plan.paint.append((rx + run_w // 2 - 1, y, rx + run_w // 2 + 2, y + int(30 * s),
                                       (235, 235, 230)))
                airports.append(("v", ax0, ay0, ax0 + apron_d, ay1))

    # towns: urban ground, a street grid, blocks of buildings, pools, sports fields
    n_towns = max(1, int(round(area / (1800 * 1800)))) if min(width, height) >= 400 else 0
    blocks = []
    for _ in range(n_towns):
        tw = int(min(width * 0.6, rng.uniform(400, 1000) * s))
        th = int(min(height * 0.6, rng.uniform(400, 1000) * s))
        rect = free_rect(tw, th, tries=150, max_water=0.2)
        if rect is None:
            continue
        c0, r0, c1, r1 = rect
        plan.rects.append((c0, r0, c1, r1, URBAN))
        sw = int(rng.integers(12, 17) * s)
        bx, by = int(rng.uniform(150, 230) * s), int(rng.uniform(130, 200) * s)
        xs = list(range(c0, c1 - sw, bx)) + [c1 - sw]
        ys = list(range(r0, r1 - sw, by)) + [r1 - sw]
        for x in xs:
            plan.rects.append((x, r0, x + sw, r1, ROAD))
        for y in ys:
            plan.rects.append((c0, y, c1, y + sw, ROAD))
        for xa, xb in zip(xs[:-1], xs[1:]):
            for ya, yb in zip(ys[:-1], ys[1:]):
                if xb - xa - sw > 50 * s and yb - ya - sw > 50 * s:
                    blocks.append((xa + sw, ya + sw, xb, yb))
    # tank farms: bare pads with clustered tanks
    n_farms = max(1, int(round(area / (2500 * 2500)))) if min(width, height) >= 300 else 0
    farms = []
    for _ in range(n_farms):
        fw = int(min(width - 40, rng.uniform(180, 420) * s))
        fh = int(min(height - 40, rng.uniform(160, 360) * s))
        rect = free_rect(fw, fh, max_water=0.0)
        if rect is None:
            continue
        plan.rects.append((*rect, BARE))
        farms.append(rect)
    placer.refresh()

    # objects --------------------------------------------------------------
    for kind, ax0, ay0, ax1, ay1 in airports:
        horizontal = kind == "h"
        x = ax0 + 12
        along = ax1 if horizontal else ay1
        pos = ax0 + 12 if horizontal else ay0 + 12
        while pos < along - 20:
            ln = rng.uniform(50, 90) * s
            span = ln * rng.uniform(0.85, 1.05)
            depth0 = (ay0 if horizontal else ax0) + 10 + ln / 2
            ang = (-math.pi / 2 if horizontal else math.pi) + rng.normal(0, 0.08)
            if horizontal:
                o = _mk(rng, "airplane", pos + span / 2, depth0 + rng.uniform(0, 30 * s), ln, span, ang)
            else:
                o = _mk(rng, "airplane", depth0 + rng.uniform(0, 30 * s), pos + span / 2, ln, span, ang)
            if rng.random() < 0.85:
                placer.try_place(o, (APRON,))
            pos += span + rng.uniform(8, 40) * s
        del x

    for c0, r0, c1, r1 in farms:
        d = rng.uniform(26, 70) * s
        gap = rng.uniform(6, 16) * s
        y = r0 + gap + d / 2
        while y < r1 - d / 2 - 4:
            x = c0 + gap + d / 2
            while x < c1 - d / 2 - 4:
                if rng.random() < 0.85:
                    dd = d * rng.uniform(0.8, 1.1)
                    placer.try_place(_mk(rng, "storage-tank", x + rng.normal(0, 2), y + rng.normal(0, 2),
                                         dd, dd, 0.0), (BARE,))
                x += d + gap
            y += d + gap
    # a few lone tanks on bare ground
    bare_cells = np.argwhere(placer.lc == BARE)
    for _ in range(int(area / 1.5e6) + 1):
        if not len(bare_cells):
            break
        r, c = bare_cells[rng.integers(len(bare_cells))] * _Placer.Q
        d = rng.uniform(24, 60) * s
        placer.try_place(_mk(rng, "storage-tank", c, r, d, d, 0.0), (BARE,))

    for c0, r0, c1, r1 in blocks:
        if rng.random() < 0.12 and (c1 - c0) > 90 * s and (r1 - r0) > 70 * s:
            plan.rects.append((c0, r0, c1, r1, GRASS))
            ln = min(c1 - c0, r1 - r0) * 0 + min(c1 - c0 - 16, rng.uniform(70, 120) * s)
            wd = min(r1 - r0 - 16, ln * rng.uniform(0.55, 0.7))
            o = _mk(rng, "sports-field", (c0 + c1) / 2, (r0 + r1) / 2, ln, wd,
                    rng.normal(0, 0.05))
            placer.try_place(o, ())
            continue
        # buildings in rows along the block edges, pools in some yards
        bw = rng.uniform(20, 46) * s
        for yrow, side in ((r0 + 6 * s, 1), (r1 - 6 * s, -1)):
            x = c0 + 6 * s
            while x < c1 - 24 * s:
                ln = rng.uniform(0.7, 1.3) * bw
                wd = rng.uniform(18, 34) * s
                cy = yrow + side * wd / 2
                if x + ln > c1 - 5 * s:
                    break
                placer.try_place(_mk(rng, "building", x + ln / 2, cy, ln, wd, 0.0, s), ())
                if rng.random() < 0.18:
                    pl, pw = rng.uniform(14, 26) * s, rng.uniform(8, 14) * s
                    placer.try_place(_mk(rng, "swimming-pool", x + ln / 2, cy + side * (wd / 2 + pw / 2 + 8 * s),
                                         pl, pw, 0.0), ())
                x += ln + rng.uniform(5, 16) * s
    placer.refresh()

    # vehicles along roads
    for c0, r0, c1, r1, v in plan.rects:
        if v != ROAD:
            continue
        horizontal = (c1 - c0) >= (r1 - r0)
        length = (c1 - c0) if horizontal else (r1 - r0)
        wd = (r1 - r0) if horizontal else (c1 - c0)
        n = int(length / (rng.uniform(60, 160) * s))
        for t in rng.uniform(0, length, n):
            lane = rng.choice((-1, 1)) * wd / 4
            vl, vw = rng.uniform(8, 11) * s, rng.uniform(3.6, 4.6) * s
            if horizontal:
                o = _mk(rng, "vehicle", c0 + t, (r0 + r1) / 2 + lane, vl, vw, 0.0 if lane > 0 else math.pi)
            else:
                o = _mk(rng, "vehicle", (c0 + c1) / 2 + lane, r0 + t, vl, vw, math.pi / 2 if lane < 0 else -math.pi / 2)
            placer.try_place(o, (ROAD,), gap=1)

    # ships on water: some harbour rows, some alone
    water_cells = np.argwhere(placer.lc == WATER)
    if len(water_cells):
        n_ships = int((placer.lc == WATER).sum() * _Placer.Q ** 2 / 50000 * s * s) + 3
        placed = 0
        tries = 0
        while placed < n_ships and tries < n_ships * 12:
            tries += 1
            r, c = water_cells[rng.integers(len(water_cells))] * _Placer.Q
            ang = rng.uniform(0, math.pi)
            group = int(rng.integers(1, 6)) if rng.random() < 0.35 else 1
            ln = rng.uniform(36, 110) * s
            for k in range(group):
                off = k * (ln * 0.2 + rng.uniform(6, 12) * s)
                cx = c - off * math.sin(ang)
                cy = r + off * math.cos(ang)
                lk = ln * rng.uniform(0.85, 1.1)
                o = _mk(rng, "ship", cx, cy, lk, lk * rng.uniform(0.16, 0.24), ang + rng.normal(0, 0.04))
                if placer.try_place(o, (WATER,), gap=3):
                    placed += 1
    return plan


def _plan_count(width: int, height: int, seed: int, cls: str, n: int, gsd: float) -> _Plan:
    """A plain background with exactly ``n`` objects of ``cls`` (for counting)."""
    rng = np.random.default_rng([seed, 11])
    plan = _new_plan(width, height, seed, rng)
    s = 0.5 / gsd
    plan.base = {"storage-tank": BARE, "ship": WATER, "airplane": APRON, "building": URBAN,
                 "vehicle": ROAD, "sports-field": GRASS, "swimming-pool": URBAN}[cls]
    placer = _Placer(plan)
    size = {"storage-tank": (16, 34), "ship": (28, 60), "airplane": (34, 56), "building": (14, 30),
            "vehicle": (8, 11), "sports-field": (40, 70), "swimming-pool": (12, 22)}[cls]
    tries = 0
    while len(plan.objects) < n and tries < 4000:
        tries += 1
        shrink = 0.88 ** (tries // 300)        # crowded: smaller objects rather than fewer
        ln = rng.uniform(*size) * s * shrink
        wd = {"storage-tank": ln, "ship": ln * 0.2, "airplane": ln * 0.95, "building": ln * rng.uniform(0.6, 1),
              "vehicle": ln * 0.42, "sports-field": ln * 0.6, "swimming-pool": ln * 0.55}[cls]
        o = _mk(rng, cls, rng.uniform(0, width), rng.uniform(0, height), ln, wd,
                rng.uniform(0, 2 * math.pi) if cls not in ("storage-tank",) else 0.0, s)
        placer.try_place(o, (), gap=3)
    if len(plan.objects) < n:
        raise UsageError(f"cannot fit {n} {cls} objects in {width} x {height} px",
                         "use a larger chip or fewer objects")
    return plan


# --------------------------------------------------------------------------- #
# Rendering strips.
# --------------------------------------------------------------------------- #
def _render(plan: _Plan, r0: int, r1: int, rng: np.random.Generator,
            objects: Sequence[_Obj], patches: Dict[int, tuple]) -> Tuple[np.ndarray, np.ndarray]:
    """RGB uint8 and class mask of rows [r0:r1] (full width)."""
    w = plan.width
    h = r1 - r0
    lc = _base_landcover(plan, r0, r1, 0, w)
    img = _LC_COLOUR[lc]                                            # (h, w, 3) float32
    noise = rng.standard_normal((h, w), dtype=np.float32)
    crowns = cv2.GaussianBlur(noise, (0, 0), 2.2, borderType=cv2.BORDER_REFLECT) * 3.0
    vary = _interp_rows_cols(plan.vary, r0, r1, 0, w) - 0.5
    lum = noise * _LC_NOISE[lc] + vary * _LC_VARY[lc] * 2 + crowns * _LC_CROWN[lc]
    # field parcels: per-parcel colour and furrow stripes (whole strip, then selected)
    fm = lc == FIELD
    if fm.any():
        xs = np.arange(w, dtype=np.int32)
        ya = r0
        while ya < r1:                       # one band of parcels at a time: 1-D lookups
            band = ya // plan.parcel_h
            yb = min(r1, (band + 1) * plan.parcel_h)
            sl = slice(ya - r0, yb - r0)
            if fm[sl].any():
                bi = band % len(plan.parcel_w)
                shifted = xs + int(plan.parcel_off[bi])
                key = (band % 64) * 64 + (shifted // int(plan.parcel_w[bi])) % 64
                np.copyto(img[sl], plan.parcel_col.reshape(-1, 3)[key][None], where=fm[sl][..., None])
                d = plan.parcel_dir.reshape(-1)[key]          # furrows along 0: x, 1: y, 2: x+y, 3: x-y
                along_x = np.where(d == 1, 0, xs).astype(np.int32)
                along_y = np.array([0, 1, 1, -1], np.int32)[d]
                ys = np.arange(ya, yb, dtype=np.int32)[:, None]
                pos = along_x[None, :] + ys * along_y[None, :]
                furrow = _FURROW[pos % 8 + (8 * plan.parcel_per.reshape(-1)[key])[None, :]]
                furrow -= 22 * (((ys % plan.parcel_h) < 2) | ((shifted % int(plan.parcel_w[bi])) < 2)[None, :])
                lum[sl] += fm[sl] * furrow
            ya = yb
    img += lum[..., None]
    # sun glint on water, a slight cast per band
    wm = lc == WATER
    if wm.any():
        img[wm] += np.array([0, 2, 4], np.float32)
    for c0, pr0, c1, pr1, colour in plan.paint:
        a0, a1 = max(pr0, r0), min(pr1, r1)
        if a0 < a1:
            img[a0 - r0:a1 - r0, c0:c1] = colour
    mask = lc.copy()
    for i, o in enumerate(objects):
        x0, y0, x1, y1 = _obj_window(o, plan.width, plan.height)
        if y1 <= r0 or y0 >= r1:
            continue
        if i not in patches:
            patches[i] = _obj_patch(o, x0, y0, x1, y1)
        body, col, shadow = patches[i]
        a0, a1 = max(y0, r0), min(y1, r1)
        sb = body[a0 - y0:a1 - y0]
        ss = shadow[a0 - y0:a1 - y0]
        view = img[a0 - r0:a1 - r0, x0:x1]
        view[ss] *= 0.55
        view[sb] = col[a0 - y0:a1 - y0][sb] + noise[a0 - r0:a1 - r0, x0:x1][sb][:, None] * 2.5
        mask[a0 - r0:a1 - r0, x0:x1][sb] = OBJECT_BASE + OBJECT_CLASSES.index(o.cls)
    for i in [k for k in patches if _obj_window(objects[k], plan.width, plan.height)[3] <= r1]:
        del patches[i]
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8), mask


def _strips(plan: _Plan, seed: int) -> Iterator[Tuple[int, int, np.ndarray, np.ndarray]]:
    order = sorted(range(len(plan.objects)), key=lambda i: _obj_window(plan.objects[i], plan.width,
                                                                          plan.height)[1])
    objects = [plan.objects[i] for i in order]
    plan.objects[:] = objects
    patches: Dict[int, tuple] = {}
    starts = [_obj_window(o, plan.width, plan.height)[1] for o in objects]
    ends = [_obj_window(o, plan.width, plan.height)[3] for o in objects]
    for r0 in range(0, plan.height, BLOCK):
        r1 = min(plan.height, r0 + BLOCK)
        live_idx = [i for i in range(len(objects)) if starts[i] < r1 and ends[i] > r0]
        live = [objects[i] for i in live_idx]
        local: Dict[int, tuple] = {}
        for j, i in enumerate(live_idx):
            if i in patches:
                local[j] = patches[i]
        rng = np.random.default_rng([seed, 3, r0])
        img, mask = _render(plan, r0, r1, rng, live, local)
        patches = {i: local[j] for j, i in enumerate(live_idx) if j in local}
        yield r0, r1, img, mask


# --------------------------------------------------------------------------- #
# Public API.
# --------------------------------------------------------------------------- #
def scene_transform(gsd: float = DEFAULT_GSD, origin: Tuple[float, float] = DEFAULT_ORIGIN):
    from affine import Affine
    return Affine(gsd, 0.0, origin[0], 0.0, -gsd, origin[1])


def _coeffs(transform) -> Tuple[float, ...]:
    """(a, b, c, d, e, f) of an affine transform (by attribute: works across affine versions)."""
    return tuple(float(getattr(transform, k)) for k in "abcdef")


def pixel_to_map(transform, col: float, row: float) -> Tuple[float, float]:
    a, b, c, d, e, f = _coeffs(transform)
    return a * col + b * row + c, d * col + e * row + f


def _pixel_bounds(transform, box) -> Tuple[float, float, float, float]:
    c0, r0, c1, r1 = box
    xa, ya = pixel_to_map(transform, c0, r0)
    xb, yb = pixel_to_map(transform, c1, r1)
    return (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))


def _check_size(width: int, height: int) -> None:
    if int(width) < 32 or int(height) < 32:
        raise UsageError(f"scene size {width} x {height} is too small", "use at least 32 x 32 pixels")


def make_scene(path: str, width: int = 2048, height: Optional[int] = None, seed: int = 0,
               gsd: float = DEFAULT_GSD, crs: str = DEFAULT_CRS,
               origin: Tuple[float, float] = DEFAULT_ORIGIN, mask_path: Optional[str] = "auto",
               coco_path: Optional[str] = "auto", compress: str = "deflate",
               overwrite: bool = False, count_class: Optional[str] = None, count: int = 0,
               progress=None, cancel=None) -> SceneTruth:
    """Write a seeded synthetic scene to ``path`` (tiled GeoTIFF) with its ground truth.

    ``mask_path`` / ``coco_path``: "auto" writes ``<stem>_mask.tif`` and
    ``<stem>_boxes.json`` beside the scene, None skips them. ``count_class``
    with ``count`` draws a plain background of that class's usual land cover
    with exactly ``count`` objects (counting chips) instead of a landscape.
    """
    height = int(width if height is None else height)
    width = int(width)
    _check_size(width, height)
    if gsd <= 0:
        raise UsageError(f"GSD must be positive, got {gsd}", "use e.g. 0.5 (metres per pixel)")
    if count_class is not None and count_class not in OBJECT_CLASSES:
        raise UsageError(f"unknown object class {count_class!r}", f"use one of {', '.join(OBJECT_CLASSES)}")
    out = Path(path)
    stem = out.with_suffix("")
    mpath = Path(f"{stem}_mask.tif") if mask_path == "auto" else (Path(mask_path) if mask_path else None)
    cpath = Path(f"{stem}_boxes.json") if coco_path == "auto" else (Path(coco_path) if coco_path else None)
    for p in (out, mpath, cpath):
        if p is not None:
            check_output_path(p, overwrite)
    job = Job(progress, cancel, total=(height + BLOCK - 1) // BLOCK)
    plan = _plan_count(width, height, seed, count_class, count, gsd) if count_class else \
        _plan_mixed(width, height, seed, gsd)
    import rasterio
    from rasterio.crs import CRS
    transform = scene_transform(gsd, origin)
    try:
        rcrs = CRS.from_user_input(crs)
    except Exception as exc:
        raise UsageError(f"unknown CRS {crs!r} ({exc})", "use e.g. EPSG:32633") from None
    tiled = width >= BLOCK and height >= BLOCK
    profile = dict(driver="GTiff", width=width, height=height, crs=rcrs, transform=transform,
                   dtype="uint8", tiled=tiled, **({"blockxsize": BLOCK, "blockysize": BLOCK} if tiled else {}))
    if compress and compress != "none":
        profile["compress"] = compress
    img_profile = dict(profile, count=3, photometric="RGB", interleave="pixel")
    mask_profile = dict(profile, count=1, compress="deflate")
    with atomic_path(out) as tmp_img:
        ctx_mask = atomic_path(mpath) if mpath else None
        tmp_mask = ctx_mask.__enter__() if ctx_mask else None
        try:
            with rasterio.open(tmp_img, "w", **img_profile) as dst:
                mdst = rasterio.open(tmp_mask, "w", **mask_profile) if tmp_mask else None
                try:
                    if mdst is not None:
                        mdst.write_colormap(1, _mask_colormap())
                    for r0, r1, img, mask in _strips(plan, seed):
                        win = rasterio.windows.Window(0, r0, width, r1 - r0)
                        dst.write(np.moveaxis(img, -1, 0), window=win)
                        if mdst is not None:
                            mdst.write(mask[None], window=win)
                        job.step()
                finally:
                    if mdst is not None:
                        mdst.close()
            boxes = [TruthBox(i + 1, o.cls, o.box, _pixel_bounds(transform, o.box),
                              round(math.degrees(o.angle) % 360, 2), o.area)
                     for i, o in enumerate(plan.objects)]
            truth = SceneTruth(str(out), str(mpath) if mpath else None, str(cpath) if cpath else None,
                               width, height, int(seed), float(gsd), rcrs.to_string(),
                               _coeffs(transform), boxes)
            if cpath:
                with atomic_path(cpath) as tmp_json:
                    tmp_json.write_text(json.dumps(to_coco(truth, out.name)), encoding="utf-8")
        except BaseException:
            if ctx_mask:
                ctx_mask.__exit__(*__import__("sys").exc_info())
            raise
        if ctx_mask:
            ctx_mask.__exit__(None, None, None)
    return truth


def _mask_colormap() -> Dict[int, Tuple[int, int, int, int]]:
    cmap = {i: (0, 0, 0, 0) for i in range(256)}
    for v in range(1, len(LANDCOVER_CLASSES) + 1):
        r, g, b = (int(c) for c in _LC_COLOUR[v])
        cmap[v] = (r, g, b, 255)
    pal = [(255, 255, 255), (220, 40, 40), (250, 200, 0), (200, 80, 200), (0, 200, 255),
           (0, 255, 0), (0, 120, 255)]
    for i, c in enumerate(pal):
        cmap[OBJECT_BASE + i] = (*c, 255)
    return cmap


def coco_categories() -> List[dict]:
    return [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(OBJECT_CLASSES)]


def to_coco(truth: SceneTruth, file_name: str) -> dict:
    """COCO detection JSON of a scene: pixel ``bbox`` [x, y, w, h], plus ``map_bbox`` and the CRS."""
    cats = {n: i + 1 for i, n in enumerate(OBJECT_CLASSES)}
    anns = []
    for b in truth.boxes:
        c0, r0, c1, r1 = b.pixel
        anns.append({"id": b.id, "image_id": 1, "category_id": cats[b.cls],
                     "bbox": [c0, r0, c1 - c0, r1 - r0], "area": b.area, "iscrowd": 0,
                     "angle": b.angle, "map_bbox": list(b.bounds)})
    return {"info": {"description": "MapCLIP synthetic scene", "seed": truth.seed, "gsd": truth.gsd,
                     "crs": truth.crs, "transform": list(truth.transform)},
            "images": [{"id": 1, "file_name": file_name, "width": truth.width, "height": truth.height}],
            "categories": coco_categories(), "annotations": anns}


def read_truth(coco_path: str) -> List[TruthBox]:
    """Boxes back from a scene's COCO JSON."""
    data = json.loads(Path(coco_path).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in data["categories"]}
    out = []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        out.append(TruthBox(a["id"], names[a["category_id"]], (x, y, x + w, y + h),
                            tuple(a.get("map_bbox") or (0, 0, 0, 0)), a.get("angle", 0.0), a.get("area", 0)))
    return out


def make_chips(truth: SceneTruth, size: int | Tuple[int, int] = 96, n_object: int = 200,
               n_random: int = 50, seed: int = 0, min_visible: float = 0.6,
               classes: Optional[Sequence[str]] = None, n_near: int = 0) -> List[Chip]:
    """Cut square chips from a written scene: ``n_object`` centred (with jitter) on
    objects, balanced over classes, ``n_near`` beside objects (centre moved by
    0.7-1.2 chip sizes: the same context, often without the object, the hard
    negatives of a contrastive model) and ``n_random`` anywhere. ``size`` is a
    pixel size or a (min, max) range. Each chip keeps the boxes of objects at
    least ``min_visible`` inside it, clipped to the chip; the class mask is cut
    alongside, so ``chip.mask`` agrees with the boxes.
    """
    import rasterio
    rng = np.random.default_rng([seed, 5])
    lo, hi = (size, size) if isinstance(size, int) else size
    by_cls: Dict[str, List[TruthBox]] = {}
    for b in truth.boxes:
        if classes is None or b.cls in classes:
            by_cls.setdefault(b.cls, []).append(b)
    centres: List[Tuple[float, float, int]] = []
    names = sorted(by_cls)
    for k in range(n_object if names else 0):
        cls = names[k % len(names)]
        b = by_cls[cls][rng.integers(len(by_cls[cls]))]
        s = int(rng.integers(lo, hi + 1))
        cx, cy = (b.pixel[0] + b.pixel[2]) / 2, (b.pixel[1] + b.pixel[3]) / 2
        j = s * 0.25
        centres.append((cx + rng.uniform(-j, j), cy + rng.uniform(-j, j), s))
    for k in range(n_near if names else 0):
        cls = names[k % len(names)]
        b = by_cls[cls][rng.integers(len(by_cls[cls]))]
        s = int(rng.integers(lo, hi + 1))
        ang = rng.uniform(0, 2 * math.pi)
        d = s * rng.uniform(0.7, 1.2)
        cx, cy = (b.pixel[0] + b.pixel[2]) / 2, (b.pixel[1] + b.pixel[3]) / 2
        centres.append((cx + d * math.cos(ang), cy + d * math.sin(ang), s))
    for _ in range(n_random):
        s = int(rng.integers(lo, hi + 1))
        centres.append((rng.uniform(0, truth.width), rng.uniform(0, truth.height), s))
    chips = []
    stem = Path(truth.path).stem
    with rasterio.open(truth.path) as src, rasterio.open(truth.mask_path) as msrc:
        for k, (cx, cy, s) in enumerate(centres):
            s = min(s, truth.width, truth.height)
            c0 = int(min(max(0, round(cx - s / 2)), truth.width - s))
            r0 = int(min(max(0, round(cy - s / 2)), truth.height - s))
            win = rasterio.windows.Window(c0, r0, s, s)
            img = np.moveaxis(src.read(window=win), 0, -1)
            mask = msrc.read(1, window=win)
            chips.append(Chip(f"{stem}_{k:05d}", np.ascontiguousarray(img), mask,
                              chip_boxes(truth.boxes, c0, r0, s, min_visible), c0, r0, truth.path))
    return chips


def make_cover_chips(truth: SceneTruth, covers: Sequence[str], n: int = 50,
                     size: int | Tuple[int, int] = 96, seed: int = 0, min_cover: float = 0.5,
                     tries: int = 40) -> List[Chip]:
    """Hard negatives: up to ``n`` chips per land cover in ``covers`` (names of
    :data:`LANDCOVER_CLASSES`) that hold NO object pixel and at least ``min_cover``
    of that cover, centred on a random pixel of it: a runway with its centre-line
    marks but no ship, an empty apron, open water, a tank farm's bare ground
    without tanks. A contrastive model that sees them captioned by what they show
    ("a runway", "an airport apron", "water") stops answering "ships" or
    "airplanes" with the ground those objects stand on. Chips are named
    ``<scene>_<cover>_<k>``; a cover the scene lacks (or that never fits) gives fewer.
    """
    import rasterio
    unknown = [c for c in covers if c not in LANDCOVER_CLASSES]
    if unknown:
        raise UsageError(f"unknown land cover {', '.join(unknown)}",
                         f"use one of {', '.join(LANDCOVER_CLASSES)}")
    rng = np.random.default_rng([seed, 11])
    lo, hi = (size, size) if isinstance(size, int) else size
    with rasterio.open(truth.mask_path) as msrc:
        full = msrc.read(1)
    chips: List[Chip] = []
    stem = Path(truth.path).stem
    with rasterio.open(truth.path) as src:
        for cover in covers:
            value = CLASS_VALUE[cover]
            rows, cols = np.nonzero(full == value)
            got = 0
            for _ in range(n * tries if rows.size else 0):
                if got >= n:
                    break
                s = min(int(rng.integers(lo, hi + 1)), truth.width, truth.height)
                i = int(rng.integers(rows.size))
                c0 = int(min(max(0, cols[i] - s // 2), truth.width - s))
                r0 = int(min(max(0, rows[i] - s // 2), truth.height - s))
                m = full[r0:r0 + s, c0:c0 + s]
                if (m >= OBJECT_BASE).any() or float((m == value).mean()) < min_cover:
                    continue
                win = rasterio.windows.Window(c0, r0, s, s)
                img = np.moveaxis(src.read(window=win), 0, -1)
                chips.append(Chip(f"{stem}_{cover}_{got:04d}", np.ascontiguousarray(img), m.copy(), [],
                                  c0, r0, truth.path))
                got += 1
    return chips


def chip_boxes(boxes: Sequence[TruthBox], c0: int, r0: int, s: int,
               min_visible: float = 0.6) -> List[Tuple[str, Tuple[int, int, int, int]]]:
    """Boxes of objects at least ``min_visible`` (by box area) inside the chip, clipped, chip coordinates."""
    out = []
    for b in boxes:
        a0, b0, a1, b1 = b.pixel
        x0, y0, x1, y1 = max(a0, c0), max(b0, r0), min(a1, c0 + s), min(b1, r0 + s)
        if x0 >= x1 or y0 >= y1:
            continue
        if (x1 - x0) * (y1 - y0) < min_visible * (a1 - a0) * (b1 - b0):
            continue
        out.append((b.cls, (x0 - c0, y0 - r0, x1 - c0, y1 - r0)))
    return out


def write_chips(chips: Sequence[Chip], folder: str, masks: bool = True) -> Dict[str, str]:
    """Write chips as PNGs (``images/``, ``masks/``) with one COCO JSON of their boxes
    (``boxes.json``) and the mask class table (``classes.json``). Returns those paths."""
    from PIL import Image
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        (root / "masks").mkdir(parents=True, exist_ok=True)
    cats = {n: i + 1 for i, n in enumerate(OBJECT_CLASSES)}
    images, anns = [], []
    for i, ch in enumerate(chips):
        fn = f"{ch.name}.png"
        Image.fromarray(ch.image).save(root / "images" / fn)
        if masks:
            Image.fromarray(ch.mask).save(root / "masks" / fn)
        images.append({"id": i + 1, "file_name": fn, "width": int(ch.image.shape[1]),
                       "height": int(ch.image.shape[0])})
        for cls, (x0, y0, x1, y1) in ch.boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cats[cls],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    coco = {"images": images, "categories": coco_categories(), "annotations": anns}
    (root / "boxes.json").write_text(json.dumps(coco), encoding="utf-8")
    (root / "classes.json").write_text(json.dumps({str(k): v for k, v in MASK_CLASSES.items()}, indent=1),
                                       encoding="utf-8")
    return {"images": str(root / "images"), "masks": str(root / "masks") if masks else "",
            "boxes": str(root / "boxes.json"), "classes": str(root / "classes.json")}


def make_chip(path: str, cls: str, n: int, size: int = 128, seed: int = 0,
              gsd: float = DEFAULT_GSD, overwrite: bool = False) -> SceneTruth:
    """A small GeoTIFF with exactly ``n`` objects of ``cls`` on its usual ground (counting)."""
    return make_scene(path, size, size, seed=seed, gsd=gsd, count_class=cls, count=n,
                      overwrite=overwrite)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (x0, y0, x1, y1)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0


def average_precision(preds: Sequence[Tuple[float, Sequence[float]]], truth: Sequence[Sequence[float]],
                      iou: float = 0.5) -> float:
    """VOC/COCO-style AP (all-point interpolation) of scored boxes against truth boxes.

    ``preds``: (score, (x0, y0, x1, y1)); ``truth``: boxes. Predictions are
    matched best score first, each truth box at most once, at IoU >= ``iou``.
    """
    if not truth:
        return float("nan")
    tp = _match(preds, truth, iou)
    if not len(tp):
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / len(truth)
    precision = ctp / np.arange(1, len(tp) + 1)
    # precision envelope, then the area under the recall steps
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    r_prev, ap = 0.0, 0.0
    for r, p in zip(recall, precision):
        ap += (r - r_prev) * p
        r_prev = r
    return float(ap)


def precision_recall(preds: Sequence[Tuple[float, Sequence[float]]], truth: Sequence[Sequence[float]],
                     iou: float = 0.5) -> Tuple[float, float]:
    """(precision, recall) of all ``preds`` against ``truth`` at IoU >= ``iou``."""
    tp = _match(preds, truth, iou)
    hits = float(np.sum(tp)) if len(tp) else 0.0
    return (hits / len(tp) if len(tp) else 0.0, hits / len(truth) if truth else 0.0)


def _match(preds, truth, iou: float) -> np.ndarray:
    order = sorted(range(len(preds)), key=lambda i: -float(preds[i][0]))
    used = [False] * len(truth)
    tp = np.zeros(len(order), np.float64)
    for k, i in enumerate(order):
        box = preds[i][1]
        best, best_j = iou, -1
        for j, t in enumerate(truth):
            if not used[j]:
                v = box_iou(box, t)
                if v >= best:
                    best, best_j = v, j
        if best_j >= 0:
            used[best_j] = True
            tp[k] = 1.0
    return tp


__all__ = ["OBJECT_CLASSES", "LANDCOVER_CLASSES", "MASK_CLASSES", "CLASS_VALUE", "TruthBox", "SceneTruth",
           "Chip", "make_scene", "make_chip", "make_chips", "chip_boxes", "write_chips", "to_coco",
           "read_truth", "scene_transform", "box_iou", "average_precision", "precision_recall",
           "pixel_to_map"]
del os
