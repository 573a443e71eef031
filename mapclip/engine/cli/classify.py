"""`python -m engine classify`: a land-cover map from class names (open vocabulary)."""
from __future__ import annotations

import argparse
import sys

from . import (add_cache_arg, add_dense_input_args, add_extent_args, add_model_args, model_default_help, parse_bands, parse_extent, print_json, raster_arg, tqdm_progress, RASTER_HELP)
from ..core.templates import TEMPLATES_HELP
from ..classify import classify, clean_classes
from ..core.jobs import check_outputs
from ..core.options import ATTENTION_ALIASES, ATTENTION_MODES, ClassifyOptions, ReadOptions
from ..classify import read_within


def register(sub) -> None:
    d = ClassifyOptions()
    p = sub.add_parser(
        "classify", help="a land-cover map from class names: a classified GeoTIFF with a legend",
        description="Give every cell of a raster (within an extent) the class whose words its "
                    "image matches best, from a CLIP model's dense patch features (training-free, "
                    "ClearCLIP / SegEarth-OV style). Writes a uint8 GeoTIFF (values 1..N the "
                    "classes in the order given, 0 unknown, 255 not scored) with a colour table, "
                    "the class names in its metadata and a QGIS style (.qml) beside it. "
                    "See docs/classify.md.")
    p.add_argument("raster", help=RASTER_HELP)
    p.add_argument("--class", dest="classes", action="append", required=True, metavar="NAME",
                   help="a class, e.g. --class water --class forest (at least two; repeat); "
                        "the name is the text the image is matched against")
    add_model_args(p)
    p.add_argument("--out", required=True, metavar="CLASSES.tif", help="class map output (GeoTIFF)")
    p.add_argument("--scores", default=None, metavar="SCORES.tif",
                   help="also write the per-class scores (float32, one band a class)")
    p.add_argument("--polygons", default=None, metavar="CLASSES.gpkg",
                   help="also write the map as polygons (.gpkg or .geojson; fields class, value, "
                        "score = mean best-class score, cells, model)")
    add_extent_args(p)
    p.add_argument("--within", default=None, metavar="POLYGONS.gpkg",
                   help="only the cells whose centre lies in one of these polygons (any vector "
                        "file, any CRS); the others are 255 (not scored)")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="cells whose best class scores below T (0..1) are 'unknown' (value 0); "
                        "default: none")
    p.add_argument("--smoothing", type=float, default=d.smoothing, metavar="CELLS",
                   help=f"Gaussian smoothing of each tile's scores, sigma in cells; default "
                        f"{d.smoothing:g} (none)")
    p.add_argument("--tile", type=int, default=None, metavar="PX",
                   help="tile size in pixels; default: the model's dense tile size (its input "
                        "size unless the model says otherwise; `python -m engine models` lists "
                        "each model's defaults)")
    p.add_argument("--overlap", type=float, default=d.overlap, metavar="F",
                   help=f"tile overlap, share of a tile (0..0.49); default {d.overlap:g}")
    p.add_argument("--upsample", type=int, default=d.upsample, metavar="K",
                   help=f"output cells per patch side; default {d.upsample}")
    p.add_argument("--attention", choices=list(ATTENTION_MODES) + list(ATTENTION_ALIASES),
                   default=d.attention, metavar="MODE",
                   help=f"the changed last block ({', '.join(ATTENTION_MODES)}); default "
                        f"{d.attention}")
    p.add_argument("--templates", default=None, metavar="SET|FILE", help=TEMPLATES_HELP)
    add_dense_input_args(p)
    p.add_argument("--gsd", type=float, default=None, metavar="M",
                   help="resample to this many metres per pixel on read (default: native)")
    p.add_argument("--bands", default=None, metavar="R,G,B",
                   help="1-based bands read as R,G,B (default: by colour interpretation)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per model call; " + model_default_help("batch_size"))
    add_cache_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (classes, values, colours, counts, "
                        "shares, shape, transform, outputs, seconds, ...)")
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace):
    from dataclasses import replace

    return replace(ClassifyOptions(), tile_px=args.tile, overlap=args.overlap,
                   threshold=args.threshold, smoothing=args.smoothing, upsample=args.upsample,
                   attention=args.attention, cls_token_lambda=args.cls_token_lambda, templates=args.templates,
                   dense_input_px=args.dense_input, dense_slide=bool(args.dense_slide),
                   batch_size=args.batch_size,
                   read=ReadOptions(bands=parse_bands(args.bands), gsd=args.gsd),
                   device=args.device, precision=args.precision, scores=bool(args.scores),
                   cache=bool(args.cache))


def run(args: argparse.Namespace) -> int:
    from . import cancel_event
    clean_classes(args.classes)  # bad classes are refused before the model loads
    args.raster = raster_arg(args.raster)   # local, or remote opened by GDAL
    # classify() checks its outputs against the raster; the polygons file is read here
    check_outputs([("--out", args.out), ("--scores", args.scores), ("--polygons", args.polygons)],
                  [("--within", args.within)], overwrite=args.overwrite)
    extent = parse_extent(args)
    within = within_crs = None
    if args.within:
        within, within_crs = read_within(args.within)
    opts = options_from_args(args)
    bar = tqdm_progress("classify", unit="tile")
    try:
        result = classify(args.raster, args.classes, args.model, extent=extent,
                          extent_crs=args.extent_crs, options=opts, progress=bar,
                          cancel=cancel_event(), out=args.out, scores_out=args.scores,
                          polygons_out=args.polygons, overwrite=args.overwrite,
                          within=within, within_crs=within_crs)
    finally:
        bar.close()
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        print_json(result.to_json())
    else:
        h, w = result.shape
        print(f"{len(result.classes)} classes, {w} x {h} cells of {result.cell_px[0]:.4g} px "
              f"-> {args.out} (style {result.style_out})"
              + (f", scores -> {args.scores}" if args.scores else "")
              + (f", {result.polygons} polygons -> {args.polygons}" if args.polygons else ""))
        for name, share in result.shares.items():
            print(f"  {name}: {100 * share:.1f}%")
        print(f"{result.tiles} tiles, {result.skipped} skipped, {result.seconds:.1f} s on "
              f"{result.device} {result.precision}")
    return 0
