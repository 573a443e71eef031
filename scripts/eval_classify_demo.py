"""Measure the demo model's land-cover maps (engine.classify) on held-out synthetic scenes.

    .venv/bin/python scripts/eval_classify_demo.py [--out build/classify-eval]

Prints a Markdown table (pixel accuracy, mIoU, IoU per class) for the
default tile and for 32 px tiles; the numbers go into
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


def main() -> None:
    import numpy as np
    import torch

    from mapclip.engine.classify import classify, compare_to_mask
    from mapclip.engine.model.models import load_model
    from mapclip.engine.core.options import ClassifyOptions
    from mapclip.engine.data.synthetic import make_scene
    from mapclip.engine.classify import synthetic_targets
    NAMES, CLASS_VALUES = synthetic_targets()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/classify-eval")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model("demo", device="cpu")
    for seed in SEEDS:
        p = out / f"scene_{seed}.tif"
        if not p.exists():
            make_scene(str(p), width=SCENE_PX, seed=seed, coco_path=None)
    print("| tiles | pixel accuracy | mIoU | " + " | ".join(NAMES) + " |")
    print("| --- " * (3 + len(NAMES)) + "|")
    for label, opts in (("64 px (default)", ClassifyOptions(device="cpu")),
                        ("32 px", ClassifyOptions(tile_px=32, device="cpu"))):
        qs = []
        for seed in SEEDS:
            r = classify(str(out / f"scene_{seed}.tif"), NAMES, lm, options=opts)
            qs.append(compare_to_mask(r.class_map, r.transform, out / f"scene_{seed}_mask.tif",
                                      CLASS_VALUES, NAMES))
        pa = np.mean([q["pixel_accuracy"] for q in qs])
        miou = np.mean([q["miou"] for q in qs])
        ious = [np.mean([q["iou"][n] for q in qs if n in q["iou"]] or [0.0]) for n in NAMES]
        print(f"| {label} | {pa:.3f} | {miou:.3f} | " + " | ".join(f"{v:.2f}" for v in ious) + " |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
