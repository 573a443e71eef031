"""Rendering a synthetic scene's plan, one strip of rows at a time: RGB and class mask."""
from __future__ import annotations

from typing import Dict, Iterator, Sequence, Tuple

import cv2
import numpy as np

from .plan import _Plan, _base_landcover, _interp_rows_cols
from .shapes import _Obj, _obj_patch, _obj_window
from .truth import FIELD, OBJECT_BASE, OBJECT_CLASSES, WATER

BLOCK = 512          # GeoTIFF block size and strip height

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
