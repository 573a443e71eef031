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
from mapclip.engine.data import synthetic as S

# thresholds: the values measured for the shipped model (MODEL_CARD.md) minus a margin.
# Measured (boxes fitted to objects, count calibrated): window AP50 storage-tank 0.25, airplane
# 1.00, ship 0.69, sports-field 0.67, building 0.22, mean 0.57 (unfitted 0.22), hit@10 0.78;
# dense AP50 mean 0.07 (unfitted 0.02), hit@10 0.20; P@10 0.75; counting within one 0.78
# (uncalibrated 0.80, chance about 0.28). Runs differ by about 0.02 (float order).
MIN_AP50_WINDOW = {"storage-tank": 0.15, "airplane": 0.85, "ship": 0.55, "sports-field": 0.5,
                   "building": 0.15}
MIN_MAP50_WINDOW = 0.5
MIN_FIT_GAIN = 0.25            # mean window AP50 fitted minus unfitted
MIN_HIT10_WINDOW = 0.7
MIN_HIT10_DENSE = 0.12
MIN_MAP50_DENSE = 0.04
MIN_P_AT_10 = 0.68
MIN_COUNT_WITHIN_1 = 0.7
MAX_CALIBRATION_COST = 0.05    # counting within one, uncalibrated minus calibrated (two chips of 40)


# --------------------------------------------------------------------------- #
# The tests.
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def demo_model():
    from mapclip.engine.model.models import PRESETS, load_model, preset_available
    assert preset_available(PRESETS["demo"]), "resources/models/demo is missing"
    return load_model("demo", device="cpu")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return Q.demo_scene(tmp_path_factory.mktemp("quality"))


def test_demo_model_loads_as_shipped(demo_model):
    assert demo_model.arch == "mapclip-demo2"
    assert demo_model.is_vit and demo_model.image_size == 64
    from mapclip.engine.model.models import RESOURCES_DIR
    weights = RESOURCES_DIR / "models" / "demo" / "open_clip_model.safetensors"
    assert weights.stat().st_size <= 25 * 1024 * 1024


def test_detect_window_ap50(demo_model, scene):
    m = Q.measure_detect(demo_model, scene, "window")
    for cls, low in MIN_AP50_WINDOW.items():
        assert m[cls]["ap50"] >= low, (cls, m)
    assert Q.mean(m, "ap50") >= MIN_MAP50_WINDOW, m
    assert Q.mean(m, "hit@10") >= MIN_HIT10_WINDOW, m
    raw = Q.measure_detect(demo_model, scene, "window", refine=False)
    assert Q.mean(m, "ap50") >= Q.mean(raw, "ap50") + MIN_FIT_GAIN, (m, raw)


def test_detect_dense_hits(demo_model, scene):
    m = Q.measure_detect(demo_model, scene, "dense", Q.DENSE_CLASSES)
    assert Q.mean(m, "hit@10") >= MIN_HIT10_DENSE, m
    assert Q.mean(m, "ap50") >= MIN_MAP50_DENSE, m   # fitted boxes; window-sized components score 0


def test_text_retrieval_precision_at_10(demo_model, tmp_path):
    truth = S.make_scene(str(tmp_path / "idx_scene.tif"), Q.INDEX_SIZE, seed=Q.INDEX_SEED)
    p = Q.measure_retrieval(demo_model, truth, tmp_path / "index")
    assert Q.mean(p) >= MIN_P_AT_10, p


def test_counting_accuracy(demo_model, tmp_path):
    acc = Q.measure_counting(demo_model, tmp_path)
    assert acc["within_1"] >= MIN_COUNT_WITHIN_1, acc
    # the calibration (fitted on other chips) helped the previous model (0.60 -> 0.72); for this
    # one it is within a chip either way: it must not cost more than that
    raw = Q.measure_counting(demo_model, tmp_path, calibrate=False)
    assert acc["within_1"] >= raw["within_1"] - MAX_CALIBRATION_COST, (acc, raw)
