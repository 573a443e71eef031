"""`python -m engine index`: embed every tile of rasters into an index folder (create, append, resume)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import (add_extent_args, add_model_args, add_read_workers_arg, cancel_event, model_default_help,
               parse_bands, parse_extent, print_json, read_workers, tqdm_progress)
from ..core.errors import UsageError
from ..archive.format import MANIFEST, read_manifest
from ..core.jobs import check_outputs
from ..core.options import IndexOptions, RAY_LOCAL, ReadOptions
from ..raster.stac import parse_bbox, stac_sources
from ..model.presets import DEFAULT_MODEL


def _ints(text: Optional[str], what: str) -> Optional[List[int]]:
    if not text:
        return None
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        vals = []
    if not vals:
        raise UsageError(f"{what} {text!r} is not a list of whole numbers", "e.g. --scales 224,448")
    return vals


def register(sub) -> None:
    from ..archive.approx import APPROX_MIN_ROWS  # deferred: a test replaces it at call time
    d = IndexOptions()
    p = sub.add_parser(
        "index", help="embed every tile of rasters into a searchable index folder",
        description="Cut rasters into tiles (one or several sizes), embed each tile with a CLIP "
                    "model and store the normalised embeddings (float16), tile footprints (raster "
                    "CRS and WGS84), raster checksums and the model's facts in an index folder "
                    "(docs/index.md describes the format). Running it again on the same --out "
                    "finishes an interrupted build, appends new rasters, re-embeds changed ones "
                    "and skips unchanged ones. Search it with `python -m engine search` "
                    f"(exact below {APPROX_MIN_ROWS} tiles, approximate above).")
    p.add_argument("sources", nargs="*", metavar="RASTER|FOLDER|URL",
                   help="raster files, folders searched recursively for rasters, or remote "
                        "rasters (http(s) URLs, /vsicurl/, /vsis3/, /vsigs/, /vsiaz/ paths; "
                        "recorded as given); a GDAL WMS/TMS XML needs --extent")
    add_model_args(p, default_help="the index's own model when adding to one, else ")
    p.add_argument("--stac", default=None, metavar="CATALOG|SEARCH",
                   help="index the COG assets of STAC items, beside any RASTERs: a static "
                        "catalogue (a catalog.json, collection.json or item; a file or an http(s) "
                        "URL) or a STAC API (its item-search URL .../search, or its landing page), "
                        "which is sent the --stac-bbox/--stac-datetime/--stac-collection filters")
    p.add_argument("--stac-asset", default=None, metavar="KEY",
                   help="the asset to index (default: the one with role 'visual', else keyed "
                        "'visual', else the only GeoTIFF data asset)")
    p.add_argument("--stac-bbox", default=None, metavar="W,S,E,N",
                   help="only items whose bbox meets this WGS84 box")
    p.add_argument("--stac-datetime", default=None, metavar="DATE[/DATE]",
                   help="only items of this date or range, e.g. 2024-06-01/2024-08-31")
    p.add_argument("--stac-collection", action="append", default=None, metavar="ID",
                   help="only items of this collection (repeat for several)")
    p.set_defaults(model=None)
    p.add_argument("--out", required=True, metavar="INDEX", help="index folder (created if new)")
    p.add_argument("--tile", type=int, default=None, metavar="PX",
                   help="tile size in pixels (output pixels with --gsd); default: the model's "
                        "input size (224 for ViT-B/32); an existing index keeps its own")
    p.add_argument("--scales", default=None, metavar="PX,PX",
                   help="several tile sizes, e.g. 224,448 (replaces --tile)")
    p.add_argument("--stride", type=int, default=None, metavar="PX",
                   help="tile step in pixels for the first size (others keep the same overlap); "
                        "default: the tile size (no overlap)")
    p.add_argument("--gsd", type=float, default=None, metavar="M",
                   help="resample to this many metres per pixel on read (default: native)")
    add_read_workers_arg(p)
    add_extent_args(p)
    p.add_argument("--bands", default=None, metavar="R,G,B",
                   help="1-based bands read as R,G,B (or one band as grey); default: RGB by "
                        "colour interpretation, else the first three")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per model call; " + model_default_help("batch_size"))
    p.add_argument("--commit-tiles", type=int, default=d.commit_tiles, metavar="N",
                   help=f"tiles per committed shard (work an interruption can lose; with "
                        f"--ray also the tiles one worker takes at a time); default {d.commit_tiles}")
    p.add_argument("--reindex", action="store_true",
                   help="re-embed the given rasters even when their checksum is unchanged")
    p.add_argument("--no-footprints", action="store_true",
                   help="do not rewrite INDEX/footprints.gpkg at the end")
    p.add_argument("--ray", nargs="?", const=RAY_LOCAL, default=None, metavar="ADDRESS",
                   help="embed on the workers of a Ray cluster (docs/scale.md): --ray alone "
                        "uses $RAY_ADDRESS if set, else starts Ray on this machine; --ray auto "
                        "joins the cluster this machine belongs to; --ray HOST:PORT names its "
                        "head (ray://HOST:10001 through Ray Client, which needs ray[client]). The index folder and the rasters must "
                        "be at the same path on every node. Put it after the rasters. Same index, "
                        "same rows as without it")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="Ray model workers (each loads the model once); default: one per GPU "
                        "of the cluster, else one per CPU")
    p.add_argument("--ray-retries", type=int, default=d.ray_retries, metavar="N",
                   help="times a Ray worker that died is restarted (its tiles run again); "
                        f"default {d.ray_retries}")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (rows, rasters, embedded, skipped, "
                        "added/resumed/replaced/unchanged, seconds, tiles_per_s, model, ...)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..archive.build import build_index  # deferred: a test replaces it at call time

    if args.ray and Path(args.ray).exists():
        raise UsageError(f"--ray took {args.ray!r} as the cluster address, but it is a file or folder",
                         "put --ray after the rasters, or write --ray=ADDRESS")
    if args.tile is not None and args.scales:
        raise UsageError("--tile and --scales both given", "use --scales alone for several sizes")
    notes = []
    if args.stac:
        hrefs, notes = stac_sources(args.stac, args.stac_asset, parse_bbox(args.stac_bbox),
                                    args.stac_datetime, args.stac_collection)
        args.sources = list(args.sources) + hrefs
    if not args.sources:
        raise UsageError("no raster to index", "give rasters, folders or URLs, or --stac CATALOG|SEARCH")
    model = args.model
    out = Path(args.out)
    check_outputs([("--out", out)], [("source", s) for s in args.sources], folders=["--out"],
                  may_exist=["--out"])
    if model is None:
        if (out / MANIFEST).is_file():
            model = read_manifest(out)["model"].get("spec")
        model = model or DEFAULT_MODEL
    opts = IndexOptions(
        tile_px=args.tile, scales=_ints(args.scales, "--scales"), stride_px=args.stride,
        gsd=args.gsd, read=ReadOptions(bands=parse_bands(args.bands), workers=read_workers(args)),
        batch_size=args.batch_size, commit_tiles=args.commit_tiles, reindex=args.reindex,
        extent=parse_extent(args), extent_crs=args.extent_crs,
        footprints=not args.no_footprints, device=args.device, precision=args.precision,
        ray=args.ray, ray_workers=args.ray_workers, ray_retries=args.ray_retries)
    bar = tqdm_progress("index", unit="tile")
    try:
        info = build_index(args.sources, out, model, opts, progress=bar, cancel=cancel_event())
    finally:
        bar.close()
    for note in notes + list(info.warnings):
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        print_json(info.to_json())
    else:
        print(f"{info.path}: {info.rows} tiles from {info.rasters} raster(s) in {info.shards} shard(s)")
        print(f"embedded {info.embedded} tiles ({info.skipped} empty skipped) in {info.seconds:.1f} s "
              f"({info.tiles_per_s:.1f} tiles/s) on {info.device} {info.precision}")
        for what in ("added", "resumed", "replaced", "unchanged"):
            items = getattr(info, what)
            if items:
                print(f"  {what}: {len(items)} raster(s)", file=sys.stdout)
    return 0
