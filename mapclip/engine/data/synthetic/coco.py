"""A synthetic scene's ground truth as files: COCO JSON boxes and the class mask's colours."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

from .render import _LC_COLOUR
from .truth import LANDCOVER_CLASSES, OBJECT_BASE, OBJECT_CLASSES, SceneTruth, TruthBox


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
