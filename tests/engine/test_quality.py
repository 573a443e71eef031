"""End-to-end quality of the shipped demo model on held-out synthetic scenes.

Random weights test plumbing; these tests test search. With the demo model
(resources/models/demo) on scenes whose seeds were never used in training
they measure per-class AP50 of detect (window and dense modes), precision@10
of text retrieval from an index, and counting accuracy on chips with 1-10
objects. Thresholds sit below the values measured when the model was built
(recorded in resources/models/demo/MODEL_CARD.md) with a margin, so a break in
tiling geometry, georeferencing, box merging or model loading shows up as a
drop in quality.

The ``measure_*`` functions are the protocol: scripts/train_demo_model.py
(``--stage eval``) calls the same functions for the model card.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest

from engine import synthetic as S

#: held-out seeds (training used 1000-1009 and 50000+, the dedup check 7001-7002, the demo 4216)
DETECT_SEED = 9008
DETECT_SIZE = 1280
INDEX_SEED = 9032
INDEX_SIZE = 1280
COUNT_SEED = 9100
#: per class: the prompt and the window-mode tile (windows are 2 x 2 tiles, stride 1 tile)
DETECT_CLASSES = {
    "storage-tank": ("storage tanks", 24),
    "airplane": ("airplanes", 32),
    "ship": ("ships", 32),
    "sports-field": ("a soccer field", 48),
    "building": ("buildings", 24),
}
DENSE_CLASSES = ("storage-tank", "airplane", "ship", "sports-field")
RETRIEVAL_QUERIES = {          # query -> what makes a tile relevant
    "storage tanks": ("object", "storage-tank"),
    "airplanes": ("object", "airplane"),
    "ships": ("object", "ship"),
    "buildings": ("object", "building"),
    "water": ("cover", "water"),
    "a runway": ("cover", "runway"),
    "trees": ("cover", "forest"),
    "fields": ("cover", "field"),
}
RETRIEVAL_TILE = 96
COUNT_CLASSES = {"storage-tank": ("storage tanks", 160), "vehicle": ("vehicles", 96)}
COUNT_REPEATS = 2

# thresholds: the values measured for the shipped model (MODEL_CARD.md) minus a margin.
# Measured: window AP50 storage-tank 0.25, ship 0.17, sports-field 0.67 (airplane and building
# 0.00: windows land on the apron / between houses), mean 0.22, hit@10 0.44; dense AP50 0.00
# (components cover whole clusters), dense hit@10 0.30; P@10 0.74; counting within one 0.43
# (chance about 0.28).
MIN_AP50_WINDOW = {"storage-tank": 0.12, "ship": 0.05, "sports-field": 0.4}
MIN_MAP50_WINDOW = 0.12
MIN_HIT10_WINDOW = 0.3
MIN_HIT10_DENSE = 0.15
MIN_P_AT_10 = 0.6
MIN_COUNT_WITHIN_1 = 0.3


# --------------------------------------------------------------------------- #
# The protocol.
# --------------------------------------------------------------------------- #
def demo_scene(folder: Path, seed: int = DETECT_SEED, size: int = DETECT_SIZE) -> S.SceneTruth:
    return S.make_scene(str(Path(folder) / f"scene_{seed}.tif"), size, seed=seed, overwrite=True)


def centre_precision(boxes: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], k: int = 10) -> float:
    """Share of the first ``k`` boxes (best first) that hold the centre of a true object."""
    cs = [((t[0] + t[2]) / 2, (t[1] + t[3]) / 2) for t in truth]
    top = list(boxes)[:k]
    good = sum(1 for b in top if any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for x, y in cs))
    return good / len(top) if top else 0.0


def measure_detect(lm, truth: S.SceneTruth, mode: str = "window",
                   classes: Sequence[str] = tuple(DETECT_CLASSES)) -> Dict[str, Dict[str, float]]:
    """Per class, one detect call (its prompt against the background prompts):
    AP50 of all boxes, and the share of the best 10 boxes on a true object."""
    from engine.detect import DetectOptions, detect
    out = {}
    for cls in classes:
        prompt, tile = DETECT_CLASSES[cls]
        if mode == "window":
            opts = DetectOptions(mode="window", tile_px=tile, window=2, stride=1, top_k=200,
                                 heatmap=False)
        else:
            opts = DetectOptions(mode="dense", tile_px=64, top_k=200, threshold=0.3, heatmap=True)
        res = detect(truth.path, [prompt], lm, options=opts)
        gt = [b.pixel for b in truth.of(cls)]
        out[cls] = {"ap50": S.average_precision([(b.score, b.pixel) for b in res.boxes], gt, 0.5),
                    "hit@10": centre_precision([b.pixel for b in res.boxes], gt, 10)}
    return out


def measure_retrieval(lm, truth: S.SceneTruth, index_dir: Path, k: int = 10) -> Dict[str, float]:
    """precision@k per query of text search over an index of the scene's tiles."""
    import rasterio
    from engine.index import IndexOptions, build_index, search_index
    build_index([truth.path], str(index_dir), lm, IndexOptions(tile_px=RETRIEVAL_TILE))
    with rasterio.open(truth.mask_path) as m:
        mask = m.read(1)
    out = {}
    for query, (kind, cls) in RETRIEVAL_QUERIES.items():
        hits = search_index(str(index_dir), text=query, model=lm)[:k]
        good = 0
        for h in hits:
            c, r, w, hh = h.pixel
            if kind == "object":
                good += bool(S.chip_boxes(truth.of(cls), c, r, w, min_visible=0.5))
            else:
                good += float((mask[r:r + hh, c:c + w] == S.CLASS_VALUE[cls]).mean()) >= 0.3
        out[query] = good / max(1, len(hits))
    return out


def measure_counting(lm, folder: Path) -> Dict[str, float]:
    """Prompt (RemoteCount) counting on chips with 1-10 objects: exact and within-one accuracy."""
    from engine.count import count
    exact, near, n = 0, 0, 0
    errs: List[int] = []
    for cls, (name, size) in COUNT_CLASSES.items():
        for k in range(1, 11):
            for r in range(COUNT_REPEATS):
                seed = COUNT_SEED + 100 * r + k + 1000 * S.OBJECT_CLASSES.index(cls)
                chip = S.make_chip(str(Path(folder) / f"count_{cls}_{k}_{r}.tif"), cls, k, size=size,
                                   seed=seed, overwrite=True)
                got = count(chip.path, name, lm, method="prompt").count
                exact += got == k
                near += abs(got - k) <= 1
                errs.append(abs(got - k))
                n += 1
    return {"exact": exact / n, "within_1": near / n, "mae": float(np.mean(errs)), "chips": n}


def mean(d: Dict[str, float], key: str = "") -> float:
    vals = [(v[key] if key else v) for v in d.values()]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else 0.0


# --------------------------------------------------------------------------- #
# The tests.
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def demo_model():
    from engine.models import PRESETS, load_model, preset_available
    assert preset_available(PRESETS["demo"]), "resources/models/demo is missing"
    return load_model("demo", device="cpu")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return demo_scene(tmp_path_factory.mktemp("quality"))


def test_demo_model_loads_as_shipped(demo_model):
    assert demo_model.arch == "mapclip-demo"
    assert demo_model.is_vit and demo_model.image_size == 64
    from engine.models import RESOURCES_DIR
    weights = RESOURCES_DIR / "models" / "demo" / "open_clip_model.safetensors"
    assert weights.stat().st_size <= 25 * 1024 * 1024


def test_detect_window_ap50(demo_model, scene):
    m = measure_detect(demo_model, scene, "window")
    for cls, low in MIN_AP50_WINDOW.items():
        assert m[cls]["ap50"] >= low, (cls, m)
    assert mean(m, "ap50") >= MIN_MAP50_WINDOW, m
    assert mean(m, "hit@10") >= MIN_HIT10_WINDOW, m


def test_detect_dense_hits(demo_model, scene):
    m = measure_detect(demo_model, scene, "dense", DENSE_CLASSES)
    # AP50 is recorded in the model card, not asserted: dense components merge clustered objects
    assert mean(m, "hit@10") >= MIN_HIT10_DENSE, m


def test_text_retrieval_precision_at_10(demo_model, tmp_path):
    truth = S.make_scene(str(tmp_path / "idx_scene.tif"), INDEX_SIZE, seed=INDEX_SEED)
    p = measure_retrieval(demo_model, truth, tmp_path / "index")
    assert mean(p) >= MIN_P_AT_10, p


def test_counting_accuracy(demo_model, tmp_path):
    acc = measure_counting(demo_model, tmp_path)
    assert acc["within_1"] >= MIN_COUNT_WITHIN_1, acc
