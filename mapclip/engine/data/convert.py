"""Box-to-Caption and Mask-to-Box: annotations into image-caption pairs.

RemoteCLIP's data-scaling recipe turns detection and segmentation datasets
into captions. Two steps live here:

**Box-to-Caption** (:func:`box_to_caption`) writes five captions per image:

1. the objects whose box centre lies in the *central region*: the middle
   half of the image in each axis, ``[W/4, 3W/4] x [H/4, 3H/4]`` (bounds
   included; :data:`CENTRE_FRACTION` is the side of that region as a fraction
   of the image side), e.g. "There are 2 airplanes in the center of the
   image." or "There is nothing in the center of the image.";
2. the objects whose centre lies outside that region ("... outside the
   center of the image.");
3. to 5. counts of 1 to 3 randomly chosen categories present in the image,
   each with its own template ("There are 3 airplanes and a storage tank in
   the image.", "An aerial image with ...", "A remote sensing image
   containing ...").

Counts of one take an article ("a ship", "an airplane"), two to ten are
digits ("3 ships"), above ten a vague quantity chosen at random ("many
ships", "a lot of ships"). Lists read "A, B and C", largest count first
(captions 1-2) or in the random order drawn (3-5). Images with no objects
get no captions; they are listed in the result. The randomness comes from a
per-image RNG seeded from the seed and the image's name, so the captions of
an image do not depend on the other images or their order.

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

import csv
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .annotations import (AnnotationSet, ImageAnnotation, ObjectBox, find_image, image_size, read_annotations, resolve_sizes)
from ..core.errors import UsageError
from ..core.jobs import CancelFlag, Job, ProgressFn, atomic_path, check_outputs

PathLike = Union[str, os.PathLike]

#: side of the central region as a fraction of the image side (0.5: the middle half)
CENTRE_FRACTION = 0.5
#: counts above this become a vague quantity
MAX_EXACT_COUNT = 10
VAGUE_QUANTITIES = ("many", "a lot of")
CAPTIONS_PER_IMAGE = 5
#: captions 3-5: the template of each (``{things}`` is the list, ``{be}`` is/are)
COUNT_TEMPLATES = (
    "There {be} {things} in the image.",
    "An aerial image with {things}.",
    "A remote sensing image containing {things}.",
)
CENTRE_TEMPLATE = "There {be} {things} in the center of the image."
CENTRE_EMPTY = "There is nothing in the center of the image."
OUTSIDE_TEMPLATE = "There {be} {things} outside the center of the image."
OUTSIDE_EMPTY = "There is nothing outside the center of the image."
#: most categories one counting caption names
MAX_COUNTED_CATEGORIES = 3
#: image batch between progress reports / cancel checks
BATCH = 64

# ----------------------------------------------------------------- words --
#: class names that datasets write run together (DIOR and friends)
KNOWN_SPLITS = {
    "baseballfield": "baseball field", "basketballcourt": "basketball court",
    "groundtrackfield": "ground track field", "golffield": "golf field",
    "storagetank": "storage tank", "tenniscourt": "tennis court",
    "trainstation": "train station", "swimmingpool": "swimming pool",
    "soccerballfield": "soccer ball field", "baseballdiamond": "baseball diamond",
    "containercrane": "container crane", "helipad": "helipad",
}
IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children",
    "foot": "feet", "tooth": "teeth", "goose": "geese", "mouse": "mice", "ox": "oxen",
    "leaf": "leaves", "shelf": "shelves", "knife": "knives", "wife": "wives",
    "life": "lives", "half": "halves", "wolf": "wolves", "calf": "calves",
    "thief": "thieves", "loaf": "loaves", "cactus": "cacti", "hypothesis": "hypotheses",
    "analysis": "analyses", "axis": "axes", "datum": "data", "criterion": "criteria",
}
#: nouns whose plural is the singular
INVARIANT_PLURALS = {
    "sheep", "deer", "fish", "aircraft", "spacecraft", "watercraft", "hovercraft",
    "series", "species", "equipment", "cattle", "people", "police", "offspring",
    "swine", "moose", "bison", "salmon", "trout", "headquarters", "means",
}
#: consonant + o nouns that take -es
O_ES = {"potato", "tomato", "hero", "echo", "torpedo", "veto", "volcano", "tornado", "embargo"}
#: vowel-letter words that sound like a consonant ("a uniform") and the reverse ("an hour")
_A_BEFORE_VOWEL = re.compile(r"^(uni|use|usu|usa|uti|ura|ure|uro|euro|eu|one|once|ubiq|u-)")
_AN_BEFORE_H = re.compile(r"^(hour|honest|honou?r|heir)")
#: letters whose spoken name starts with a vowel sound (acronyms: "an SUV", "a UAV")
_VOWEL_LETTER_NAMES = set("AEFHILMNORSX")


def normalise_class_name(name: str) -> str:
    """A dataset's class name as words: "large-vehicle" -> "large vehicle",
    "storage_tank" -> "storage tank", "StorageTank" -> "storage tank",
    "storagetank" -> "storage tank". Acronyms (all capitals) keep their case."""
    s = str(name).strip()
    s = re.sub(r"[_\-./]+", " ", s)
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z][a-z])|(?<=[a-z])(?=[A-Z])", " ", s)
    words = []
    for w in s.split():
        if len(w) >= 2 and w.isupper() and w.isalpha():
            words.append(w)
        else:
            w = w.lower()
            words.append(KNOWN_SPLITS.get(w, w))
    return " ".join(words)


def _plural_word(word: str) -> str:
    low = word.lower()
    if word.isupper() and len(word) >= 2:
        return word + "s"                     # UAV -> UAVs
    if low in INVARIANT_PLURALS:
        return word
    if low in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[low]
    if re.search(r"(s|x|z|ch|sh)$", low):
        return word + "es"                    # bus, box, church, dish
    if re.search(r"[^aeiou]y$", low):
        return word[:-1] + "ies"              # ferry -> ferries
    if low in O_ES:
        return word + "es"
    return word + "s"


def plural(name: str, n: int = 2) -> str:
    """The normalised class name, in the plural unless ``n == 1``.

    The head noun takes the plural: the last word ("storage tanks", "small
    vehicles"), or the word before "of" ("bags of rice")."""
    words = normalise_class_name(name).split()
    if not words or n == 1:
        return " ".join(words)
    head = len(words) - 1
    if "of" in words[1:]:
        head = words.index("of", 1) - 1
    words[head] = _plural_word(words[head])
    return " ".join(words)


def article(phrase: str) -> str:
    """"a" or "an" for a phrase, by the sound of its first word."""
    word = phrase.split()[0] if phrase.split() else ""
    if not word:
        return "a"
    if word.isupper() and len(word) >= 2:
        return "an" if word[0] in _VOWEL_LETTER_NAMES else "a"
    low = word.lower()
    if low[0] in "aeiou":
        return "a" if _A_BEFORE_VOWEL.match(low) else "an"
    if _AN_BEFORE_H.match(low):
        return "an"
    if low[0].isdigit():
        return "an" if low.startswith(("8", "11", "18")) else "a"
    return "a"


def with_count(name: str, n: int, rng: Optional[random.Random] = None) -> str:
    """``n`` objects of class ``name`` in words: "a storage tank", "an airplane",
    "3 small vehicles", and above :data:`MAX_EXACT_COUNT` a vague quantity
    ("many ships", or "a lot of ships" when ``rng`` picks it); "no ships" for 0."""
    if n == 1:
        singular = plural(name, 1)
        return f"{article(singular)} {singular}"
    many = plural(name, n)
    if n <= 0:
        return f"no {many}"
    if n <= MAX_EXACT_COUNT:
        return f"{n} {many}"
    vague = rng.choice(VAGUE_QUANTITIES) if rng is not None else VAGUE_QUANTITIES[0]
    return f"{vague} {many}"


def join_words(items: Sequence[str]) -> str:
    """"A", "A and B", "A, B and C"."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# --------------------------------------------------------- box-to-caption --
@dataclass
class CaptionOptions:
    """How :func:`box_to_caption` reads and writes."""

    format: str = "coco"                  # one of annotations.FORMATS
    images_dir: Optional[str] = None      # images folder: paths and sizes (needed for YOLO)
    seed: int = 0
    centre_fraction: float = CENTRE_FRACTION
    include_difficult: bool = True        # DOTA / VOC "difficult" objects count too
    overwrite: bool = False


@dataclass
class CaptionResult:
    """What :func:`box_to_caption` wrote."""

    out: str
    images: int                 # images read
    captioned: int              # images that got captions
    captions: int               # rows written
    objects: int
    categories: List[str]       # normalised names, sorted
    empty: List[str]            # images with no objects (no captions)
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def _stable_seed(seed: int, name: str) -> random.Random:
    # random.Random(str) hashes with SHA-512: stable across runs and platforms
    return random.Random(f"{int(seed)}:{name}")


def _be(counts: Sequence[int]) -> str:
    # "There is a ship and 2 planes": the verb agrees with the nearest (first) item
    return "is" if counts and counts[0] == 1 else "are"


def _listing(counter: Counter, order: Sequence[str], rng: random.Random) -> Tuple[str, str]:
    things = [with_count(c, counter[c], rng) for c in order]
    return join_words(things), _be([counter[c] for c in order])


def caption_image(image: ImageAnnotation, seed: int = 0,
                  centre_fraction: float = CENTRE_FRACTION,
                  include_difficult: bool = True) -> List[str]:
    """The five captions of one image (``[]`` when it has no objects).

    The image's size and pixel boxes must be known (:func:`resolve_sizes`)."""
    objs = [o for o in image.objects if include_difficult or not o.difficult]
    if not objs:
        return []
    if image.width is None or image.height is None or image.normalised:
        raise UsageError(f"no size for image {image.name!r}", "pass --images DIR")
    rng = _stable_seed(seed, image.name)
    w, h = float(image.width), float(image.height)
    lo, hi = (1 - centre_fraction) / 2, (1 + centre_fraction) / 2
    centre, outside = Counter(), Counter()
    for o in objs:
        cx, cy = o.centre
        inside = lo * w <= cx <= hi * w and lo * h <= cy <= hi * h
        (centre if inside else outside)[normalise_class_name(o.category)] += 1
    everything = centre + outside

    def by_count(c: Counter) -> List[str]:
        return sorted(c, key=lambda k: (-c[k], k))

    caps = []
    for counter, template, empty in ((centre, CENTRE_TEMPLATE, CENTRE_EMPTY),
                                     (outside, OUTSIDE_TEMPLATE, OUTSIDE_EMPTY)):
        if counter:
            things, be = _listing(counter, by_count(counter), rng)
            caps.append(template.format(be=be, things=things))
        else:
            caps.append(empty)
    cats = sorted(everything)
    for template in COUNT_TEMPLATES:
        k = rng.randint(1, min(MAX_COUNTED_CATEGORIES, len(cats)))
        chosen = rng.sample(cats, k)
        things, be = _listing(everything, chosen, rng)
        text = template.format(be=be, things=things)
        caps.append(text[0].upper() + text[1:])
    return caps


def generate_captions(aset: AnnotationSet, options: Optional[CaptionOptions] = None,
                      job: Optional[Job] = None) -> List[Tuple[ImageAnnotation, List[str]]]:
    """Captions for every image of ``aset`` (images without objects get ``[]``)."""
    o = options or CaptionOptions()
    job = job or Job()
    out = []
    for i, im in enumerate(aset.images):
        out.append((im, caption_image(im, o.seed, o.centre_fraction, o.include_difficult)))
        if (i + 1) % BATCH == 0:
            job.step(BATCH)
    job.step(len(aset.images) % BATCH)
    return out


def _relative(path: str, folder: Path) -> str:
    """``path`` relative to ``folder`` when it can be (same drive), with forward slashes."""
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    except ValueError:
        return Path(path).as_posix()
    return Path(rel).as_posix()


def write_captions(rows: Iterable[Tuple[str, str]], out: Path) -> int:
    """Write (image, caption) rows as CSV (``.csv``), TSV (``.tsv``) or JSONL
    (``.jsonl``), chosen by the suffix; atomically. Returns the row count."""
    suffix = out.suffix.lower()
    n = 0
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if suffix in (".jsonl", ".ndjson"):
                for image, caption in rows:
                    f.write(json.dumps({"image": image, "caption": caption}) + "\n")
                    n += 1
            else:
                writer = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",",
                                    lineterminator="\n")
                writer.writerow(["image", "caption"])
                for row in rows:
                    writer.writerow(row)
                    n += 1
    return n


def box_to_caption(annotations: Union[PathLike, AnnotationSet], out: PathLike,
                   options: Optional[CaptionOptions] = None,
                   progress: Optional[ProgressFn] = None,
                   cancel: Optional[CancelFlag] = None) -> CaptionResult:
    """Read annotations (a path in ``options.format``, or an :class:`AnnotationSet`)
    and write five captions per image with objects to ``out`` (columns image,
    caption; image paths relative to ``out``'s folder when possible)."""
    t0 = time.perf_counter()
    o = options or CaptionOptions()
    if not 0 < o.centre_fraction <= 1:
        raise UsageError(f"centre fraction {o.centre_fraction} is not in (0, 1]",
                         "use e.g. 0.5 for the middle half")
    inputs = [("--images", o.images_dir)]
    if not isinstance(annotations, AnnotationSet):
        inputs.append(("--annotations", annotations))
    out = check_outputs([("--out", out)], inputs, overwrite=o.overwrite)["--out"]
    if out.suffix.lower() not in (".csv", ".tsv", ".jsonl", ".ndjson"):
        raise UsageError(f"unknown caption file type {out.suffix!r} for {out}",
                         "name the output .csv, .tsv or .jsonl")
    if isinstance(annotations, AnnotationSet):
        aset = resolve_sizes(annotations)
    else:
        aset = read_annotations(annotations, o.format, o.images_dir)
    job = Job(progress, cancel, total=len(aset.images))
    job.set_total(len(aset.images))
    pairs = generate_captions(aset, o, job)
    rows = [(_relative(im.path, out.parent), c) for im, caps in pairs for c in caps]
    job.check()
    n = write_captions(rows, out)
    empty = [im.name for im, caps in pairs if not caps]
    cats = sorted({normalise_class_name(ob.category) for im in aset.images for ob in im.objects})
    return CaptionResult(out=str(out), images=len(pairs), captioned=len(pairs) - len(empty),
                         captions=n, objects=aset.n_objects, categories=cats, empty=empty,
                         seconds=time.perf_counter() - t0)


# ------------------------------------------------------------ mask-to-box --
MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".gif")


@dataclass
class MaskOptions:
    """How :func:`mask_to_box` finds regions."""

    min_area: int = 0                      # regions with fewer class pixels are dropped
    ignore_index: Optional[int] = None     # e.g. 0 (background) or 255 (void)
    images_dir: Optional[str] = None       # images named like the masks (by stem)
    overwrite: bool = False
    captions: Optional[str] = None         # also write Box-to-Caption captions here
    seed: int = 0                          # for the captions
    keep_background: bool = False          # box a class named "background" too


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
            cap_result = box_to_caption(aset, cap_out, CaptionOptions(seed=o.seed,
                                                                      overwrite=o.overwrite))
        except BaseException:
            out.unlink(missing_ok=True)  # no half of a chained output
            raise
    return MaskResult(out=str(out), masks=len(files), boxes=len(coco_anns),
                      per_class=dict(sorted(per_class.items())), dropped_small=dropped,
                      unknown_values=dict(sorted(unknown.items())), captions=cap_result,
                      seconds=time.perf_counter() - t0)
