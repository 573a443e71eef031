"""Fine-tuning from marks: does training on 20 marked places improve the next search?

An analyst marks 20 places on one scene (seed 9401, never a test's or the benchmark's
held-out scene): for each of storage tanks, airplanes, ships and buildings, 3 true objects
"Yes, like this" (captioned by the search's prompt, as the dock writes it) and the prompt's 2
best windows that hold no object of the class "Not this", captioned by the land cover under
them (what an analyst would type: "a runway", "water", ...). The demo model is fine-tuned on
those 20 marks (`finetune --data marks.gpkg --raster scene.tif`, engine.finetune.marks) and
window-mode AP50 is measured before and after on two other held-out scenes (9501, 9502),
by the protocol of engine/quality.py. Goal (issue): the fine-tuned model's AP50 is higher.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARK_SEED, EVAL_SEEDS = 9401, (9501, 9502)
CLASSES = ("storage-tank", "airplane", "ship", "building")
N_POS, N_MARKS = 3, 5           # per class: up to 3 objects "like this", "not this" to make 5
COVER_WORDS = {"water": "water", "forest": "trees", "field": "fields", "bare-ground": "bare ground",
               "grass": "grass", "urban": "a town", "road": "a road", "runway": "a runway",
               "apron": "an airport apron"}


def _marks(tmp: Path, size: int, lm):
    import numpy as np
    import rasterio
    from osgeo import ogr, osr
    from mapclip.engine.core.options import DetectOptions
    from mapclip.engine.data.synthetic.scene import make_scene
    from mapclip.engine.data.synthetic.truth import MASK_CLASSES
    from mapclip.engine.detect import detect
    from mapclip.engine.quality import DETECT_CLASSES
    path, mask = str(tmp / "marked.tif"), str(tmp / "marked_mask.tif")
    truth = make_scene(path, width=size, seed=MARK_SEED, mask_path=mask, coco_path=None)
    with rasterio.open(mask) as m:
        cover = m.read(1)
    marks = []
    for cls in CLASSES:
        prompt, tile = DETECT_CLASSES[cls]
        objs = truth.of(cls)
        n_neg = N_MARKS - min(N_POS, len(objs))
        for b in objs[:N_POS]:
            marks.append(((b.pixel[0] + b.pixel[2]) / 2, (b.pixel[1] + b.pixel[3]) / 2, 1, prompt, None))
        res = detect(path, [prompt], lm, options=DetectOptions(tile_px=tile, window=2, top_k=200, threshold=0.0,
                                                                      refine=False))
        neg = 0
        for b in res.boxes:
            c, r = (b.pixel[0] + b.pixel[2]) / 2, (b.pixel[1] + b.pixel[3]) / 2
            if any(o.pixel[0] <= c <= o.pixel[2] and o.pixel[1] <= r <= o.pixel[3] for o in objs):
                continue
            name = MASK_CLASSES.get(int(cover[int(r), int(c)]), "")
            marks.append((c, r, 0, prompt, COVER_WORDS.get(name, name.replace("-", " ")) or None))
            neg += 1
            if neg == n_neg:
                break
    gpkg = tmp / "marks.gpkg"
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(gpkg))
    srs = osr.SpatialReference()
    srs.SetFromUserInput(truth.crs)
    layer = ds.CreateLayer("marks", srs, ogr.wkbPoint)
    for name, kind in (("label", ogr.OFTInteger), ("prompt", ogr.OFTString), ("caption", ogr.OFTString)):
        layer.CreateField(ogr.FieldDefn(name, kind))
    for c, r, label, prompt, caption in marks:
        f = ogr.Feature(layer.GetLayerDefn())
        x, y = truth.affine * (c, r)
        f.SetGeometry(ogr.CreateGeometryFromWkt(f"POINT ({x} {y})"))
        f.SetField("label", label)
        f.SetField("prompt", prompt)
        if caption:
            f.SetField("caption", caption)
        layer.CreateFeature(f)
    ds = None
    captions = sorted({m[4] for m in marks if m[4]})
    return path, gpkg, len(marks), sum(1 for m in marks if m[2]), captions, np


def measure(tmp: Path, size: int = 1280, epochs: int = 10, lr: float = 5e-5):
    """Marks on the marked scene, the fine-tune, AP50 before and after: a dict of the facts."""
    from mapclip.engine.core.options import FinetuneOptions
    from mapclip.engine.finetune import finetune
    from mapclip.engine.model.models import load_model
    from mapclip.engine.quality import demo_scene, measure_detect
    base = load_model("demo", device="cpu")
    raster, gpkg, n, n_pos, captions, np = _marks(tmp, size, base)
    scenes = [demo_scene(tmp, seed=s, size=size) for s in EVAL_SEEDS]
    before = [measure_detect(base, t, classes=CLASSES) for t in scenes]
    result = finetune(FinetuneOptions(model="demo", data=[str(gpkg)], out=str(tmp / "run"),
                                      raster=raster, epochs=epochs, batch_size=32, lr=lr,
                                      val_split=0.0, workers=0, device="cpu"))
    tuned = load_model(str(result.best_path or tmp / "run" / "last"), device="cpu")
    after = [measure_detect(tuned, t, classes=CLASSES) for t in scenes]
    per_class = {}
    for cls in CLASSES:          # over the scenes that hold the class
        held = [i for i, t in enumerate(scenes) if t.of(cls)]
        if held:
            per_class[cls] = (float(np.mean([before[i][cls]["ap50"] for i in held])),
                              float(np.mean([after[i][cls]["ap50"] for i in held])))
    return {"marks": n, "positive": n_pos, "negative": result.marks["negative"], "captions": captions,
            "seconds": result.seconds, "device": result.device, "per_class": per_class,
            "before": float(np.mean([v[0] for v in per_class.values()])),
            "after": float(np.mean([v[1] for v in per_class.values()]))}


def run(argv) -> None:
    p = argparse.ArgumentParser(prog="bench_marks_training", add_help=False)
    p.add_argument("--full", action="store_true")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-5)
    args, _ = p.parse_known_args(argv)
    size = 2048 if args.full else 1280
    with tempfile.TemporaryDirectory(prefix="mapclip-bench-marks-") as tmp:
        m = measure(Path(tmp), size, args.epochs, args.lr)
    print(f"demo model fine-tuned on {m['marks']} marks of scene {MARK_SEED} ({m['positive']} 'like this', "
          f"{m['negative']} captioned 'not this': {', '.join(m['captions'])}); {args.epochs} "
          f"epochs, lr {args.lr:g}, {m['seconds']:.0f} s on {m['device']}; window AP50 on "
          f"held-out scenes {EVAL_SEEDS} at {size} px")
    print(f"  {'class':14} {'before':>7} {'after':>7}")
    for cls, (b, a) in m["per_class"].items():
        print(f"  {cls:14} {b:7.3f} {a:7.3f}")
    mb, ma = m["before"], m["after"]
    print(f"  mean AP50: before {mb:.3f}, after {ma:.3f} ({ma - mb:+.3f}); goal: higher after: "
          f"{'met' if ma > mb else 'NOT met'}")


if __name__ == "__main__":
    run(sys.argv[1:])
