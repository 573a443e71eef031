"""`python -m engine search`: rank an index's tiles by text, an example image, or a location."""
from __future__ import annotations

import argparse

from . import map_bounds, print_json
from ..core.templates import TEMPLATES_HELP
from ..core.errors import UsageError


def register(sub) -> None:
    from ..archive.ann import IVF_MIN_ROWS
    from ..archive.approx import APPROX_MIN_ROWS
    from ..core.options import SearchOptions
    d = SearchOptions()
    p = sub.add_parser(
        "search", help="search an index by text, an example image, or a location",
        description="Rank the tiles of an index (built by `python -m engine index`) by similarity "
                    "to a text, an image file, or the tile at a location (--like X,Y; write "
                    "negative coordinates as --like=-73.9,40.7). Optional negative prompts are "
                    "subtracted. Exact search (one matrix product) below "
                    f"{APPROX_MIN_ROWS} tiles, approximate (faiss PQ fast-scan, re-ranked "
                    f"exactly) above, and from {IVF_MIN_ROWS} tiles IVF-PQ with the vectors "
                    "left on disk (docs/scale.md); the faiss index is cached in the index folder.")
    p.add_argument("index", metavar="INDEX", help="index folder")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", metavar="T", help="describe what to find, e.g. \"a quarry\"")
    q.add_argument("--image", metavar="PATH", help="an example image file (PNG, JPEG, TIFF)")
    q.add_argument("--like", metavar="X,Y", help="a location: its tile's embedding is the query")
    p.add_argument("--crs", default=None, metavar="EPSG:N",
                   help="CRS of --like (default: the CRS the index's rasters share)")
    p.add_argument("--top-k", type=int, default=d.top_k, metavar="N",
                   help=f"number of hits; default {d.top_k}")
    p.add_argument("--negative", action="append", default=None, metavar="T",
                   help="a prompt to move away from (repeat for several)")
    p.add_argument("--negative-weight", type=float, default=d.negative_weight, metavar="W",
                   help="score = cos(query) - W * mean cos(negatives); default "
                        f"{d.negative_weight}")
    p.add_argument("--method", choices=["auto", "exact", "approx"], default=d.method,
                   help=f"default auto: exact below {APPROX_MIN_ROWS} tiles, approximate above")
    p.add_argument("--templates", default=None, metavar="SET|FILE", help="--text and --negative: " + TEMPLATES_HELP)
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="model for --text/--image (default: the index's own; another model "
                        "is refused unless it embeds into the same space)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--out", default=None, metavar="hits.gpkg",
                   help="write the hits' footprints (.gpkg or .geojson)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (query, method, rows, seconds, hits)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..archive.search import search, write_hits
    from ..core.options import SearchOptions
    from ..core.jobs import check_outputs
    from . import cancel_event

    if args.out:
        if not str(args.out).lower().endswith((".gpkg", ".geojson", ".json")):
            raise UsageError(f"cannot write hits to {args.out}", "name the output .gpkg or .geojson")
        check_outputs([("--out", args.out)], [("--image", args.image)], overwrite=args.overwrite,
                      sealed=[("the index", args.index)])
    if args.crs and args.like is None:
        raise UsageError("--crs given without --like", "--crs is the CRS of the --like point")
    opts = SearchOptions(top_k=args.top_k, negative=tuple(args.negative or ()),
                            negative_weight=args.negative_weight, method=args.method,
                            device=args.device, precision=args.precision, templates=args.templates)
    result = search(args.index, text=args.text, image=args.image, like=args.like,
                       like_crs=args.crs, model=args.model, options=opts, cancel=cancel_event())
    if args.out:
        write_hits(result, args.out, overwrite=args.overwrite)
    if args.json:
        info = result.to_json()
        info["out"] = str(args.out) if args.out else None
        print_json(info)
        return 0
    print(f"{len(result.hits)} hits from {result.rows} tiles ({result.method} search, "
          f"{result.seconds * 1000:.0f} ms)" + (f" -> {args.out}" if args.out else ""))
    for h in result.hits:
        b = map_bounds(h.bounds, h.crs)
        print(f"  #{h.rank} score {h.score:.4f} cosine {h.cosine:.4f}  {h.raster}  "
              f"tile {h.tile_px}px at col {h.pixel[0]} row {h.pixel[1]}  bounds {b}")
    return 0
