"""End-to-end quality of the shipped demo model on held-out synthetic scenes.

Random weights test plumbing; these tests test search. With the demo model
(resources/models/demo) on scenes whose seeds were never used in training
they measure per-class AP50 of detect (window and dense modes), precision@10
of text retrieval from an index, and counting accuracy on chips with 1-10
objects, by the protocol in engine/quality.py (which scripts/train_demo_model.py
and the demo use too). Thresholds sit below the values measured for the shipped
model (recorded in resources/models/demo/MODEL_CARD.md) with a margin, so a
break in tiling geometry, georeferencing, box merging or fitting, count
calibration or model loading shows up as a drop in quality.
"""
from __future__ import annotations

import pytest

from mapclip.engine import quality as Q
from mapclip.engine.data.synthetic.scene import make_scene

# Floors: the values measured for the shipped model minus a margin of 0.03 (runs differ by
# about 0.02: float order), over four held-out scenes (Q.DETECT_SEED and Q.FURTHER_SEEDS, 1280 px;
# a class counts on the scenes that hold it: 17 window and 14 dense scene-class pairs).
# Measured 2026-12-07 (boxes fitted to objects): window AP50 storage-tank 0.103, airplane 0.930,
# ship 0.622, sports-field 0.537, building 0.343, mean 0.539 (unfitted 0.185), hit@10 0.766;
# dense AP50 mean 0.149, hit@10 0.236; P@10 0.75 (one index scene); counting within one 0.80
# without the count calibration (0.775 with it: it does not help this model and is left out
# of its defaults; engine.count.fit_count_bias keeps its own tests).
MARGIN = 0.03
MIN_AP50_WINDOW = {"storage-tank": 0.103 - MARGIN, "airplane": 0.930 - MARGIN, "ship": 0.622 - MARGIN,
                   "sports-field": 0.537 - MARGIN, "building": 0.343 - MARGIN}
MIN_MAP50_WINDOW = 0.539 - MARGIN
MIN_FIT_GAIN = (0.539 - 0.185) - MARGIN     # mean window AP50 fitted minus unfitted
MIN_HIT10_WINDOW = 0.766 - MARGIN
MIN_HIT10_DENSE = 0.236 - MARGIN
MIN_MAP50_DENSE = 0.149 - MARGIN
MIN_P_AT_10 = 0.75 - MARGIN
MIN_COUNT_WITHIN_1 = 0.80 - MARGIN


# --------------------------------------------------------------------------- #
# The tests.
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def demo_model():
    from mapclip.engine.model.hub import preset_available
    from mapclip.engine.model.models import load_model
    from mapclip.engine.model.presets import PRESETS
    assert preset_available(PRESETS["demo"]), "resources/models/demo is missing"
    return load_model("demo", device="cpu")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quality")
    return [Q.demo_scene(folder, seed=s) for s in (Q.DETECT_SEED, *Q.FURTHER_SEEDS)]


def test_demo_model_loads_as_shipped(demo_model):
    assert demo_model.arch == "mapclip-demo2"
    assert demo_model.is_vit and demo_model.image_size == 64
    from mapclip.engine.model.presets import RESOURCES_DIR
    weights = RESOURCES_DIR / "models" / "demo" / "open_clip_model.safetensors"
    assert weights.stat().st_size <= 25 * 1024 * 1024


def test_detect_window_ap50(demo_model, scenes):
    # fitted, then unfitted: the second run per scene and class scores the kept pass
    m = [Q.measure_detect(demo_model, t, "window") for t in scenes]
    raw = [Q.measure_detect(demo_model, t, "window", refine=False) for t in scenes]
    for cls, low in MIN_AP50_WINDOW.items():
        assert Q.pooled(m, "ap50", cls) >= low, (cls, m)
    assert Q.pooled(m, "ap50") >= MIN_MAP50_WINDOW, m
    assert Q.pooled(m, "hit@10") >= MIN_HIT10_WINDOW, m
    assert Q.pooled(m, "ap50") >= Q.pooled(raw, "ap50") + MIN_FIT_GAIN, (m, raw)


def test_detect_dense_hits(demo_model, scenes):
    m = [Q.measure_detect(demo_model, t, "dense", Q.DENSE_CLASSES) for t in scenes]
    assert Q.pooled(m, "hit@10") >= MIN_HIT10_DENSE, m
    assert Q.pooled(m, "ap50") >= MIN_MAP50_DENSE, m   # fitted boxes; window-sized components score 0


def test_text_retrieval_precision_at_10(demo_model, tmp_path):
    truth = make_scene(str(tmp_path / "idx_scene.tif"), Q.INDEX_SIZE, seed=Q.INDEX_SEED)
    p = Q.measure_retrieval(demo_model, truth, tmp_path / "index")
    assert Q.mean(p) >= MIN_P_AT_10, p


def test_counting_accuracy(demo_model, tmp_path):
    assert demo_model.defaults.count_bias is None        # left out: it did not help this model
    acc = Q.measure_counting(demo_model, tmp_path)
    assert acc["within_1"] >= MIN_COUNT_WITHIN_1, acc
