"""Measure the demo model's land-cover maps (engine.classify) on held-out synthetic scenes.

    .venv/bin/python scripts/eval_classify_demo.py [--model demo] [--out build/classify-eval]

Prints a Markdown table (pixel accuracy, mIoU, IoU per class) for the
default tile and for 32 px tiles, and the quality test's case (one 512 px
scene, seed 9103, 32 px tiles). scripts/train_demo_model.py's eval stage calls
:func:`measure` and writes :func:`card_lines` into
mapclip/resources/models/demo/MODEL_CARD.md, "Land-cover maps".
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SEEDS = (9101, 9102, 9103)
SCENE_PX = 1536
#: tests/engine/test_classify.py::test_demo_model_land_cover_quality measures this case
TEST_SEED, TEST_PX, TEST_TILE = 9103, 512, 32
CLASSIFY_HEADING = "## Land-cover maps (classify)"


def _quality(lm, path: Path, names, values, opts) -> dict:
    from mapclip.engine.classify import classify, compare_to_mask
    r = classify(str(path), names, lm, options=opts)
    return compare_to_mask(r.class_map, r.transform, path.with_name(path.stem + "_mask.tif"), values, names)


def measure(model, out: Path) -> dict:
    """{"names", "rows": [{label, pixel_accuracy, miou, iou}], "test": {pixel_accuracy, miou}}."""
    import numpy as np
    from mapclip.engine.data.synthetic.truth import synthetic_targets
    from mapclip.engine.model.models import load_model
    from mapclip.engine.core.options import ClassifyOptions
    from mapclip.engine.data.synthetic.scene import make_scene
    names, values = synthetic_targets()
    lm = load_model(model, device="cpu") if isinstance(model, str) else model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in SEEDS:
        p = out / f"scene_{seed}.tif"
        if not p.exists():
            make_scene(str(p), width=SCENE_PX, seed=seed, coco_path=None)
    rows = []
    for label, opts in (("default tile", ClassifyOptions(device="cpu")),
                        ("32 px", ClassifyOptions(tile_px=32, device="cpu"))):
        qs = [_quality(lm, out / f"scene_{seed}.tif", names, values, opts) for seed in SEEDS]
        rows.append({"label": label,
                     "pixel_accuracy": float(np.mean([q["pixel_accuracy"] for q in qs])),
                     "miou": float(np.mean([q["miou"] for q in qs])),
                     "iou": {n: float(np.mean([q["iou"][n] for q in qs if n in q["iou"]] or [0.0]))
                             for n in names}})
    tp = out / f"test_scene_{TEST_SEED}.tif"
    if not tp.exists():
        make_scene(str(tp), width=TEST_PX, seed=TEST_SEED, coco_path=None)
    q = _quality(lm, tp, names, values, ClassifyOptions(tile_px=TEST_TILE, device="cpu"))
    return {"names": list(names), "rows": rows,
            "test": {"pixel_accuracy": float(q["pixel_accuracy"]), "miou": float(q["miou"])}}


def table_lines(res: dict) -> list:
    names = res["names"]
    lines = ["| tiles | pixel accuracy | mIoU | " + " | ".join(names) + " |",
             "| --- " * (3 + len(names)) + "|"]
    for r in res["rows"]:
        lines.append(f"| {r['label']} | {r['pixel_accuracy']:.3f} | {r['miou']:.3f} | "
                     + " | ".join(f"{r['iou'][n]:.2f}" for n in names) + " |")
    return lines


def card_lines(res: dict, default_tile: int) -> list:
    """The model card's land-cover section."""
    t = res["test"]
    return [
        CLASSIFY_HEADING, "",
        "`engine.classify` (docs/classify.md) with this model, classes `" + "; ".join(res["names"])
        + "` (templates `raw`, ClearCLIP block, overlap 0.25), against the land-cover masks",
        f"of {len(SEEDS)} held-out {SCENE_PX} px scenes (seeds {SEEDS[0]}-{SEEDS[-1]}); objects count as the land "
        "cover they stand on",
        "(ships water, buildings and pools urban, vehicles road, storage tanks bare ground, sports fields",
        "grass); runway and apron pixels are not counted. Reproduce with `scripts/eval_classify_demo.py`.",
        "",
    ] + [ln.replace("| default tile |", f"| {default_tile} px (default) |") for ln in table_lines(res)] + [
        "",
        "IoU per class is the mean over the scenes holding or predicting the class (one scene has no town).",
        "The quality test (`tests/engine/test_classify.py::test_demo_model_land_cover_quality`, one "
        f"{TEST_PX} px scene, seed {TEST_SEED}, {TEST_TILE} px tiles: pixel accuracy {t['pixel_accuracy']:.3f}, "
        f"mIoU {t['miou']:.3f}) asserts a little less.",
        "",
    ]


def main() -> None:
    import torch
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--out", default="build/classify-eval")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = measure(args.model, Path(args.out))
    print("\n".join(table_lines(res)))
    print(f"test case (seed {TEST_SEED}, {TEST_PX} px, {TEST_TILE} px tiles): "
          f"pixel accuracy {res['test']['pixel_accuracy']:.3f}, mIoU {res['test']['miou']:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
