"""`python -m engine count`: count objects of one kind in a raster (RemoteCount prompts, dense components)."""
from __future__ import annotations

import argparse
import sys

from . import (add_cache_arg, add_extent_args, add_model_args, cancel_event, model_default_help, parse_bands, parse_extent, print_json, raster_arg, tqdm_progress)
from ..core.templates import TEMPLATES_HELP
from ..core.errors import UsageError
from ..core.jobs import check_outputs
from ..core.options import ReadOptions
from ..count import CountOptions, METHODS


def register(sub) -> None:
    d = CountOptions()
    p = sub.add_parser(
        "count", help="count objects of one kind in a raster or an extent of it",
        description="Count objects: 'prompt' scores RemoteCLIP's RemoteCount captions ('there "
                    "are {n} {objects} in the image', n = 1..10, number words and digits) and "
                    "takes the best; 'dense' counts connected components of the dense heatmap "
                    "above a threshold, with their boxes; 'both' runs both.")
    p.add_argument("raster", help="raster file GDAL can read")
    p.add_argument("--object", required=True, metavar="NAME", help="what to count, e.g. airplane")
    add_model_args(p)
    p.add_argument("--method", choices=list(METHODS), default="prompt",
                   help="prompt (RemoteCount), dense (heatmap peaks) or both; default prompt")
    add_extent_args(p)
    p.add_argument("--tile", type=int, default=None, metavar="PX",
                   help="prompt method: count per tile of PX pixels and sum (default: the whole "
                        "extent as one image)")
    p.add_argument("--dense-tile", type=int, default=None, metavar="PX",
                   help="dense method: tile size (default: the model's input size)")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="dense method: heatmap score threshold 0..1 (default: detect's dense "
                        "threshold, 0.5)")
    p.add_argument("--min-area", type=int, default=d.min_area, metavar="N",
                   help=f"dense method: smallest component in heatmap cells; default {d.min_area}")
    p.add_argument("--peaks", action=argparse.BooleanOptionalAction, default=d.peaks,
                   help="dense method: one object per peak of the heatmap, so touching objects "
                        "count apart (--no-peaks: one per connected component); default on")
    p.add_argument("--peak-distance", type=int, default=d.peak_distance, metavar="CELLS",
                   help="dense method: least distance between two peaks in heatmap cells; "
                        f"default {d.peak_distance}")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=d.calibrate,
                   help="prompt method: add the model's count calibration (count_bias in its "
                        "defaults, if it has one) before picking the count; default on")
    p.add_argument("--bands", default=None, metavar="R,G,B", help="1-based bands read as R,G,B")
    p.add_argument("--templates", default=None, metavar="SET|FILE", help="dense method: " + TEMPLATES_HELP)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per model call; " + model_default_help("batch_size"))
    add_cache_arg(p)
    p.add_argument("--out", default=None, metavar="boxes.gpkg",
                   help="dense method: write the counted objects' boxes (.gpkg or .geojson)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..count import CountOptions, check_boxes_output, count, write_count_boxes  # deferred: a test replaces it at call time
    from ..raster.reader import raster_files

    if args.out:
        check_boxes_output(args.method)
        if Path(args.out).suffix.lower() not in (".gpkg", ".geojson", ".json"):
            raise UsageError(f"cannot write boxes to {args.out}", "name the output .gpkg or .geojson")
        args.raster = raster_arg(args.raster)   # local, or remote opened by GDAL
        check_outputs([("--out", args.out)], [("raster", f) for f in raster_files(args.raster)],
                      overwrite=args.overwrite)
    extent = parse_extent(args)
    opts = CountOptions(tile_px=args.tile, dense_tile_px=args.dense_tile, threshold=args.threshold,
                        min_area=args.min_area, batch_size=args.batch_size,
                        peaks=bool(args.peaks), peak_distance=args.peak_distance,
                        calibrate=bool(args.calibrate),
                        read=ReadOptions(bands=parse_bands(args.bands)), device=args.device,
                        precision=args.precision, templates=args.templates, cache=bool(args.cache))
    bar = tqdm_progress("count", unit="img")
    try:
        result = count(args.raster, args.object, args.model, extent=extent,
                       extent_crs=args.extent_crs, method=args.method, options=opts,
                       progress=bar, cancel=cancel_event())
    finally:
        bar.close()
    if args.out:
        write_count_boxes(result, args.out, overwrite=args.overwrite)
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        info = result.to_json()
        info["out"] = str(args.out) if args.out else None
        print_json(info)
    else:
        print(result.summary())
        if args.out:
            print(f"{len(result.boxes)} boxes -> {args.out}")
    return 0
