"""Readers for object-detection annotations, into one in-memory form.

Four layouts are read, each into an :class:`AnnotationSet` (images, each with
its size when known and its objects as axis-aligned pixel boxes):

- ``coco``: one JSON file with ``images`` (``id``, ``file_name``, ``width``,
  ``height``), ``annotations`` (``image_id``, ``category_id``, ``bbox`` as
  ``[x, y, w, h]``) and ``categories`` (``id``, ``name``).
- ``dota``: a ``.txt`` file or a folder of them (DOTA's ``labelTxt``), one
  object a line: ``x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]``; header lines
  ``imagesource:...`` and ``gsd:...`` are skipped. The box is the corners'
  bounding box. The image is the label's stem plus the extension found in the
  images folder (``.png``, DOTA's own, when there is no images folder).
- ``yolo``: a ``.txt`` file or a folder of them, one object a line:
  ``class cx cy w h`` normalised to 0..1 (polygon lines ``class x1 y1 x2 y2
  ...``, as YOLO segmentation and OBB labels write them, give their bounding
  box). Class names come from ``classes.txt`` (one a line) or ``data.yaml`` /
  ``dataset.yaml`` (``names:`` as a list or an index map) beside the labels or
  in a parent folder; without them the class index is the name. Coordinates
  are normalised, so the image size is needed: from the image files
  (``images_dir``). Images in ``images_dir`` without a label file are images
  with no objects.
- ``voc``: a Pascal VOC ``.xml`` file or a folder of them (``filename``,
  ``size/width|height``, ``object/name``, ``object/difficult``,
  ``object/bndbox/xmin|ymin|xmax|ymax``).

Image sizes come from the annotation where it has them (COCO, VOC) and
otherwise from the image file's header (PIL, only the header is read) when an
images folder is given. :func:`resolve_sizes` raises a :class:`UsageError`
naming the image when neither gives a size. Bad input (a missing file, corrupt
JSON or XML, an unknown format) raises :class:`UsageError`.
"""
from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ..core.errors import UsageError

FORMATS = ("coco", "dota", "yolo", "voc")
#: YOLO coordinates may stray this far outside 0..1 (rounding in exporters)
YOLO_SLACK = 1e-3
#: extensions tried, in order, when an image is named only by its stem
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")

PathLike = Union[str, os.PathLike]


@dataclass
class ObjectBox:
    """One annotated object: class name and box ``(x0, y0, x1, y1)`` in pixels."""

    category: str
    bbox: Tuple[float, float, float, float]
    difficult: bool = False
    #: where the object was read ("file:line", "annotation 7"), for error messages
    where: str = field(default="", compare=False, repr=False)

    @property
    def centre(self) -> Tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0


@dataclass
class ImageAnnotation:
    """One image: its name as the annotation gives it, its size and its objects.

    ``path`` is the image file resolved against the images folder (or the
    annotation's folder when none was given); it need not exist.
    """

    name: str
    path: str
    width: Optional[int] = None
    height: Optional[int] = None
    objects: List[ObjectBox] = field(default_factory=list)
    #: boxes still in normalised 0..1 coordinates (YOLO before the size is known)
    normalised: bool = False


@dataclass
class AnnotationSet:
    """The images of one annotation source, in the reader's (sorted) order."""

    format: str
    source: str
    images: List[ImageAnnotation]
    categories: List[str]

    @property
    def n_objects(self) -> int:
        return sum(len(im.objects) for im in self.images)


# ------------------------------------------------------------------ entry --
def read_annotations(path: PathLike, fmt: str, images_dir: Optional[PathLike] = None,
                     resolve: bool = True) -> AnnotationSet:
    """Read ``path`` in format ``fmt`` (one of :data:`FORMATS`).

    With ``resolve`` (the default) every image's size is filled in and YOLO
    boxes are turned into pixels (:func:`resolve_sizes`).
    """
    fmt = (fmt or "").lower()
    if fmt not in FORMATS:
        raise UsageError(f"unknown annotation format {fmt!r}",
                         f"use one of: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise UsageError(f"annotations not found: {path}", "check the --annotations path")
    images = Path(images_dir) if images_dir else None
    if images is not None and not images.is_dir():
        raise UsageError(f"images folder not found: {images}", "check the --images path")
    reader = {"coco": read_coco, "dota": read_dota, "yolo": read_yolo, "voc": read_voc}[fmt]
    aset = reader(path, images)
    if resolve:
        resolve_sizes(aset)
    return aset


def resolve_sizes(aset: AnnotationSet) -> AnnotationSet:
    """Fill missing image sizes from the image files and make YOLO boxes pixels."""
    for im in aset.images:
        if im.width is None or im.height is None:
            size = image_size(im.path)
            if size is None:
                hint = ("pass --images DIR, the folder holding the images"
                        if aset.format != "coco" else "add width and height to the COCO images")
                raise UsageError(f"no size for image {im.name!r}: the annotation does not give "
                                 f"it and {im.path} cannot be read", hint)
            im.width, im.height = size
        if im.normalised:
            w, h = im.width, im.height
            im.objects = [ObjectBox(o.category, (o.bbox[0] * w, o.bbox[1] * h,
                                                 o.bbox[2] * w, o.bbox[3] * h), o.difficult,
                                    o.where)
                          for o in im.objects]
            im.normalised = False
        im.objects = [_checked_box(im, o) for o in im.objects]
    return aset


def _checked_box(im: ImageAnnotation, o: ObjectBox) -> ObjectBox:
    """An object whose box is usable, clipped to its image; a UsageError naming the
    record otherwise (a nameless class, a NaN, an empty or inverted box, a box
    wholly outside its image): such boxes would be counted into wrong captions."""
    where = o.where or f"image {im.name!r}"
    if not str(o.category).strip():
        raise UsageError(f"{where}: an object has an empty class name",
                         "give every class a name in the annotations")
    x0, y0, x1, y1 = (float(v) for v in o.bbox)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise UsageError(f"{where}: box {o.bbox} is not finite (NaN or infinity)",
                         "fix or remove that record")
    if x1 <= x0 or y1 <= y0:
        raise UsageError(f"{where}: box {_fmt_box(o.bbox)} has no area (zero or negative "
                         "width or height)", "fix or remove that record")
    W, H = float(im.width), float(im.height)
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(W, x1), min(H, y1)
    if cx1 <= cx0 or cy1 <= cy0:
        raise UsageError(f"{where}: box {_fmt_box(o.bbox)} lies outside its {int(W)} x {int(H)} "
                         f"image {im.name!r}", "fix the box, or the image size in the annotations")
    if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
        return o
    return ObjectBox(o.category, (cx0, cy0, cx1, cy1), o.difficult, o.where)


def _fmt_box(b) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in b) + ")"


def image_size(path: PathLike) -> Optional[Tuple[int, int]]:
    """(width, height) from the image header, or None when it cannot be read."""
    try:
        from PIL import Image
        with Image.open(path) as img:
            return int(img.width), int(img.height)
    except Exception:  # noqa: BLE001 - any unreadable file means "unknown size"
        return None


# ---------------------------------------------------------------- helpers --
def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})",
                         "check that the file is complete COCO JSON") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}", "check the file") from None


def _files(path: Path, suffix: str) -> List[Path]:
    if path.is_file():
        return [path]
    found = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file()
                   and p.name not in ("classes.txt",))
    return found


def find_image(stem_path: Path, images: Optional[Path], default_ext: str) -> Tuple[str, str]:
    """(name, path) of the image named like a label or mask file (same stem) in
    ``images``; the stem plus ``default_ext`` when none is found."""
    stem = stem_path.stem
    if images is not None:
        for ext in IMAGE_EXTENSIONS:
            for cand in (images / f"{stem}{ext}", images / f"{stem}{ext.upper()}"):
                if cand.is_file():
                    return cand.name, str(cand)
        return f"{stem}{default_ext}", str(images / f"{stem}{default_ext}")
    return f"{stem}{default_ext}", str(stem_path.with_name(f"{stem}{default_ext}"))


def _label_folder_set(fmt: str, path, out: List[ImageAnnotation], images, cats) -> AnnotationSet:
    """Finish a folder of per-image label files (DOTA, YOLO): add the images that have
    no label file (images with no objects), sort by name, refuse an empty folder."""
    if not out:
        raise UsageError(f"no {fmt.upper()} label files (.txt) in {path}", "check --annotations")
    seen = {Path(im.name).stem for im in out}
    out.extend(_unlabelled_images(images, seen))
    out.sort(key=lambda im: im.name)
    return AnnotationSet(fmt, str(path), out, sorted(cats))


def _unlabelled_images(images: Optional[Path], seen: set) -> List[ImageAnnotation]:
    """Images in the images folder without any label file: images with no objects."""
    if images is None:
        return []
    out = []
    for p in sorted(images.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and p.stem not in seen:
            out.append(ImageAnnotation(name=p.name, path=str(p)))
    return out


def _num(tok: str, where: str) -> float:
    try:
        v = float(tok)
    except ValueError:
        raise UsageError(f"{where}: {tok!r} is not a number",
                         "check the file's format (--format)") from None
    if not math.isfinite(v):
        raise UsageError(f"{where}: {tok!r} is not a finite number", "fix or remove that record")
    return v


# ------------------------------------------------------------------- COCO --
def read_coco(path: Path, images: Optional[Path] = None) -> AnnotationSet:
    """A COCO detection JSON file; images are resolved against ``images``
    (default: the JSON's folder)."""
    if path.is_dir():
        raise UsageError(f"{path} is a folder; COCO annotations are one JSON file",
                         "pass the .json file to --annotations")
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UsageError(f"{path} is not COCO JSON (no 'images' list)",
                         "check --format, or the file")
    root = images if images is not None else path.parent
    try:
        cats: Dict[int, str] = {}
        for c in data.get("categories", []):
            cname = c["name"]
            if not isinstance(cname, str) or not cname.strip():
                raise UsageError(f"{path}: category {c.get('id')} has no name ({cname!r})",
                                 "give every COCO category a non-empty name")
            if c["id"] in cats:
                raise UsageError(f"{path}: two categories share id {c['id']!r} "
                                 f"({cats[c['id']]!r} and {cname!r})",
                                 "give every COCO category its own id")
            cats[c["id"]] = cname
        by_id: Dict[object, ImageAnnotation] = {}
        for rec in data["images"]:
            name = str(rec["file_name"])
            if rec["id"] in by_id:
                raise UsageError(f"{path}: two images share id {rec['id']!r} "
                                 f"({by_id[rec['id']].name!r} and {name!r})",
                                 "give every COCO image its own id")
            by_id[rec["id"]] = ImageAnnotation(
                name=name, path=str(root / name),
                width=int(rec["width"]) if rec.get("width") else None,
                height=int(rec["height"]) if rec.get("height") else None)
        for ann in data.get("annotations", []):
            im = by_id.get(ann["image_id"])
            if im is None:
                raise UsageError(f"{path}: annotation {ann.get('id')} names unknown image "
                                 f"{ann['image_id']}", "check the COCO file")
            where = f"{path}: annotation {ann.get('id')}"
            x, y, w, h = (float(v) for v in ann["bbox"])
            cid = ann["category_id"]
            if cid not in cats:
                raise UsageError(f"{where} has category_id {cid!r}, which is not in "
                                 f"'categories' ({len(cats)} categories)",
                                 "add the category to 'categories' or fix the annotation")
            if not (w > 0 and h > 0):
                raise UsageError(f"{where}: bbox {ann['bbox']} has no area (width and height "
                                 "must be positive numbers)", "fix or remove that annotation")
            im.objects.append(ObjectBox(cats[cid], (x, y, x + w, y + h), where=where))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{path}: malformed COCO record ({type(exc).__name__}: {exc})",
                         "check the COCO file") from None
    return AnnotationSet("coco", str(path), list(by_id.values()), sorted(set(cats.values())))


# ------------------------------------------------------------------- DOTA --
def read_dota(path: Path, images: Optional[Path] = None) -> AnnotationSet:
    """DOTA label files (a file or a folder of them)."""
    out: List[ImageAnnotation] = []
    cats = set()
    for f in _files(path, ".txt"):
        name, ipath = find_image(f, images, ".png")
        im = ImageAnnotation(name=name, path=ipath)
        for lineno, line in enumerate(_read_lines(f), 1):
            toks = line.split()
            if not toks or line.lower().startswith(("imagesource:", "gsd:")):
                continue  # blank line or DOTA's header
            if len(toks) < 9:
                raise UsageError(f"{f}:{lineno}: expected 8 coordinates and a class, got {line!r}",
                                 "check the file's format (--format)")
            where = f"{f}:{lineno}"
            xs = [_num(t, where) for t in toks[0:8:2]]
            ys = [_num(t, where) for t in toks[1:8:2]]
            cat = toks[8]
            difficult = len(toks) > 9 and toks[9] not in ("0", "0.0")
            im.objects.append(ObjectBox(cat, (min(xs), min(ys), max(xs), max(ys)), difficult,
                                        where))
            cats.add(cat)
        out.append(im)
    return _label_folder_set("dota", path, out, images, cats)


def _read_lines(f: Path) -> List[str]:
    try:
        return [ln.strip() for ln in f.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError as exc:
        raise UsageError(f"cannot read {f}: {exc}", "check the file") from None


# ------------------------------------------------------------------- YOLO --
def yolo_class_names(label_path: Path) -> Optional[List[str]]:
    """Class names for YOLO labels: classes.txt or data.yaml beside them or above."""
    start = label_path if label_path.is_dir() else label_path.parent
    for folder in [start, *start.parents][:4]:
        txt = folder / "classes.txt"
        if txt.is_file():
            return [ln for ln in _read_lines(txt) if ln]
        for name in ("data.yaml", "dataset.yaml", "data.yml", "dataset.yml"):
            y = folder / name
            if y.is_file():
                names = _yaml_names(y)
                if names is not None:
                    return names
    return None


def _yaml_names(path: Path) -> Optional[List[str]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        import yaml
        data = yaml.safe_load(text)
        names = data.get("names") if isinstance(data, dict) else None
    except ImportError:  # pragma: no cover - PyYAML ships with QGIS and most Pythons
        names = _yaml_names_minimal(text)
    except Exception as exc:  # noqa: BLE001 - yaml's own error types
        raise UsageError(f"{path} is not valid YAML ({exc})", "check the dataset YAML") from None
    if isinstance(names, dict):
        n = max(int(k) for k in names) + 1 if names else 0
        return [str(names.get(i, names.get(str(i), i))) for i in range(n)]
    if isinstance(names, list):
        return [str(v) for v in names]
    return None


def _yaml_names_minimal(text: str):
    """``names: [a, b]``, a block list or a block map, without PyYAML."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^names\s*:\s*(.*)$", line)
        if not m:
            continue
        rest = m.group(1).strip()
        if rest.startswith("["):
            return [s.strip().strip("'\"") for s in rest.strip("[]").split(",") if s.strip()]
        items, mapping = [], {}
        for sub in lines[i + 1:]:
            if not sub.startswith((" ", "\t", "-")):
                break
            s = sub.strip()
            if s.startswith("-"):
                items.append(s[1:].strip().strip("'\""))
            elif ":" in s:
                k, v = s.split(":", 1)
                mapping[int(k)] = v.strip().strip("'\"")
        return mapping or items
    return None


def read_yolo(path: Path, images: Optional[Path] = None) -> AnnotationSet:
    """YOLO label files (a file or a folder of them); boxes stay normalised until
    :func:`resolve_sizes` knows each image's size."""
    names = yolo_class_names(path)
    out: List[ImageAnnotation] = []
    cats = set()
    for f in _files(path, ".txt"):
        name, ipath = find_image(f, images, ".jpg")
        im = ImageAnnotation(name=name, path=ipath, normalised=True)
        for lineno, line in enumerate(_read_lines(f), 1):
            toks = line.split()
            if not toks:
                continue
            where = f"{f}:{lineno}"
            if len(toks) < 5 or (len(toks) > 5 and len(toks) % 2 == 0):
                raise UsageError(f"{where}: expected 'class cx cy w h', got {line!r}",
                                 "check the file's format (--format)")
            try:
                fcls = float(toks[0])
                if not fcls.is_integer() or fcls < 0:
                    raise ValueError(toks[0])
                cls = int(fcls)
            except ValueError:
                raise UsageError(f"{where}: class {toks[0]!r} is not a class index (0, 1, 2 ...)",
                                 "check the file's format (--format)") from None
            vals = [_num(t, where) for t in toks[1:]]
            if len(vals) == 4 and (vals[2] <= 0 or vals[3] <= 0):
                raise UsageError(f"{where}: width {vals[2]:g} and height {vals[3]:g} must be "
                                 "positive", "fix or remove that line")
            bad = [v for v in vals if not -YOLO_SLACK <= v <= 1 + YOLO_SLACK]
            if bad:
                raise UsageError(f"{where}: coordinate {bad[0]:g} is outside 0..1 (YOLO "
                                 "coordinates are fractions of the image size)",
                                 "fix that line, or check --format")
            if len(vals) == 4:
                cx, cy, w, h = vals
                box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            else:
                xs, ys = vals[0::2], vals[1::2]
                box = (min(xs), min(ys), max(xs), max(ys))
            if names is not None:
                if not 0 <= cls < len(names):
                    raise UsageError(f"{where}: class {cls} is not in the class names "
                                     f"({len(names)} names)", "check classes.txt / data.yaml")
                cat = names[cls]
            else:
                cat = str(cls)
            im.objects.append(ObjectBox(cat, box, where=where))
            cats.add(cat)
        out.append(im)
    return _label_folder_set("yolo", path, out, images, cats)


# -------------------------------------------------------------------- VOC --
def read_voc(path: Path, images: Optional[Path] = None) -> AnnotationSet:
    """Pascal VOC XML files (a file or a folder of them)."""
    out: List[ImageAnnotation] = []
    cats = set()
    for f in _files(path, ".xml"):
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as exc:
            raise UsageError(f"{f} is not valid XML ({exc})", "check the VOC file") from None
        if root.tag != "annotation":
            raise UsageError(f"{f} is not a Pascal VOC annotation (root <{root.tag}>)",
                             "check --format")
        name = (root.findtext("filename") or "").strip() or f"{f.stem}.jpg"
        base = images if images is not None else f.parent
        w = _int_or_none(root.findtext("size/width"))
        h = _int_or_none(root.findtext("size/height"))
        im = ImageAnnotation(name=name, path=str(base / name), width=w, height=h)
        for obj in root.iter("object"):
            cat = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            if not cat or bb is None:
                raise UsageError(f"{f}: an <object> without <name> or <bndbox>",
                                 "check the VOC file")
            vals = [_num(bb.findtext(k) or "", str(f)) for k in ("xmin", "ymin", "xmax", "ymax")]
            difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "")
            im.objects.append(ObjectBox(cat, tuple(vals), difficult,  # type: ignore[arg-type]
                                        f"{f}: object {cat!r}"))
            cats.add(cat)
        out.append(im)
    if not out:
        raise UsageError(f"no Pascal VOC files (.xml) in {path}", "check --annotations")
    out.sort(key=lambda im: im.name)
    return AnnotationSet("voc", str(path), out, sorted(cats))


def _int_or_none(text: Optional[str]) -> Optional[int]:
    try:
        v = int(float(text)) if text is not None else 0
    except ValueError:
        return None
    return v if v > 0 else None
