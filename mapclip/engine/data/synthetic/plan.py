"""The plan of a synthetic scene: coarse smooth fields, land-cover rectangles and placed
objects, drawn from the seed before any pixel is rendered."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ...core.errors import UsageError
from .shapes import _Obj, _finalise
from .truth import APRON, BARE, FIELD, FOREST, GRASS, ROAD, RUNWAY, URBAN, WATER

CELL = 32            # coarse plan grid, pixels per cell

# object colours (RGB): roofs, cars, hulls
_ROOFS = np.array([(150, 70, 55), (170, 90, 70), (120, 120, 125), (190, 188, 182),
                   (90, 92, 98), (200, 160, 120), (110, 60, 50)], dtype=np.float32)
_CARS = np.array([(220, 220, 220), (30, 30, 35), (180, 30, 30), (40, 60, 150),
                  (150, 150, 155), (200, 180, 40), (90, 20, 20)], dtype=np.float32)
_HULLS = np.array([(230, 230, 228), (200, 60, 50), (70, 80, 100), (180, 180, 180),
                   (40, 40, 45)], dtype=np.float32)


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
    """A mixed landscape: fields, forest, water, an airport, towns, tank farms, roads.

    Ground first (roads, airports, towns, tank farms), then the objects on it;
    each step draws from the one generator in turn, so the order is part of the seed.
    """
    rng = np.random.default_rng([seed, 7])
    plan = _new_plan(width, height, seed, rng)
    s = 0.5 / gsd   # object sizes are set for 0.5 m/px and scale with the GSD
    placer = _Placer(plan)
    _lay_roads(plan, rng, s)
    placer.refresh()
    airports = _lay_airports(plan, placer, rng, s)
    blocks = _lay_towns(plan, placer, rng, s)
    farms = _lay_tank_farms(plan, placer, rng, s)
    placer.refresh()
    _place_airplanes(placer, rng, s, airports)
    _place_tanks(placer, rng, s, farms)
    _place_buildings(plan, placer, rng, s, blocks)
    placer.refresh()
    _place_vehicles(plan, placer, rng, s)
    _place_ships(placer, rng, s)
    return plan


def _water_frac(placer: _Placer, c0: int, r0: int, c1: int, r1: int) -> float:
    q = _Placer.Q
    sub = placer.lc[r0 // q:r1 // q + 1, c0 // q:c1 // q + 1]
    return float((sub == WATER).mean()) if sub.size else 1.0


def _free_rect(plan: _Plan, placer: _Placer, rng, w: int, h: int, tries: int = 60,
               max_water: float = 0.05) -> Optional[Tuple[int, int, int, int]]:
    """A w x h rectangle clear of the towns, aprons, pads and grounds laid so far, and dry enough."""
    width, height = plan.width, plan.height
    taken = [(a, b, c, d) for a, b, c, d, v in plan.rects if v in (URBAN, APRON, BARE, GRASS)]
    for _ in range(tries):
        c0 = int(rng.integers(8, max(9, width - w - 8)))
        r0 = int(rng.integers(8, max(9, height - h - 8)))
        c1, r1 = min(c0 + w, width - 8), min(r0 + h, height - 8)
        if any(c0 < d1 + 40 and d0 < c1 + 40 and r0 < b1 + 40 and b0 < r1 + 40
               for d0, b0, d1, b1 in taken):
            continue
        if _water_frac(placer, c0, r0, c1, r1) <= max_water:
            return c0, r0, c1, r1
    return None


def _lay_roads(plan: _Plan, rng, s: float) -> None:
    """Long roads across the scene."""
    width, height = plan.width, plan.height
    n_roads = max(1, int(round(math.sqrt(width * height) / 3000))) + int(rng.integers(0, 2))
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


def _lay_airports(plan: _Plan, placer: _Placer, rng, s: float) -> List[tuple]:
    """Airports: grass ground, a runway with markings, an apron; returns the aprons
    as (orientation "h" or "v", c0, r0, c1, r1)."""
    width, height = plan.width, plan.height
    airports = []
    if min(width, height) < 700:
        return airports
    for _ in range(max(1, width * height // (6000 * 6000))):
        horizontal = bool(rng.random() < 0.5)
        along = width if horizontal else height
        run_len = int(min(along - 64, rng.uniform(0.55, 0.8) * along, 4200 * s))
        run_w = int(rng.uniform(60, 80) * s)
        apron_d = int(rng.uniform(150, 190) * s)
        depth = run_w + apron_d + int(90 * s)
        rect = _free_rect(plan, placer, rng, run_len, depth, max_water=0.6) if horizontal else \
            _free_rect(plan, placer, rng, depth, run_len, max_water=0.6)
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
    return airports


def _lay_towns(plan: _Plan, placer: _Placer, rng, s: float) -> List[Tuple[int, int, int, int]]:
    """Towns: urban ground and a street grid; returns the blocks between the streets."""
    width, height = plan.width, plan.height
    n_towns = max(1, int(round(width * height / (1800 * 1800)))) if min(width, height) >= 400 else 0
    blocks = []
    for _ in range(n_towns):
        tw = int(min(width * 0.6, rng.uniform(400, 1000) * s))
        th = int(min(height * 0.6, rng.uniform(400, 1000) * s))
        rect = _free_rect(plan, placer, rng, tw, th, tries=150, max_water=0.2)
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
    return blocks


def _lay_tank_farms(plan: _Plan, placer: _Placer, rng, s: float) -> List[Tuple[int, int, int, int]]:
    """Tank farms: bare pads (the tanks come later); returns the pads."""
    width, height = plan.width, plan.height
    n_farms = max(1, int(round(width * height / (2500 * 2500)))) if min(width, height) >= 300 else 0
    farms = []
    for _ in range(n_farms):
        fw = int(min(width - 40, rng.uniform(180, 420) * s))
        fh = int(min(height - 40, rng.uniform(160, 360) * s))
        rect = _free_rect(plan, placer, rng, fw, fh, max_water=0.0)
        if rect is None:
            continue
        plan.rects.append((*rect, BARE))
        farms.append(rect)
    return farms


def _place_airplanes(placer: _Placer, rng, s: float, airports: Sequence[tuple]) -> None:
    """Airplanes in rows on the aprons."""
    for kind, ax0, ay0, ax1, ay1 in airports:
        horizontal = kind == "h"
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


def _place_tanks(placer: _Placer, rng, s: float, farms: Sequence[Tuple[int, int, int, int]]) -> None:
    """Storage tanks in a grid on each farm's pad, and a few alone on bare ground."""
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
    bare_cells = np.argwhere(placer.lc == BARE)
    for _ in range(int(placer.plan.width * placer.plan.height / 1.5e6) + 1):
        if not len(bare_cells):
            break
        r, c = bare_cells[rng.integers(len(bare_cells))] * _Placer.Q
        d = rng.uniform(24, 60) * s
        placer.try_place(_mk(rng, "storage-tank", c, r, d, d, 0.0), (BARE,))


def _place_buildings(plan: _Plan, placer: _Placer, rng, s: float,
                     blocks: Sequence[Tuple[int, int, int, int]]) -> None:
    """Per town block: a sports field on grass now and then, else buildings in rows along
    the block's edges with pools in some yards."""
    for c0, r0, c1, r1 in blocks:
        if rng.random() < 0.12 and (c1 - c0) > 90 * s and (r1 - r0) > 70 * s:
            plan.rects.append((c0, r0, c1, r1, GRASS))
            ln = min(c1 - c0, r1 - r0) * 0 + min(c1 - c0 - 16, rng.uniform(70, 120) * s)
            wd = min(r1 - r0 - 16, ln * rng.uniform(0.55, 0.7))
            o = _mk(rng, "sports-field", (c0 + c1) / 2, (r0 + r1) / 2, ln, wd,
                    rng.normal(0, 0.05))
            placer.try_place(o, ())
            continue
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


def _place_vehicles(plan: _Plan, placer: _Placer, rng, s: float) -> None:
    """Vehicles along the roads, in both lanes."""
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


def _place_ships(placer: _Placer, rng, s: float) -> None:
    """Ships on water: some in harbour rows, some alone."""
    water_cells = np.argwhere(placer.lc == WATER)
    if not len(water_cells):
        return
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
