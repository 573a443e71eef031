"""Examples benchmark: does a prompt plus a few marked places rank better than the prompt alone?

On held-out synthetic scenes (seeds 9301-9303, used by nothing else), for each class of
engine.quality.DETECT_CLASSES, with the demo model in window mode:

- the prompt alone;
- the prompt with 3 positive examples (centres of 3 true objects of the class) and 3
  negatives (the best-scoring windows of the prompt alone that hold no object of the
  class: what an analyst marks "not this" first), by each method of
  engine.core.options.EXAMPLE_METHODS;

Two measures, both over the objects NOT given as examples:

- hit@10: share of the 10 best boxes holding the centre of such an object. A 1280 px scene
  holds 5-6 objects of most classes, so after 3 are given at most 2-3 of 10 boxes can hit:
  the mean ceiling of this measure on these scenes is printed beside it;
- found@k: the boxes on given examples taken out of the ranking (the analyst knows them),
  k = min(10, objects not given): share of those objects whose centre one of the k best
  boxes holds (1.0 = every remaining object ranked first; the ceiling is 1).

Goal (issue): >= 0.9, or >= 0.2 above the prompt alone. Each scene is embedded once; every
other ranking comes from the kept pass (engine.cache).
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


def found_at_k(boxes, centres, given) -> float:
    remaining = [i for i in range(len(centres)) if i not in given]
    k = min(10, len(remaining))
    top = [b for b in boxes if not any(i in given for i in _holds(b, centres))][:k]
    found = {i for b in top for i in _holds(b, centres) if i not in given}
    return min(len(found), k) / k if k else 0.0


def ceiling_at_10(centres, given) -> float:
    return min(10, len(centres) - len(given)) / 10


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
        ranked = [b.bounds for b in alone.boxes]
        row = {"scene": seed, "class": cls, "objects": len(objs), "ceiling": ceiling_at_10(centres, given),
               "alone": hit_at_10(ranked, centres, given), "alone_found": found_at_k(ranked, centres, given)}
        for m in methods:
            res = detect(path, [prompt], lm, options=DetectOptions(top_k=20, refine=False, examples_method=m),
                         examples=examples, examples_crs=truth.crs)
            ranked = [b.bounds for b in res.boxes]
            row[m] = hit_at_10(ranked, centres, given)
            row[m + "_found"] = found_at_k(ranked, centres, given)
            row[m + "_cache"] = res.cache
        rows.append(row)
    return rows


#: the refresh after a mark: an extent of about 4,000 tiles (issue: the refined ranking within
#: 1 s of a mark, from the kept embeddings)
REFRESH_PX, REFRESH_SEED, REFRESH_GOAL_S = 1536, 9304, 1.0


def refresh_timing(tmp: Path, lm) -> dict:
    """First pass, then the same prompt refined by 3 + 3 marks from the kept pass (median of 3)."""
    import statistics
    import time

    from mapclip.engine.core.options import DetectOptions
    from mapclip.engine.data.examples import Example
    from mapclip.engine.data.synthetic.scene import make_scene
    from mapclip.engine.detect import detect
    path = str(tmp / "refresh.tif")
    truth = make_scene(path, width=REFRESH_PX, seed=REFRESH_SEED, mask_path=None, coco_path=None)
    first = detect(path, ["storage tanks"], lm)
    objs = truth.of("storage-tank") or truth.boxes
    marks = [Example(*(truth.affine * ((b.pixel[0] + b.pixel[2]) / 2, (b.pixel[1] + b.pixel[3]) / 2)), True)
             for b in objs[:3]]
    marks += [Example(*(truth.affine * ((b.pixel[0] + b.pixel[2]) / 2, (b.pixel[1] + b.pixel[3]) / 2)), False)
              for b in first.boxes[-3:]]
    walls, engine = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        res = detect(path, ["storage tanks"], lm, options=DetectOptions(), examples=marks,
                     examples_crs=truth.crs)
        walls.append(time.perf_counter() - t0)
        engine.append(res.seconds)
    return {"tiles": first.tiles, "windows": first.windows, "first_s": first.seconds,
            "refresh_s": statistics.median(walls), "cache": res.cache}


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
            timing = refresh_timing(Path(tmp), lm)
        finally:
            if old is None:
                os.environ.pop("MAPCLIP_CACHE", None)
            else:
                os.environ["MAPCLIP_CACHE"] = old
    print(f"demo model, window mode, scenes {SEEDS} at {size} px; {N_POS} positive and {N_NEG} "
          "negative examples; over the objects not given as examples: hit@10 / found@k (module doc)")
    print(f"  {'scene':>6} {'class':14} {'objects':>7} {'ceiling':>7} {'alone':>10} "
          + " ".join(f"{m:>10}" for m in EXAMPLE_METHODS))
    for r in rows:
        print(f"  {r['scene']:>6} {r['class']:14} {r['objects']:>7} {r['ceiling']:7.2f} "
              f"{r['alone']:5.2f}/{r['alone_found']:4.2f} "
              + " ".join(f"{r[m]:5.2f}/{r[m + '_found']:4.2f}" for m in EXAMPLE_METHODS))
    if not rows:
        return
    names = ("alone", *EXAMPLE_METHODS)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("ceiling", *names)}
    found = {k: sum(r[k + "_found"] for r in rows) / len(rows) for k in names}
    print(f"  mean hit@10 (ceiling {mean['ceiling']:.3f}): alone {mean['alone']:.3f}; "
          + "; ".join(f"{m} {mean[m]:.3f} ({mean[m] - mean['alone']:+.3f})" for m in EXAMPLE_METHODS))
    print(f"  mean found@k (ceiling 1): alone {found['alone']:.3f}; "
          + "; ".join(f"{m} {found[m]:.3f} ({found[m] - found['alone']:+.3f})" for m in EXAMPLE_METHODS))
    for label, table in (("hit@10", mean), ("found@k", found)):
        best = max(EXAMPLE_METHODS, key=lambda m: table[m])
        met = table[best] >= GOAL or table[best] - table["alone"] >= GOAL_GAIN
        print(f"  {label}: best {best}; goal >= {GOAL} or >= {GOAL_GAIN} above the prompt alone: "
              f"{'met' if met else 'NOT met'}")
    t = timing
    print(f"  refresh after a mark (scene {REFRESH_SEED}, {REFRESH_PX} px: {t['tiles']} tiles, "
          f"{t['windows']} windows; 3 + 3 marks, from the kept pass: {t['cache']}): "
          f"{t['refresh_s']:.2f} s, {t['refresh_s'] / t['first_s']:.3f} of the first pass's "
          f"{t['first_s']:.1f} s (goal {REFRESH_GOAL_S:g} s; measured on the machine named above)")
    print(f"  later rankings from the kept pass: {sorted({r[m + '_cache'] for r in rows for m in EXAMPLE_METHODS})}")


if __name__ == "__main__":
    run(sys.argv[1:])
