"""Writing a synthetic scene: the plan rendered strip by strip into a tiled GeoTIFF, its
class mask and its COCO boxes."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ...core.errors import UsageError
from ...core.jobs import Job, atomic_path, check_output_path
from .coco import _mask_colormap, to_coco
from .plan import _plan_count, _plan_mixed
from .render import BLOCK, _strips
from .truth import (DEFAULT_CRS, DEFAULT_GSD, DEFAULT_ORIGIN, OBJECT_CLASSES, SceneTruth, TruthBox, _coeffs,
                    _pixel_bounds, scene_transform)


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


def make_chip(path: str, cls: str, n: int, size: int = 128, seed: int = 0,
              gsd: float = DEFAULT_GSD, overwrite: bool = False) -> SceneTruth:
    """A small GeoTIFF with exactly ``n`` objects of ``cls`` on its usual ground (counting)."""
    return make_scene(path, size, size, seed=seed, gsd=gsd, count_class=cls, count=n,
                      overwrite=overwrite)
