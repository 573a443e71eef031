"""`python -m engine detect`: score a raster against text prompts, write boxes (and a heatmap)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import (RASTER_HELP, add_cache_arg, add_dense_input_args, add_extent_args, add_model_args, add_read_workers_arg, map_bounds,
               model_default_help, parse_bands, parse_extent, print_json, raster_arg, read_workers,
               tqdm_progress)
from ..core.templates import TEMPLATES_HELP
from ..core.errors import UsageError
from ..core.jobs import all_or_none, check_outputs
from ..core.options import ATTENTION_ALIASES, ATTENTION_MODES, DENSE_THRESHOLD, DetectOptions, EXAMPLE_METHODS, MERGES, MODES, ReadOptions
from ..core.outputs import vector_driver
from ..data.examples import read_examples
from ..detect import detect, write_boxes, write_heatmap


def register(sub) -> None:
    d = DetectOptions()
    p = sub.add_parser(
        "detect", help="find what text prompts describe in a raster: boxes and a heatmap",
        description="Score a raster (within an extent) against one or more text prompts with a "
                    "CLIP model and write georeferenced, scored boxes (GeoPackage or GeoJSON, in "
                    "the raster's CRS, fields prompt, score, cosine, rank, model) and optionally "
                    "a heatmap GeoTIFF. Window mode slides windows of K x K tiles (the thesis "
                    "method); dense mode gets patch-level scores from one pass per tile.")
    p.add_argument("raster", help=RASTER_HELP)
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="what to look for; repeat for several prompts that compete")
    add_model_args(p)
    p.add_argument("--mode", choices=list(MODES), default=d.mode,
                   help=f"window (K x K tiles per window) or dense (patch-level); default {d.mode}")
    p.add_argument("--tile", type=int, default=None, metavar="PX",
                   help="tile size in pixels (output pixels with --gsd); "
                        + model_default_help("tile_px"))
    p.add_argument("--window", type=int, default=None, metavar="K",
                   help="window mode: windows of K x K tiles; " + model_default_help("window"))
    p.add_argument("--stride", type=int, default=d.stride, metavar="K",
                   help=f"window mode: stride in tiles; default {d.stride}")
    p.add_argument("--gsd", type=float, default=None, metavar="M",
                   help="resample to this many metres per pixel on read (default: native)")
    p.add_argument("--bands", default=None, metavar="R,G,B",
                   help="1-based bands read as R,G,B (or one band as grey); default: RGB by "
                        "colour interpretation, else the first three")
    add_extent_args(p)
    p.add_argument("--top-k", type=int, default=None, metavar="N",
                   help="at most N boxes per prompt; " + model_default_help("top_k"))
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help=f"minimum softmax score of a box, 0..1; dense mode: default "
                        f"{DENSE_THRESHOLD}; window mode: " + model_default_help("threshold"))
    p.add_argument("--merge", choices=MERGES, default=d.merge,
                   help="window mode: keep the best window per object (nms) or the union of "
                        f"its strong neighbours (union); default {d.merge}")
    p.add_argument("--iou", type=float, default=d.iou,
                   help=f"windows overlapping more than this IoU are one object; default {d.iou} "
                        "(any overlap)")
    p.add_argument("--background", action="append", default=None, metavar="TEXT",
                   help="background prompt (repeat); replaces the defaults in mapclip/engine/model/scoring.py")
    p.add_argument("--attention", choices=list(ATTENTION_MODES) + list(ATTENTION_ALIASES),
                   default=d.attention, metavar="MODE",
                   help=f"dense mode's changed last block: {', '.join(ATTENTION_MODES)} "
                        f"(clearclip = ClearCLIP, sclip-style = SCLIP's attention without residual, "
                        f"sclip = SCLIP, segearth = SegEarth-OV's q+k+v; old names qq, qq+kk "
                        f"accepted); default {d.attention}")
    p.add_argument("--templates", default=None, metavar="SET|FILE", help=TEMPLATES_HELP)
    add_dense_input_args(p, "dense mode: ")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=d.refine,
                   help="fit each box to the object inside it (the best-scoring object "
                        "proposal centred in the window or component; --no-refine keeps "
                        "window-sized boxes); default on")
    p.add_argument("--refine-min", type=float, default=d.refine_min, metavar="SHARE",
                   help="a fitted box must score at least this share (0..1) of its window's "
                        f"score, else the window is kept; default {d.refine_min}")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per model call; " + model_default_help("batch_size")
                        + "; on CUDA, when left out, sized from the free GPU memory")
    add_read_workers_arg(p)
    add_cache_arg(p)
    p.add_argument("--examples", default=None, metavar="FILE",
                   help="places marked by hand: any vector file OGR reads (points or polygons, any "
                        "CRS) with a 'label' field, 1 = what I mean, 0 = not this; each prompt is "
                        "moved toward the windows at the 1s and away from those at the 0s (window "
                        "mode; with kept embeddings no pixel is read again)")
    p.add_argument("--examples-method", choices=list(EXAMPLE_METHODS), default=d.examples_method,
                   help=f"how examples move a prompt; default {d.examples_method}")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: compile the image model with torch.compile (compiled kernels are "
                        "cached under $MAPCLIP_CACHE/inductor for later runs)")
    p.add_argument("--out", required=True, metavar="OUT.gpkg|OUT.geojson",
                   help="boxes output (.gpkg or .geojson)")
    p.add_argument("--heatmap", default=None, metavar="OUT.tif",
                   help="also write the heatmap (one float32 band per prompt)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (tiles, windows, boxes, seconds, "
                        "tiles_per_s, device, precision, model, ...)")
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace):
    """The DetectOptions these flags ask for (flags left out stay the engine's defaults)."""
    from dataclasses import replace

    changes = dict(mode=args.mode, tile_px=args.tile, window=args.window, stride=args.stride,
                   batch_size=args.batch_size, top_k=args.top_k, threshold=args.threshold,
                   merge=args.merge, iou=args.iou, attention=args.attention, cls_token_lambda=args.cls_token_lambda,
                   templates=args.templates, dense_input_px=args.dense_input,
                   dense_slide=bool(args.dense_slide),
                   refine=bool(args.refine), refine_min=args.refine_min,
                   read=ReadOptions(bands=parse_bands(args.bands), gsd=args.gsd,
                                    workers=read_workers(args)),
                   compile=bool(args.compile), cache=bool(args.cache),
                   examples_method=args.examples_method,
                   device=args.device, precision=args.precision, heatmap=bool(args.heatmap))
    if args.background:
        changes["background"] = tuple(args.background)
    return replace(DetectOptions(), **changes)





def run(args: argparse.Namespace) -> int:
    from ..raster.reader import raster_files
    from . import cancel_event

    # refuse bad outputs before any work
    vector_driver(args.out)
    if args.heatmap and Path(args.heatmap).suffix.lower() not in (".tif", ".tiff"):
        raise UsageError(f"heatmap {args.heatmap} must be a GeoTIFF", "name it .tif")
    args.raster = raster_arg(args.raster)   # local, or remote opened by GDAL
    check_outputs([("--out", args.out), ("--heatmap", args.heatmap)],
                  [("raster", f) for f in raster_files(args.raster)] + [("--examples", args.examples)],
                  overwrite=args.overwrite)
    extent = parse_extent(args)
    opts = options_from_args(args)
    examples, examples_crs = read_examples(args.examples) if args.examples else (None, None)
    bar = tqdm_progress("detect", unit="img")
    try:
        result = detect(args.raster, args.prompt, args.model, extent=extent, examples=examples,
                        examples_crs=examples_crs,
                        extent_crs=args.extent_crs, options=opts, progress=bar,
                        cancel=cancel_event())
    finally:
        bar.close()
    with all_or_none([args.out, args.heatmap]):  # both outputs or neither, old ones kept
        write_boxes(result, args.out, overwrite=args.overwrite)
        if args.heatmap:
            write_heatmap(result, args.heatmap, overwrite=args.overwrite)
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        info = result.to_json()
        info["out"] = str(args.out)
        info["heatmap"] = str(args.heatmap) if args.heatmap else None
        print_json(info)
    else:
        print(f"{len(result.boxes)} boxes -> {args.out}"
              + (f", heatmap -> {args.heatmap}" if args.heatmap else ""))
        print(f"{result.tiles} tiles, {result.windows} windows, {result.skipped} skipped, "
              f"{result.seconds:.1f} s ({result.tiles_per_s:.1f} tiles/s) on {result.device} "
              f"{result.precision}"
              + ("; embeddings from the cache" if result.from_cache else ""))
        for b in result.boxes[:10]:
            print(f"  #{b.rank} {b.prompt!r} score {b.score:.3f} cosine {b.cosine:.3f} "
                  f"bounds {map_bounds(b.bounds, result.crs)}")
    return 0
