#!/usr/bin/env python3
"""The offline demo (`python3 build.py demo`): a synthetic scene, the demo model, results on disk.

    python3 build.py demo [--out DIR] [--model SPEC] [--size PX] [--seed N] [--mode window|dense]

1. draws a held-out synthetic scene (engine.data.synthetic; seed not used in training),
2. detects three prompts with the model and its own defaults (tile, window,
   threshold, top-k: engine.core.options.ModelDefaults; boxes fitted to objects)
   and writes the boxes (GeoPackage), the heatmap (GeoTIFF) and a PNG of the
   boxes over the scene,
3. counts storage tanks on a small counting chip (engine.count, both methods),
4. prints AP50, precision and recall per prompt against the scene's exact
   ground truth (engine.quality, the protocol of the quality tests),
5. maps the scene's land cover from class names (engine.classify) into
   classes.tif and prints its pixel accuracy and mIoU against the mask,
6. writes a QGIS project, demo.qgz, with the scene, the boxes, the heatmaps
   and the class map styled (scripts/demo_project.py): ``qgis demo-output/demo.qgz``.

Runs offline in a minute or two on 2 CPU cores with the shipped demo model.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

PROMPTS = ("storage tanks", "airplanes", "ships")
#: which ground-truth class each prompt looks for
PROMPT_CLASS = {"storage tanks": "storage-tank", "airplanes": "airplane", "ships": "ship"}
COLOURS = {"storage tanks": (255, 200, 0), "airplanes": (255, 60, 200), "ships": (0, 230, 255)}
DEFAULT_SEED = 4216
DEFAULT_SIZE = 1536
COUNT_OBJECTS = 6


def say(msg: str = "") -> None:
    print(msg, flush=True)


def draw_png(scene_path: str, result, truth, out: Path, max_px: int = 1600) -> Path:
    """The scene (scaled to at most ``max_px``) with ground truth (thin white) and detections."""
    import numpy as np
    import rasterio
    from PIL import Image, ImageDraw
    with rasterio.open(scene_path) as src:
        img = np.moveaxis(src.read(), 0, -1)
    scale = min(1.0, max_px / max(img.shape[:2]))
    im = Image.fromarray(img)
    if scale < 1.0:
        im = im.resize((int(img.shape[1] * scale), int(img.shape[0] * scale)), Image.BILINEAR)
    d = ImageDraw.Draw(im)
    wanted = set(PROMPT_CLASS.values())
    for b in truth.boxes:
        if b.cls in wanted:
            c0, r0, c1, r1 = (v * scale for v in b.pixel)
            d.rectangle([c0, r0, c1, r1], outline=(255, 255, 255), width=1)
    for b in result.boxes:
        c0, r0, c1, r1 = (v * scale for v in b.pixel)
        col = COLOURS.get(b.prompt, (255, 0, 0))
        d.rectangle([c0, r0, c1, r1], outline=col, width=3)
        d.text((c0 + 3, r0 + 2), f"{b.prompt} {b.score:.2f}", fill=col)
    y = 6
    for p in PROMPTS:
        d.rectangle([6, y, 18, y + 10], fill=COLOURS[p])
        d.text((24, y - 1), p, fill=(255, 255, 255))
        y += 16
    d.text((24, y - 1), "ground truth (white)", fill=(255, 255, 255))
    im.save(out)
    return out


def centre_hits(boxes, truth_boxes):
    """(precision, recall) where a detection is right if it holds the centre of a true object."""
    cs = [((t[0] + t[2]) / 2, (t[1] + t[3]) / 2) for t in truth_boxes]
    inside = lambda b, c: b[0] <= c[0] <= b[2] and b[1] <= c[1] <= b[3]  # noqa: E731
    good = sum(1 for b in boxes if any(inside(b, c) for c in cs))
    found = sum(1 for c in cs if any(inside(b, c) for b in boxes))
    return (good / len(boxes) if boxes else 0.0, found / len(cs) if cs else 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="MapCLIP offline demo: synthetic scene, detect, count.")
    ap.add_argument("--out", default="demo-output", help="output folder (default ./demo-output)")
    ap.add_argument("--model", default="demo", metavar="SPEC",
                    help="model spec (default: the shipped demo model)")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"scene size in px (default {DEFAULT_SIZE})")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"scene seed (default {DEFAULT_SEED}, held out)")
    ap.add_argument("--mode", choices=["window", "dense"], default="window", help="detect mode (default window)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    a = ap.parse_args(argv)

    import warnings
    warnings.filterwarnings("ignore", message="Valid PROJ data directory not found")
    import torch
    from mapclip.engine import quality as Q
    from mapclip.engine.data.synthetic.scene import make_chip, make_scene
    from mapclip.engine.count import CountOptions, count
    from mapclip.engine.detect import DetectOptions, detect, write_boxes, write_heatmap
    from mapclip.engine.core.errors import MapClipError
    from mapclip.engine.model.models import load_model

    if torch.get_num_threads() > 2:
        torch.set_num_threads(2)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    try:
        say(f"MapCLIP demo: model {a.model}, scene {a.size} x {a.size} px, seed {a.seed}")
        t0 = time.time()
        truth = make_scene(str(out / "scene.tif"), a.size, seed=a.seed, overwrite=True)
        c = truth.counts()
        say(f"  scene: {out / 'scene.tif'} ({time.time() - t0:.1f} s; "
            + ", ".join(f"{n} {k}" for k, n in c.items() if n) + ")")
        lm = load_model(a.model, device=a.device)
        say(f"  model: {lm.spec} ({lm.arch}, {lm.image_size} px input, {lm.device}, {lm.precision})")

        opts = DetectOptions(mode=a.mode)   # tile, window, threshold, top-k: the model's defaults
        t0 = time.time()
        res = detect(str(out / "scene.tif"), list(PROMPTS), lm, options=opts)
        say(f"  detect ({a.mode}): {res.tiles} tiles, {res.windows} windows, {len(res.boxes)} boxes "
            f"({res.refined} fitted to the object inside) in {res.seconds:.1f} s")
        gpkg = write_boxes(res, out / "detections.gpkg", overwrite=True)
        heat = write_heatmap(res, out / "heatmap.tif", overwrite=True)
        png = draw_png(truth.path, res, truth, out / "detections.png")

        from mapclip.engine.classify import classify, compare_to_mask
        from mapclip.engine.data.synthetic.truth import synthetic_targets
        from mapclip.engine.core.options import ClassifyOptions
        names, values = synthetic_targets()
        cls = classify(str(out / "scene.tif"), names, lm, options=ClassifyOptions(),
                       out=str(out / "classes.tif"), overwrite=True)
        import rasterio
        with rasterio.open(cls.out) as ds:
            q = compare_to_mask(ds.read(1), ds.transform, truth.mask_path, values, names)
        qgz = None
        try:
            from demo_project import write_project
            qgz = write_project(out / "demo.qgz", truth.path, truth.mask_path, gpkg, heat, PROMPTS,
                                colours=COLOURS, land_cover=cls.out)
        except ImportError as exc:   # QGIS's Python bindings are not installed
            say(f"  (no QGIS project: {exc}; install QGIS to get demo.qgz)")

        say("")
        say(f"  Result on the held-out scene (a box is right when IoU >= {Q.IOU} with a true object;")
        say("  'centre' counts a box right when it holds an object's centre):")
        say("")
        say("  prompt           boxes  truth   AP50  precision  recall   precision  recall")
        say("                                                             (centre)  (centre)")
        for p in PROMPTS:
            mine = [b for b in res.boxes if b.prompt == p]
            gt = [b.pixel for b in truth.of(PROMPT_CLASS[p])]
            m = Q.score_boxes([(b.score, b.pixel) for b in mine], gt)
            pc, rcc = centre_hits([b.pixel for b in mine], gt)
            say(f"  {p:<16} {len(mine):>5}  {len(gt):>5}  {m['ap50']:>5.2f}  {m['precision']:>9.2f}  "
                f"{m['recall']:>6.2f}   {pc:>9.2f}  {rcc:>6.2f}")

        say("")
        say(f"  classify: {len(names)} land covers -> {cls.out} ({cls.shape[1]} x {cls.shape[0]} "
            f"cells, {cls.seconds:.1f} s); against the mask: pixel accuracy "
            f"{q['pixel_accuracy']:.3f}, mIoU {q['miou']:.3f}")
        say("    IoU " + ", ".join(f"{n} {v:.2f}" for n, v in q["iou"].items()))

        chip = make_chip(str(out / "count_chip.tif"), "storage-tank", COUNT_OBJECTS, size=160,
                         seed=a.seed, overwrite=True)
        cnt = count(chip.path, "storage tanks", lm, method="both", options=CountOptions())
        say("")
        say(f"  count: {out / 'count_chip.tif'} holds {len(chip.boxes)} storage tanks; "
            f"the model says {cnt.summary()}")
        say("")
        say(f"Files in {out}:")
        for f in (truth.path, truth.mask_path, truth.coco_path, gpkg, heat, png, cls.out, qgz):
            if f:
                say(f"  {f}")
        if qgz:
            say(f"Open it all in QGIS:  qgis {qgz}")
        say(f"Done in {time.time() - t_all:.0f} s.")
    except MapClipError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  fix: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    say("")
    say("The demo model is a small CLIP trained only on these synthetic scenes: it shows the")
    say("pipeline, not remote-sensing skill. With a real model on real imagery:")
    say("  python -m engine detect YOUR.tif --prompt 'storage tanks' --model remoteclip-vit-b-32 "
        "--out boxes.gpkg --heatmap heat.tif   (downloads once, needs network)")
    say("  python -m engine detect YOUR.tif --prompt ships --model ViT-B-32-quickgelu:/path/RemoteCLIP-ViT-B-32.pt "
        "--out boxes.gpkg   (a local checkpoint, offline)")
    say(f"  python3 build.py demo --model remoteclip-vit-b-32   (this demo with a real model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
