"""Box-to-Caption: detection boxes into image-caption pairs.

RemoteCLIP's data-scaling recipe turns detection and segmentation datasets
into captions; this is its first step (Mask-to-Box, the second, is
:mod:`mask_box`):

**Box-to-Caption** (:func:`box_to_caption`) writes five captions per image:

1. the objects whose box centre lies in the *central region*: the middle
   half of the image in each axis, ``[W/4, 3W/4] x [H/4, 3H/4]`` (bounds
   included; :data:`engine.core.options.CENTRE_FRACTION` is the side of that region as a fraction
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

"""
from __future__ import annotations

import csv
import json
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union
from .annotations import AnnotationSet, ImageAnnotation, read_annotations, resolve_sizes
from ..core.errors import UsageError
from ..core.jobs import CancelFlag, Job, ProgressFn, atomic_path, check_outputs
from ..core.options import CENTRE_FRACTION, BoxCaptionOptions
from .grammar import join_words, normalise_class_name, with_count


PathLike = Union[str, os.PathLike]


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


# --------------------------------------------------------- box-to-caption --
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


def scene_label(image: ImageAnnotation, include_difficult: bool = True) -> str:
    """The image's scene class for recipes that need one (PIR's ``label`` column): the class
    with the most objects in it, the first by name on a tie; ``""`` without objects."""
    c = Counter(normalise_class_name(o.category) for o in image.objects
                if include_difficult or not o.difficult)
    return min(c, key=lambda k: (-c[k], k)) if c else ""


def generate_captions(aset: AnnotationSet, options: Optional[BoxCaptionOptions] = None,
                      job: Optional[Job] = None) -> List[Tuple[ImageAnnotation, List[str]]]:
    """Captions for every image of ``aset`` (images without objects get ``[]``)."""
    o = options or BoxCaptionOptions()
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


def write_captions(rows: Iterable[Tuple[str, ...]], out: Path) -> int:
    """Write (image, caption) or (image, caption, label) rows as CSV (``.csv``), TSV
    (``.tsv``) or JSONL (``.jsonl``), chosen by the suffix; atomically. Returns the row count."""
    suffix = out.suffix.lower()
    rows = list(rows)
    columns = ["image", "caption", "label"][:max((len(r) for r in rows), default=2)]
    n = 0
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if suffix in (".jsonl", ".ndjson"):
                for row in rows:
                    f.write(json.dumps(dict(zip(columns, row))) + "\n")
                    n += 1
            else:
                writer = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",",
                                    lineterminator="\n")
                writer.writerow(columns)
                for row in rows:
                    writer.writerow(row)
                    n += 1
    return n


def box_to_caption(annotations: Union[PathLike, AnnotationSet], out: PathLike,
                   options: Optional[BoxCaptionOptions] = None,
                   progress: Optional[ProgressFn] = None,
                   cancel: Optional[CancelFlag] = None) -> CaptionResult:
    """Read annotations (a path in ``options.format``, or an :class:`AnnotationSet`)
    and write five captions per image with objects to ``out`` (columns image,
    caption, label; image paths relative to ``out``'s folder when possible; the label is
    the image's scene class, :func:`scene_label`, which ``finetune --recipe pir`` reads)."""
    t0 = time.perf_counter()
    o = options or BoxCaptionOptions()
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
    rows = [(_relative(im.path, out.parent), c, scene_label(im, o.include_difficult))
            for im, caps in pairs for c in caps]
    job.check()
    n = write_captions(rows, out)
    empty = [im.name for im, caps in pairs if not caps]
    cats = sorted({normalise_class_name(ob.category) for im in aset.images for ob in im.objects})
    return CaptionResult(out=str(out), images=len(pairs), captioned=len(pairs) - len(empty),
                         captions=n, objects=aset.n_objects, categories=cats, empty=empty,
                         seconds=time.perf_counter() - t0)
