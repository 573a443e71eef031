"""Boxes in pixel space: suppression, union merging, heatmap components, map transform.

Boxes here are float arrays ``(N, 4)`` of ``col0, row0, col1, row1`` in
native raster pixels, the end exclusive (a box of one pixel at (3, 4) is
``3, 4, 4, 5``). Every function is pure numpy (plus OpenCV for connected
components), so it runs the same for the engine, the tests and the plugin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
from .tiling import window_bounds

Bounds = Tuple[float, float, float, float]


def box_area(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box with many."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(box[2], b[:, 2]) - np.maximum(box[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], b[:, 3]) - np.maximum(box[1], b[:, 1]), 0, None)
    inter = iw * ih
    union = box_area(box[None])[0] + box_area(b) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def rank_order(scores: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices best first: by ``scores``, equal scores by ``tiebreak`` (higher first)."""
    scores = np.asarray(scores, dtype=np.float64)
    if tiebreak is None:
        return np.argsort(-scores, kind="stable")
    return np.lexsort((-np.asarray(tiebreak, dtype=np.float64), -scores))


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.0,
        max_keep: int | None = None, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices of the boxes greedy non-maximum suppression keeps, best first.

    A box is dropped when its IoU with a kept, higher-ranked box exceeds
    ``iou``. The default 0 drops every box that overlaps a kept one at all:
    overlapping windows of a sliding grid see the same object (even
    diagonal neighbours, whose IoU is small), and one box per object is
    wanted; raise it to keep neighbouring objects apart.
    ``tiebreak`` orders boxes of equal score (e.g. the cosine beside a
    saturated softmax).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = rank_order(scores, tiebreak)
    keep: List[int] = []
    alive = np.ones(len(order), dtype=bool)
    for pos, i in enumerate(order):
        if not alive[pos]:
            continue
        keep.append(int(i))
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = order[pos + 1:]
        over = iou_one(boxes[i], boxes[rest]) > iou
        alive[pos + 1:] &= ~over
    return np.asarray(keep, dtype=np.int64)


def union_merge(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.0,
                ratio: float = 0.8, max_keep: int | None = None,
                tiebreak: np.ndarray | None = None
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Suppression that grows each kept box to the union of its strong neighbours.

    Like :func:`nms`, the best remaining box is kept and every box overlapping
    it by more than ``iou`` is removed; the kept box is then widened to the
    union of the removed boxes that score at least ``ratio`` times its own
    score, so an object larger than one window comes back as one box that
    covers it, and boxes overlapping the grown box are removed too. Growth
    is one hop (no chaining across a scene).

    Returns ``(merged boxes (K, 4), scores (K,), seed indices (K,))``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64)
    order = rank_order(scores, tiebreak)
    alive = np.ones(len(order), dtype=bool)
    out_boxes, out_scores, seeds = [], [], []
    for pos, i in enumerate(order):
        if not alive[pos]:
            continue
        rest = order[pos + 1:]
        over = (iou_one(boxes[i], boxes[rest]) > iou) & alive[pos + 1:]
        group = rest[over & (scores[rest] >= ratio * scores[i])]
        members = np.concatenate([[i], group]).astype(np.int64)
        merged = np.array([boxes[members, 0].min(), boxes[members, 1].min(),
                           boxes[members, 2].max(), boxes[members, 3].max()])
        alive[pos + 1:] &= ~(over | (iou_one(merged, boxes[rest]) > iou))
        out_boxes.append(merged)
        out_scores.append(scores[i])
        seeds.append(int(i))
        if max_keep is not None and len(seeds) >= max_keep:
            break
    if not seeds:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.stack(out_boxes), np.asarray(out_scores), np.asarray(seeds, dtype=np.int64)


@dataclass
class Component:
    """One connected region of a thresholded heatmap, in heatmap cells."""

    box: Tuple[int, int, int, int]  # col0, row0, col1, row1 (end exclusive)
    peak: float                     # highest value inside
    mean: float                     # mean value inside
    area: int                       # cells
    peak_cell: Tuple[int, int]      # (row, col) of the peak


def heatmap_components(heat: np.ndarray, threshold: float, min_area: int = 1,
                       connectivity: int = 8) -> List[Component]:
    """Connected regions of ``heat >= threshold`` (NaN counts as below), best peak first."""
    import cv2
    h = np.asarray(heat, dtype=np.float32)
    mask = np.nan_to_num(h, nan=-np.inf) >= threshold
    if not mask.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=connectivity)
    comps: List[Component] = []
    filled = np.nan_to_num(h, nan=-np.inf)
    for lab in range(1, n):
        x, y, w, hh, area = (int(v) for v in stats[lab])
        if area < min_area:
            continue
        sub_lab = labels[y:y + hh, x:x + w] == lab
        sub = filled[y:y + hh, x:x + w]
        vals = sub[sub_lab]
        flat = np.where(sub_lab, sub, -np.inf)
        r, c = np.unravel_index(int(np.argmax(flat)), flat.shape)
        comps.append(Component((x, y, x + w, y + hh), float(vals.max()), float(vals.mean()),
                               area, (y + int(r), x + int(c))))
    comps.sort(key=lambda c: -c.peak)
    return comps


def pixel_to_bounds(transform, box) -> Bounds:
    """A pixel box (col0, row0, col1, row1) -> map bounds (xmin, ymin, xmax, ymax).

    All four corners go through the affine transform (engine.geo.tiling's
    window_bounds, the one place that maps pixels to the map), so flipped
    transforms still give the box's true extent.
    """
    c0, r0, c1, r1 = (float(v) for v in box)
    return window_bounds(transform, c0, r0, c1 - c0, r1 - r0)


def object_proposals(rgb: np.ndarray, min_share: float = 0.02) -> np.ndarray:
    """Class-agnostic object boxes in an (H, W, 3) uint8 image: (N, 4) col0, row0, col1, row1.

    Pixels whose colour (CIE Lab, after a 3 x 3 median filter against
    pixel noise) lies far from the image's median colour
    (Otsu's threshold on that distance), opened by a 3 x 3 square, form
    connected regions; each region of at least ``min_share`` of the image
    (and 4 pixels a side) is one proposal. Used to fit detection windows to
    the object inside them (engine.detect, ``DetectOptions.refine``): the
    model chooses among these boxes, they do not name anything themselves.
    """
    import cv2
    img = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[..., :3])
    h, w = img.shape[:2]
    if h < 8 or w < 8:
        return np.zeros((0, 4), np.int64)
    lab = cv2.cvtColor(cv2.medianBlur(img, 3), cv2.COLOR_RGB2LAB).astype(np.float32)
    dist = np.sqrt(((lab - np.median(lab.reshape(-1, 3), axis=0)) ** 2).sum(axis=-1))
    top = float(dist.max())
    if top <= 1e-6:
        return np.zeros((0, 4), np.int64)
    d8 = np.clip(dist * (255.0 / top), 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(d8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    out = [(x, y, x + bw, y + bh) for x, y, bw, bh, area in (stats[i] for i in range(1, n))
           if area >= min_share * h * w and bw >= 4 and bh >= 4]
    return np.asarray(out, np.int64).reshape(-1, 4)


def heatmap_peaks(heat: np.ndarray, threshold: float, min_distance: int = 2, min_area: int = 1,
                  connectivity: int = 8, dip: float = 0.1) -> List[Component]:
    """One region per peak of ``heat``: touching objects that form one blob above
    ``threshold`` come apart, best peak first.

    Peaks are the cells at least ``threshold`` that are the maximum of the
    (2 ``min_distance`` + 1)-cell square around them, kept greedily from the
    highest when no kept peak lies within ``min_distance`` cells and the map
    dips between them: on the straight line to every kept peak, somewhere
    below ``1 - dip`` times the lower peak (so a plateau or a shoulder is one
    object, two bumps with a valley between are two). Each cell of a component of ``heat >= threshold`` (see
    :func:`heatmap_components`, which keeps components of ``min_area`` cells)
    goes to the nearest peak in its component; a component without a peak
    cell of its own keeps one region.
    """
    import cv2
    h = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=-np.inf)
    mask = h >= threshold
    if not mask.any():
        return []
    d = max(1, int(min_distance))
    lifted = np.where(np.isfinite(h), h, np.float32(-1e30)).astype(np.float32)
    local = cv2.dilate(lifted, np.ones((2 * d + 1, 2 * d + 1), np.uint8))
    cand = np.argwhere(mask & (lifted >= local))
    order = np.argsort(-h[cand[:, 0], cand[:, 1]], kind="stable")
    peaks: List[Tuple[int, int]] = []

    def valley(a: Tuple[int, int], b: Tuple[int, int]) -> float:
        n = max(abs(a[0] - b[0]), abs(a[1] - b[1])) + 1
        rows = np.rint(np.linspace(a[0], b[0], n)).astype(int)
        cols = np.rint(np.linspace(a[1], b[1], n)).astype(int)
        return float(h[rows, cols].min())

    for r, c in cand[order]:
        here = (int(r), int(c))
        low = (1.0 - dip) * float(h[here])
        if all(max(abs(r - pr), abs(c - pc)) > d and valley(here, (pr, pc)) < low for pr, pc in peaks):
            peaks.append(here)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=connectivity)
    by_comp: Dict[int, List[Tuple[int, int]]] = {}
    for r, c in peaks:
        by_comp.setdefault(int(labels[r, c]), []).append((r, c))
    out: List[Component] = []
    for lab in range(1, n):
        x, y, w, hh, area = (int(v) for v in stats[lab])
        if area < min_area:
            continue
        cells = np.argwhere(labels[y:y + hh, x:x + w] == lab) + np.array([y, x])
        mine = by_comp.get(lab) or [tuple(cells[int(np.argmax(h[cells[:, 0], cells[:, 1]]))])]
        pk = np.asarray(mine, dtype=np.float64)
        near = np.argmin(((cells[:, None, :] - pk[None, :, :]) ** 2).sum(-1), axis=1)
        for i, (pr, pc) in enumerate(mine):
            part = cells[near == i]
            vals = h[part[:, 0], part[:, 1]]
            out.append(Component((int(part[:, 1].min()), int(part[:, 0].min()),
                                  int(part[:, 1].max()) + 1, int(part[:, 0].max()) + 1),
                                 float(h[pr, pc]), float(vals.mean()), int(len(part)), (int(pr), int(pc))))
    out.sort(key=lambda c: -c.peak)
    return out
