"""The demo captioning model (mapclip/resources/models/demo-captioner) and its metrics.

The quality guard runs the protocol of its model card (engine.caption_eval,
held-out seeds never used in training) and holds BLEU-4 and CIDEr above the
card's numbers minus a margin. The helpers (references, metrics) and the CoCa
decoder's initialisation are checked on their own.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from mapclip.engine import caption_eval as CE
from mapclip.engine.caption import caption, can_generate
from mapclip.engine.model.architectures import arch_config, build_model
from mapclip.engine.model.hub import preset_available
from mapclip.engine.model.models import load_model
from mapclip.engine.model.presets import PRESETS, RESOURCES_DIR
from mapclip.engine.data.synthetic.chips import Chip

CARD = RESOURCES_DIR / "models" / "demo-captioner" / "MODEL_CARD.md"
#: below the card's numbers (generation is deterministic; the margin covers other CPUs' float noise)
MARGIN_BLEU4, MARGIN_CIDER, MARGIN_NAMES = 0.05, 0.25, 0.06


def _card_numbers():
    """BLEU-4, CIDEr and "names only what is there" from the model card's tables."""
    text = CARD.read_text(encoding="utf-8")
    row = re.search(r"\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \|", text)
    names = re.search(r"\| ([\d.]+) \| ([\d.]+) \| \*\*([\d.]+)\*\* \|", text[row.end():] if row else "")
    assert row and names, "the evaluation tables of the model card"
    return float(row.group(4)), float(row.group(5)), float(names.group(3))


@pytest.fixture(scope="module")
def captioner():
    assert preset_available(PRESETS["demo-captioner"]), "mapclip/resources/models/demo-captioner is missing"
    return load_model("demo-captioner", device="cpu")


def test_demo_captioner_is_a_small_coca_within_the_size_budget(captioner):
    assert can_generate(captioner)
    folder = RESOURCES_DIR / "models"
    size = sum(p.stat().st_size for p in (folder / "demo-captioner").iterdir()) + \
        sum(p.stat().st_size for p in (folder / "demo").iterdir())
    assert size <= 40e6, f"demo + demo-captioner are {size / 1e6:.1f} MB (budget 40 MB)"
    assert captioner.defaults.tile_px * captioner.defaults.window == 96


def test_demo_captioner_bleu4_and_cider_on_held_out_scenes(captioner, tmp_path):
    bleu4, cider, names_right = _card_numbers()
    torch.set_num_threads(1)
    m = CE.measure_captioning(captioner, tmp_path)      # about 30 s on one shared CPU thread
    assert m["chips"] >= 60
    assert m["bleu4"] >= bleu4 - MARGIN_BLEU4, m
    assert m["cider"] >= cider - MARGIN_CIDER, m
    assert m["names_right"] >= names_right - MARGIN_NAMES, m
    # the numbers in the card are this protocol's, to the digits shown
    assert abs(m["bleu4"] - bleu4) < 0.02 and abs(m["cider"] - cider) < 0.1, (m, bleu4, cider)


def test_demo_captioner_names_the_object_of_a_held_out_chip(captioner, tmp_path):
    from mapclip.engine.data.synthetic.scene import make_scene
    truth = make_scene(str(tmp_path / "s.tif"), 512, seed=9302)
    hits = 0
    tanks = [b for b in truth.boxes if b.cls in ("storage-tank", "airplane", "ship")][:4]
    assert tanks
    for b in tanks:
        cx, cy = (b.bounds[0] + b.bounds[2]) / 2, (b.bounds[1] + b.bounds[3]) / 2
        r = caption(truth.path, captioner, [(cx - 24, cy - 24, cx + 24, cy + 24)])
        assert r.method == "generation"
        hits += b.cls.replace("-", " ") in r.places[0].best.lower()
    assert hits >= len(tanks) - 1, hits


def test_references_are_box_to_caption_or_land_cover():
    mask = np.full((64, 64), 1, np.uint8)                       # water
    chip = Chip("c", np.zeros((64, 64, 3), np.uint8), mask, [("ship", (20, 20, 40, 44))], 0, 0, "")
    refs = CE.chip_references(chip)
    assert len(refs) == 5 and refs[0] == "There is a ship in the center of the image."
    empty = Chip("e", np.zeros((64, 64, 3), np.uint8), mask, [], 0, 0, "")
    assert CE.chip_references(empty) == ["An aerial image of water.", "A remote sensing image of water."]


def test_bleu_and_cider_reward_the_right_caption():
    refs = [["There is a ship in the center of the image.", "An aerial image with a ship."],
            ["There are 2 airplanes in the image.", "An aerial image with 2 airplanes."]]
    good = CE.bleu_cider(["there is a ship in the center of the image",
                          "there are 2 airplanes in the image"], refs)
    bad = CE.bleu_cider(["there are 2 airplanes in the image",
                         "there is a ship in the center of the image"], refs)
    assert math.isclose(good["bleu4"], 1.0, abs_tol=1e-6) and good["cider"] > 2 * bad["cider"]
    assert bad["bleu4"] < 0.5
    with pytest.raises(ValueError):
        CE.bleu_cider([], [])


def test_coca_decoder_output_layer_is_initialised_and_seeded():
    """open_clip leaves the CoCa decoder's text_projection as torch.empty (any bytes, NaN at
    times); the engine initialises it from the seeded generator."""
    cfg = arch_config("mapclip-coca-tiny")
    garbage = torch.full((4096, 4096), float("nan"))             # dirty the allocator
    del garbage
    projs = []
    for _ in range(2):
        torch.manual_seed(0)
        projs.append(build_model(cfg).text_decoder.text_projection.detach().clone())
    assert torch.isfinite(projs[0]).all()
    assert torch.equal(projs[0], projs[1])
    width = cfg["multimodal_cfg"]["width"]
    assert abs(float(projs[0].std()) - width ** -0.5) < 0.2 * width ** -0.5


def test_class_scores_count_what_a_caption_names():
    assert CE.named_classes("There are 2 storage tanks and a ship.") == {"storage-tank", "ship"}
    assert CE.named_classes("An aerial image of a sports field") == {"sports-field"}
    assert CE.named_classes("shipyard water") == set()
    chips = [CE.CaptionedChip("a", (0, 0, 1, 1), ["x"], 2, ("ship", "vehicle")),
             CE.CaptionedChip("b", (0, 0, 1, 1), ["x"], 1, ("airplane",)),
             CE.CaptionedChip("c", (0, 0, 1, 1), ["x"], 0, ())]          # no objects: not counted
    s = CE.class_scores(["There is a ship in the image", "There is a ship", "water"], chips)
    assert s["class_precision"] == 0.5 and s["names_right"] == 0.5
    assert math.isclose(s["class_recall"], 1 / 3)
