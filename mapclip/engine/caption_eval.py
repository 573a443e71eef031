"""Captions of synthetic scenes: Box-to-Caption references, and BLEU-4 / CIDEr of a captioner.

The demo captioning model (mapclip/resources/models/demo-captioner, trained by
scripts/train_demo_captioner.py) learns from chips of synthetic scenes
(engine.data.synthetic) and the captions Box-to-Caption writes for their boxes
(engine.convert.caption_image, five a chip); a chip without objects gets two
sentences about its main land cover instead. The same functions give the
references of held-out chips, so the training script and the quality test
measure alike.

Chips are read through the engine's raster reader at the model's input size
(:func:`engine.caption.read_places`), the path `caption` takes, so a model
sees in training what it sees in use.

BLEU-4 and CIDEr come from pycocoevalcap (the MS-COCO caption evaluation
code; its BLEU and CIDEr scorers are pure Python). Its PTB tokenizer needs
Java, so captions are tokenised here: lower case, words and numbers only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from .caption import generate_captions, read_places
from .data.annotations import ImageAnnotation, ObjectBox
from .data.box_caption import caption_image
from .data.synthetic.truth import MASK_CLASSES, OBJECT_CLASSES, _pixel_bounds

#: the main land cover of an empty chip, in words (engine.data.synthetic.truth.LANDCOVER_CLASSES)
LANDCOVER_WORDS: Dict[str, str] = {
    "water": "water", "forest": "a forest", "field": "fields", "bare-ground": "bare ground",
    "grass": "grass", "urban": "an urban area", "road": "a road", "runway": "a runway",
    "apron": "an airport apron",
}
#: captions of a chip without objects ({} is its main land cover)
EMPTY_TEMPLATES = ("An aerial image of {}.", "A remote sensing image of {}.")
#: the held-out protocol of the model card and tests/engine/test_caption_quality.py
HELDOUT_SEEDS = (8101, 8102)
HELDOUT_SCENE_PX = 1024
HELDOUT_CHIPS = {"n_object": 24, "n_near": 8, "n_random": 8}
CHIP_PX = (64, 128)


@dataclass
class CaptionedChip:
    name: str
    extent: Tuple[float, float, float, float]   # map coordinates of the scene
    references: List[str]
    objects: int
    classes: Tuple[str, ...] = ()               # object classes in the chip (engine.data.synthetic names)


def chip_references(chip, seed: int = 0) -> List[str]:
    """Box-to-Caption's five captions of a chip's boxes, or two land-cover sentences when it has none."""
    h, w = chip.mask.shape[:2]
    if chip.boxes:
        im = ImageAnnotation(chip.name, chip.name + ".png", int(w), int(h),
                             [ObjectBox(cls, tuple(float(v) for v in box)) for cls, box in chip.boxes])
        return caption_image(im, seed=seed)
    vals, counts = np.unique(chip.mask, return_counts=True)
    names = [MASK_CLASSES.get(int(v), "") for v in vals]
    order = sorted(zip(counts.tolist(), names), reverse=True)
    main = next((n for _, n in order if n in LANDCOVER_WORDS), None)
    if main is None:
        return []
    return [t.format(LANDCOVER_WORDS[main]) for t in EMPTY_TEMPLATES]


def scene_chips(truth, n_object: int, n_near: int, n_random: int, seed: int,
                chip_px: Sequence[int] = CHIP_PX, caption_seed: int = 0) -> List[CaptionedChip]:
    """Chips of a written synthetic scene (engine.data.synthetic.chips.make_chips) with their references."""
    import rasterio

    from .data.synthetic.chips import make_chips
    with rasterio.open(truth.path) as src:
        transform = src.transform
    out = []
    for ch in make_chips(truth, size=tuple(chip_px), n_object=n_object, n_near=n_near,
                         n_random=n_random, seed=seed):
        refs = chip_references(ch, caption_seed)
        if not refs:
            continue
        s = ch.image.shape[0]
        extent = _pixel_bounds(transform, (ch.col, ch.row, ch.col + s, ch.row + s))
        out.append(CaptionedChip(ch.name, extent, refs, len(ch.boxes),
                                 tuple(sorted({cls for cls, _ in ch.boxes}))))
    return out


def read_chip_images(raster: str, chips: Sequence[CaptionedChip], size: int) -> np.ndarray:
    """uint8 (N, size, size, 3): the chips read as `caption` reads a place."""
    from .raster.reader import open_raster
    with open_raster(raster, quiet=True) as reader:
        images, _ = read_places(reader, [c.extent for c in chips], None, size)
    return images


def words(text: str) -> str:
    """Lower-case words and numbers of a caption, space separated (the metrics' tokens)."""
    return " ".join(re.findall(r"[a-z0-9]+", str(text).lower()))


def bleu_cider(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> Dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr-D (pycocoevalcap) of one candidate per item against its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    if len(candidates) != len(references) or not candidates:
        raise ValueError("one candidate per item, and at least one item")
    res = {i: [words(c) or "empty"] for i, c in enumerate(candidates)}
    gts = {i: [words(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu1": float(bleu[0]), "bleu2": float(bleu[1]), "bleu3": float(bleu[2]),
            "bleu4": float(bleu[3]), "cider": float(cider)}


def named_classes(text: str) -> set:
    """The synthetic object classes a caption names (singular or plural: "ship", "2 ships")."""
    t = words(text)
    return {c for c in OBJECT_CLASSES
            if re.search(r"\b" + c.replace("-", " ") + r"(s|es)?\b", t)}


def class_scores(candidates: Sequence[str], chips: Sequence[CaptionedChip]) -> Dict[str, float]:
    """Over chips with objects: precision (classes named that are in the chip / classes named)
    and recall (classes of the chip named / classes in the chip) of the generated captions,
    and the share of captions that name only classes in the chip and at least one."""
    named = right = present = found = exact = n = 0
    for text, chip in zip(candidates, chips):
        if not chip.classes:
            continue
        n += 1
        got, truth = named_classes(text), set(chip.classes)
        named += len(got)
        right += len(got & truth)
        present += len(truth)
        found += len(truth & got)
        exact += bool(got) and got <= truth
    return {"class_precision": right / named if named else 0.0,
            "class_recall": found / present if present else 0.0,
            "names_right": exact / n if n else 0.0}


def heldout_set(folder: Path, seeds: Sequence[int] = HELDOUT_SEEDS,
                scene_px: int = HELDOUT_SCENE_PX, chips: Optional[Dict[str, int]] = None
                ) -> List[Tuple[str, List[CaptionedChip]]]:
    """Held-out scenes written in ``folder`` and their chips: [(scene path, chips)]."""
    from .data.synthetic.scene import make_scene
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = dict(HELDOUT_CHIPS, **(chips or {}))
    out = []
    for seed in seeds:
        t = make_scene(str(folder / f"caption_heldout_{seed}.tif"), scene_px, seed=seed, overwrite=True)
        out.append((t.path, scene_chips(t, n["n_object"], n["n_near"], n["n_random"], seed)))
    return out


def measure_captioning(lm, folder: Path, options=None, seeds: Sequence[int] = HELDOUT_SEEDS,
                       scene_px: int = HELDOUT_SCENE_PX, chips: Optional[Dict[str, int]] = None
                       ) -> Dict[str, object]:
    """Generate a caption (engine.caption.generate_captions, default options: beam search) for
    each held-out chip; BLEU-4 / CIDEr against its references, whether it names the chip's
    object classes (:func:`class_scores`), and examples."""
    cands, refs, examples, chips_all = [], [], [], []
    n_chips = 0
    for path, cs in heldout_set(folder, seeds, scene_px, chips):
        images = read_chip_images(path, cs, lm.image_size)
        for k in range(0, len(cs), 16):
            texts = generate_captions(lm, images[k:k + 16], options)
            for c, t in zip(cs[k:k + 16], texts):
                cands.append(t)
                refs.append(c.references)
                chips_all.append(c)
                if len(examples) < 8:
                    examples.append({"chip": c.name, "caption": t, "reference": c.references[0]})
        n_chips += len(cs)
    scores = bleu_cider(cands, refs)
    scores.update(class_scores(cands, chips_all))
    scores.update({"chips": n_chips, "seeds": list(seeds), "scene_px": scene_px,
                   "examples": examples})
    return scores
