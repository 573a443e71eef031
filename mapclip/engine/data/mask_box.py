"""Mask-to-Box: segmentation masks into boxes (and, chained, captions).

RemoteCLIP's data-scaling recipe turns segmentation datasets into detection
boxes, then Box-to-Caption (:mod:`box_caption`) turns those into captions.

**Mask-to-Box** (:func:`mask_to_box`) reads single-band class-index masks
and writes COCO JSON: for each class present, one axis-aligned box per outer
border of the class's contour hierarchy, that is per 8-connected component of
its pixels (OpenCV ``connectedComponentsWithStats``). Consequences, by design:
pixels of a class that touch, also only diagonally, are one region; a hole
makes no region of its own, but a same-class island inside a hole is a
region of its own (its own box) and its pixels are not added to the ring
around it; touching regions of *different* classes stay separate, each in
its own class. A box ``[x, y, w, h]`` covers whole pixels (a single pixel at
column 3, row 5 is ``[3, 5, 1, 1]``); ``area`` is the number of the region's
own pixels. A class named "background" is not boxed unless
``keep_background`` (``--keep-background``) is set. Masks must have the size
of their images.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union
import numpy as np
from .annotations import AnnotationSet, ImageAnnotation, ObjectBox, find_image, image_size
from ..core.errors import UsageError
from ..core.jobs import CancelFlag, Job, ProgressFn, atomic_path, check_outputs
from ..core.options import BoxCaptionOptions, MaskOptions
from .box_caption import CaptionResult, PathLike, box_to_caption


# ------------------------------------------------------------ mask-to-box --
MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".gif")


@dataclass
class MaskResult:
    """What :func:`mask_to_box` wrote."""

    out: str
    masks: int
    boxes: int
    per_class: Dict[str, int]              # class name -> boxes
    dropped_small: int                     # regions under min_area
    unknown_values: Dict[int, int]         # mask value not in CLASSES -> pixels (skipped)
    captions: Optional[CaptionResult]
    seconds: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["unknown_values"] = {str(k): v for k, v in self.unknown_values.items()}
        return d


@dataclass
class Region:
    """One outer contour of one class: box ``(x, y, w, h)`` in whole pixels and
    the class's pixel count inside the contour."""

    class_index: int
    bbox: Tuple[int, int, int, int]
    area: int


def load_classes(classes: Union[PathLike, Mapping, Sequence]) -> Dict[int, str]:
    """Class index -> name, from a JSON file or value: ``{"1": "building"}``,
    ``["background", "building"]`` (index = position) or
    ``[{"id": 1, "name": "building"}]``."""
    data = classes
    if isinstance(classes, (str, os.PathLike)):
        p = Path(classes)
        if not p.is_file():
            raise UsageError(f"classes file not found: {p}", "check the --classes path")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{p} is not valid JSON ({exc.msg} at line {exc.lineno})",
                             'write e.g. {"1": "building", "2": "road"}') from None
    example = 'write e.g. {"1": "building", "2": "road"} or ["background", "building"]'
    try:
        if isinstance(data, (str, bytes)) or not isinstance(data, (Mapping, Sequence)):
            raise TypeError(f"a JSON {type(data).__name__}, not an object or a list")
        if isinstance(data, Mapping):
            pairs = [(int(k), v) for k, v in data.items()]
        elif all(isinstance(v, Mapping) for v in data):
            pairs = [(int(v["id"]), v["name"]) for v in data]
        else:
            pairs = list(enumerate(data))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"classes must map class index to name ({exc})", example) from None
    out: Dict[int, str] = {}
    for k, v in pairs:
        if not isinstance(v, str) or not v.strip():
            raise UsageError(f"class {k} has no name ({v!r}): class names must be non-empty "
                             "text", example)
        if k < 0 or k in out:
            raise UsageError(f"class index {k} is {'negative' if k < 0 else 'given twice'}",
                             example)
        out[k] = v.strip()
    if not out:
        raise UsageError("the classes list is empty", 'write e.g. {"1": "building"}')
    return out


#: a class with this name (any case) is skipped by Mask-to-Box unless kept on purpose
BACKGROUND_NAMES = ("background", "_background_", "bg")


def background_indices(names: Mapping[int, str]) -> List[int]:
    """Class indices whose name says background (see :data:`BACKGROUND_NAMES`)."""
    return [k for k, v in names.items() if v.strip().lower() in BACKGROUND_NAMES]


def read_mask(path: PathLike) -> np.ndarray:
    """A single-band class-index mask as a 2-D integer array (PIL, else rasterio)."""
    path = Path(path)
    arr = None
    try:
        from PIL import Image
        with Image.open(path) as img:
            if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA"):
                raise UsageError(f"mask {path} is {img.mode}, not a single-band class-index image",
                                 "convert colour masks to class indices first")
            arr = np.array(img)
    except UsageError:
        raise
    except Exception:  # noqa: BLE001 - fall back to GDAL for what PIL cannot read
        arr = None
    if arr is None:
        try:
            import rasterio
            with rasterio.open(path) as ds:
                if ds.count != 1:
                    raise UsageError(f"mask {path} has {ds.count} bands, not one",
                                     "masks must be single-band class-index images")
                arr = ds.read(1)
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"cannot read mask {path}: {exc}", "check the file") from None
    if arr.ndim != 2:
        raise UsageError(f"mask {path} is not single-band (shape {arr.shape})",
                         "masks must be single-band class-index images")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise UsageError(f"mask {path} holds non-integer values",
                             "masks must hold class indices")
        arr = arr.astype(np.int64)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


def mask_regions(mask: np.ndarray, classes: Optional[Iterable[int]] = None,
                 ignore_index: Optional[int] = None) -> List[Region]:
    """The regions of a class-index mask: per class value (all present, or those in
    ``classes``), one :class:`Region` per outer contour; sorted by class, then row, column."""
    import cv2
    values = [int(v) for v in np.unique(mask)]
    if classes is not None:
        wanted = set(int(c) for c in classes)
        values = [v for v in values if v in wanted]
    if ignore_index is not None:
        values = [v for v in values if v != int(ignore_index)]
    regions: List[Region] = []
    for v in values:
        binary = (mask == v).astype(np.uint8)
        # every outer border of the contour hierarchy encloses one 8-connected component;
        # an island of the class inside a hole is its own component (its own box), and a
        # ring's area counts only its own pixels, never those of an island in its hole
        n, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        found = [Region(v, (int(s[cv2.CC_STAT_LEFT]), int(s[cv2.CC_STAT_TOP]),
                            int(s[cv2.CC_STAT_WIDTH]), int(s[cv2.CC_STAT_HEIGHT])),
                        int(s[cv2.CC_STAT_AREA]))
                 for s in stats[1:n]]
        regions.extend(sorted(found, key=lambda r: (r.bbox[1], r.bbox[0])))
    return regions


def _mask_files(masks: Path) -> List[Path]:
    if masks.is_file():
        return [masks]
    if not masks.is_dir():
        raise UsageError(f"masks not found: {masks}", "check the --masks path")
    files = sorted(p for p in masks.iterdir()
                   if p.is_file() and p.suffix.lower() in MASK_EXTENSIONS)
    if not files:
        raise UsageError(f"no mask images ({', '.join(MASK_EXTENSIONS)}) in {masks}",
                         "check the --masks folder")
    return files


def mask_to_box(masks: PathLike, classes: Union[PathLike, Mapping, Sequence], out: PathLike,
                options: Optional[MaskOptions] = None,
                progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelFlag] = None) -> MaskResult:
    """Boxes of the regions of every mask in ``masks`` (a folder or one file),
    written as COCO JSON to ``out``; with ``options.captions`` also the
    Box-to-Caption captions of those boxes."""
    t0 = time.perf_counter()
    o = options or MaskOptions()
    if o.min_area < 0:
        raise UsageError(f"min area {o.min_area} is negative", "use 0 or more pixels")
    names = load_classes(classes)
    files = _mask_files(Path(masks))
    inputs = [("--masks", masks), ("--images", o.images_dir)] + [("mask", f) for f in files]
    if isinstance(classes, (str, os.PathLike)):
        inputs.append(("--classes", classes))
    paths = check_outputs([("--out", out), ("--captions", o.captions)], inputs,
                          overwrite=o.overwrite)
    out, cap_out = paths["--out"], paths.get("--captions")
    ignored = set() if o.ignore_index is None else {int(o.ignore_index)}
    if not o.keep_background:
        ignored.update(background_indices(names))
    images_dir = Path(o.images_dir) if o.images_dir else None
    if images_dir is not None and not images_dir.is_dir():
        raise UsageError(f"images folder not found: {images_dir}", "check the --images path")
    job = Job(progress, cancel, total=len(files))
    job.set_total(len(files))
    coco_images, coco_anns = [], []
    per_class: Counter = Counter()
    unknown: Counter = Counter()
    dropped = 0
    aset_images: List[ImageAnnotation] = []
    for image_id, f in enumerate(files, 1):
        mask = read_mask(f)
        h, w = mask.shape
        vals, counts = np.unique(mask, return_counts=True)
        for v, n in zip(vals.tolist(), counts.tolist()):
            if v not in names and v not in ignored:
                unknown[int(v)] += int(n)
        if images_dir is not None:
            file_name, ipath = find_image(f, images_dir, f.suffix)
            size = image_size(ipath)
            if size is not None and size != (int(w), int(h)):
                raise UsageError(f"mask {f} is {w} x {h} pixels but its image {ipath} is "
                                 f"{size[0]} x {size[1]}: its boxes would be misplaced",
                                 "give masks the size of their images (same width and height)")
        else:
            file_name, ipath = f.name, str(f)
        coco_images.append({"id": image_id, "file_name": file_name, "width": int(w),
                            "height": int(h)})
        im = ImageAnnotation(name=file_name, path=ipath, width=int(w), height=int(h))
        for r in mask_regions(mask, [k for k in names if k not in ignored]):
            if r.area < o.min_area:
                dropped += 1
                continue
            x, y, bw, bh = r.bbox
            coco_anns.append({"id": len(coco_anns) + 1, "image_id": image_id,
                              "category_id": r.class_index, "bbox": [x, y, bw, bh],
                              "area": r.area, "iscrowd": 0})
            per_class[names[r.class_index]] += 1
            im.objects.append(ObjectBox(names[r.class_index], (x, y, x + bw, y + bh)))
        aset_images.append(im)
        job.step()
    used = [k for k in sorted(names) if k not in ignored]
    coco = {"info": {"description": "MapCLIP Mask-to-Box", "masks": str(masks)},
            "images": coco_images, "annotations": coco_anns,
            "categories": [{"id": k, "name": names[k]} for k in used]}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(coco, indent=1), encoding="utf-8")
    cap_result = None
    if cap_out is not None:
        aset = AnnotationSet("coco", str(out), aset_images, sorted(set(names.values())))
        try:
            cap_result = box_to_caption(aset, cap_out, BoxCaptionOptions(seed=o.seed,
                                                                      overwrite=o.overwrite))
        except BaseException:
            out.unlink(missing_ok=True)  # no half of a chained output
            raise
    return MaskResult(out=str(out), masks=len(files), boxes=len(coco_anns),
                      per_class=dict(sorted(per_class.items())), dropped_small=dropped,
                      unknown_values=dict(sorted(unknown.items())), captions=cap_result,
                      seconds=time.perf_counter() - t0)
