"""What a synthetic scene holds and its exact ground truth: the classes, their mask values,
the objects' boxes, and the scene's georeferencing (pixels -> map)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


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

#: the classes a synthetic scene's land cover is measured with, each with
#: the mask classes it covers: objects count as the land cover they stand on; runway and
#: apron are not counted
SYNTHETIC_CLASSES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("water", ("water", "ship")), ("forest", ("forest",)), ("field", ("field",)),
    ("bare ground", ("bare-ground", "storage-tank")), ("grass", ("grass", "sports-field")),
    ("urban", ("urban", "building", "swimming-pool")), ("road", ("road", "vehicle")))


def synthetic_targets() -> Tuple[List[str], List[List[int]]]:
    """(class names, mask values per class) for engine.classify.compare_to_mask on synthetic scenes."""
    return ([n for n, _ in SYNTHETIC_CLASSES],
            [[CLASS_VALUE[m] for m in masks] for _, masks in SYNTHETIC_CLASSES])


DEFAULT_GSD = 0.5
DEFAULT_CRS = "EPSG:32633"
DEFAULT_ORIGIN = (500000.0, 5300000.0)   # upper-left corner in the CRS (metres)


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

