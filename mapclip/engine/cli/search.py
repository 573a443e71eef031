"""`python -m engine search`: rank an index's tiles by text, an example image, or a location."""
from __future__ import annotations

import argparse

from . import map_bounds, print_json
from ..core.templates import TEMPLATES_HELP
from ..core.errors import UsageError
from ..archive.search import _parse_point, search, write_hits
from ..core.jobs import check_outputs
from ..core.options import EXAMPLE_METHODS, SearchOptions
from ..data.examples import Example, read_examples


def register(sub) -> None:
    from ..archive.ann import IVF_MIN_ROWS  # deferred: a test replaces it at call time
    from ..archive.approx import APPROX_MIN_ROWS  # deferred: a test replaces it at call time
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
    q = p.add_mutually_exclusive_group()
    q.add_argument("--text", metavar="T", help="describe what to find, e.g. \"a quarry\"")
    q.add_argument("--image", metavar="PATH", help="an example image file (PNG, JPEG, TIFF)")
    p.add_argument("--like", metavar="X,Y", action="append", default=None,
                   help="a location: its tile's embedding is the query; repeat it (or add "
                        "--unlike / --examples) to mark several places \"like this\"")
    p.add_argument("--unlike", metavar="X,Y", action="append", default=None,
                   help="a location marked \"not this\" (repeat for several)")
    p.add_argument("--examples", metavar="FILE", default=None,
                   help="marked places: any vector file OGR reads with a 'label' field "
                        "(1 = like this, 0 = not this), in any CRS (docs/examples.md)")
    p.add_argument("--examples-method", choices=list(EXAMPLE_METHODS), default=d.examples_method,
                   help=f"how marked places refine the ranking; default {d.examples_method}")
    p.add_argument("--crs", default=None, metavar="EPSG:N",
                   help="CRS of --like/--unlike (default: the CRS the index's rasters share)")
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
    from . import cancel_event

    if args.out:
        if not str(args.out).lower().endswith((".gpkg", ".geojson", ".json")):
            raise UsageError(f"cannot write hits to {args.out}", "name the output .gpkg or .geojson")
        check_outputs([("--out", args.out)], [("--image", args.image)], overwrite=args.overwrite,
                      sealed=[("the index", args.index)])
    likes, unlikes = list(args.like or ()), list(args.unlike or ())
    if args.crs and not likes and not unlikes:
        raise UsageError("--crs given without --like or --unlike", "--crs is the CRS of those points")
    like, examples, examples_crs = _marks(args, likes, unlikes)
    if like is None and examples is None and args.text is None and args.image is None:
        raise UsageError("no query given", "give --text, --image, --like X,Y or --examples FILE")
    opts = SearchOptions(top_k=args.top_k, negative=tuple(args.negative or ()),
                         negative_weight=args.negative_weight, method=args.method,
                         device=args.device, precision=args.precision, templates=args.templates,
                         examples_method=args.examples_method)
    result = search(args.index, text=args.text, image=args.image, like=like,
                    like_crs=args.crs, model=args.model, options=opts, cancel=cancel_event(),
                    examples=examples, examples_crs=examples_crs)
    if args.out:
        write_hits(result, args.out, overwrite=args.overwrite)
    marks = result.query.get("examples")
    if marks and not args.json:
        print(f"refined by {marks['positive']} 'like this' and {marks['negative']} 'not this' "
              f"places ({marks['method']})" + (f"; {marks['outside']} outside every indexed tile"
                                                if marks["outside"] else ""))
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


def _marks(args, likes, unlikes):
    """(like, examples, examples' CRS): one --like alone is a location query, as ever;
    several, or beside --text/--image/--unlike/--examples, they are marked places
    (engine.data.examples) that refine the ranking."""
    if len(likes) == 1 and not unlikes and not args.examples and args.text is None and args.image is None:
        return likes[0], None, None
    if not likes and not unlikes and not args.examples:
        return None, None, None
    examples, crs = [], None
    if args.examples:
        examples, crs = read_examples(args.examples)
    for points, positive in ((likes, True), (unlikes, False)):
        for text in points:
            try:
                x, y = _parse_point(text)
            except UsageError as exc:
                flag = "--like" if positive else "--unlike"
                raise UsageError(exc.message.replace("--like", flag), exc.hint.replace("--like", flag)) from None
            examples.append(Example(x, y, positive, crs=args.crs or ""))   # "": the rasters' CRS
    return None, examples, crs
