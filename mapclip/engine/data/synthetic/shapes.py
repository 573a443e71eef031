"""The objects of a synthetic scene: what one is, and its pixels (body, colour, shadow)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np

#: shadow direction (dx, dy) in pixels per unit of object height
SUN = (0.6, 0.8)


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
