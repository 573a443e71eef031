"""Examples benchmark: does a prompt plus a few marked places rank better than the prompt alone?

On held-out synthetic scenes (seeds 9301-9303, used by nothing else), for each class of
engine.quality.DETECT_CLASSES, with the demo model in window mode:

- the prompt alone;
- the prompt with 3 positive examples (centres of 3 true objects of the class) and 3
  negatives (the best-scoring windows of the prompt alone that hold no object of the
  class: what an analyst marks "not this" first), by each method of
  engine.core.options.EXAMPLE_METHODS;

hit@10 = share of the 10 best boxes holding the centre of a true object that was NOT given
as an example. Goal (issue): >= 0.9, or >= 0.2 above the prompt alone. Each scene is
embedded once; every other ranking comes from the kept pass (engine.cache).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEEDS = (9301, 9302, 9303)
N_POS = N_NEG = 3
GOAL, GOAL_GAIN = 0.9, 0.2


def _holds(box, centres):
    return [i for i, (x, y) in enumerate(centres) if box[0] <= x <= box[2] and box[1] <= y <= box[3]]


def hit_at_10(boxes, centres, given) -> float:
    top = boxes[:10]
    if not top:
        return 0.0
    return sum(1 for b in top if any(i not in given for i in _holds(b, centres))) / len(top)


def run_scene(seed: int, size: int, tmp: Path, lm, methods):
    from mapclip.engine.core.options import DetectOptions, EXAMPLE_METHODS  # noqa: F401
    from mapclip.engine.data.examples import Example
    from mapclip.engine.data.synthetic.scene import make_scene
    from mapclip.engine.detect import detect
    from mapclip.engine.quality import DETECT_CLASSES
    path = str(tmp / f"ex_{seed}.tif")
    truth = make_scene(path, width=size, seed=seed, mask_path=None, coco_path=None)
    rows = []
    for cls, (prompt, _) in DETECT_CLASSES.items():
        objs = truth.of(cls)
        if len(objs) < N_POS + 2:
            continue
        centres = [((b.bounds[0] + b.bounds[2]) / 2, (b.bounds[1] + b.bounds[3]) / 2) for b in objs]
        opts = DetectOptions(top_k=20, refine=False)
        alone = detect(path, [prompt], lm, options=opts)
        given = set(range(N_POS))                         # the first three objects, marked "yes"
        negs = [b for b in alone.boxes if not _holds(b.bounds, centres)][:N_NEG]
        examples = [Example(*centres[i], True) for i in sorted(given)]
        examples += [Example((b.bounds[0] + b.bounds[2]) / 2, (b.bounds[1] + b.bounds[3]) / 2, False)
                     for b in negs]
        row = {"scene": seed, "class": cls, "objects": len(objs),
               "alone": hit_at_10([b.bounds for b in alone.boxes], centres, given)}
        for m in methods:
            res = detect(path, [prompt], lm, options=DetectOptions(top_k=20, refine=False, examples_method=m),
                         examples=examples, examples_crs=truth.crs)
            row[m] = hit_at_10([b.bounds for b in res.boxes], centres, given)
            row[m + "_cache"] = res.cache
        rows.append(row)
    return rows


def run(argv) -> None:
    p = argparse.ArgumentParser(prog="bench_examples", add_help=False)
    p.add_argument("--full", action="store_true")
    args, _ = p.parse_known_args(argv)
    from mapclip.engine.core.options import EXAMPLE_METHODS
    from mapclip.engine.model.models import load_model
    lm = load_model("demo", device="cpu")
    size = 2048 if args.full else 1280
    old = os.environ.get("MAPCLIP_CACHE")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mapclip-bench-examples-") as tmp:
        os.environ["MAPCLIP_CACHE"] = str(Path(tmp) / "cache")
        try:
            for seed in SEEDS:
                rows += run_scene(seed, size, Path(tmp), lm, EXAMPLE_METHODS)
        finally:
            if old is None:
                os.environ.pop("MAPCLIP_CACHE", None)
            else:
                os.environ["MAPCLIP_CACHE"] = old
    print(f"demo model, window mode, scenes {SEEDS} at {size} px; {N_POS} positive and {N_NEG} "
          "negative examples; hit@10 over the objects not given as examples")
    print(f"  {'scene':>6} {'class':14} {'objects':>7} {'alone':>6} "
          + " ".join(f"{m:>8}" for m in EXAMPLE_METHODS))
    for r in rows:
        print(f"  {r['scene']:>6} {r['class']:14} {r['objects']:>7} {r['alone']:6.2f} "
              + " ".join(f"{r[m]:8.2f}" for m in EXAMPLE_METHODS))
    if not rows:
        return
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("alone", *EXAMPLE_METHODS)}
    print(f"  mean hit@10: alone {mean['alone']:.3f}; "
          + "; ".join(f"{m} {mean[m]:.3f} ({mean[m] - mean['alone']:+.3f})" for m in EXAMPLE_METHODS))
    best = max(EXAMPLE_METHODS, key=lambda m: mean[m])
    met = mean[best] >= GOAL or mean[best] - mean["alone"] >= GOAL_GAIN
    print(f"  best: {best}; goal hit@10 >= {GOAL} or >= {GOAL_GAIN} above the prompt alone: "
          f"{'met' if met else 'NOT met'}")
    print(f"  later rankings from the kept pass: {sorted({r[m + '_cache'] for r in rows for m in EXAMPLE_METHODS})}")


if __name__ == "__main__":
    run(sys.argv[1:])
