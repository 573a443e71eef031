"""Chips cut from a written synthetic scene (objects, their surroundings, bare land cover),
and chips written as PNGs with COCO boxes."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...core.errors import UsageError
from .coco import coco_categories
from .truth import CLASS_VALUE, LANDCOVER_CLASSES, MASK_CLASSES, OBJECT_BASE, OBJECT_CLASSES, SceneTruth, TruthBox


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
