"""`python -m engine caption`: describe a place in words (caption retrieval or CoCa generation)."""
from __future__ import annotations

import argparse
import sys

from . import RASTER_HELP, add_model_args, map_bounds, parse_bands, parse_floats, print_json, raster_arg
from ..core.errors import UsageError
from ..caption import caption, read_caption_bank
from ..core.options import CAPTION_METHODS, CaptionOptions, ReadOptions


def register(sub) -> None:
    d = CaptionOptions()
    p = sub.add_parser(
        "caption", help="describe a place of a raster in words: the best captions of a bank, or "
                        "a caption written by a CoCa model",
        description="Read a place of a raster (an extent, one or more boxes, or the whole raster) "
                    "as one image and describe it: with --bank, rank the captions of a caption "
                    "bank (a CSV, an RSICD-style JSON or Box-to-Caption output) by similarity "
                    "(any CLIP model); without it, a CoCa model writes a caption (beam search or "
                    "sampling). See docs/caption.md.")
    p.add_argument("raster", help=RASTER_HELP)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--extent", default=None, metavar="XMIN,YMIN,XMAX,YMAX",
                       help="the place (default: the whole raster)")
    where.add_argument("--box", action="append", default=None, metavar="XMIN,YMIN,XMAX,YMAX",
                       help="a box to describe; repeat for several (one result each)")
    p.add_argument("--extent-crs", default=None, metavar="EPSG:N",
                   help="CRS of --extent / --box (default: the raster's CRS)")
    add_model_args(p)
    p.add_argument("--bank", default=None, metavar="CAPTIONS.csv",
                   help="caption bank: .csv/.tsv/.txt (a caption column, or one caption a line) "
                        "or .json/.jsonl (RSICD layout); without it the model must be a CoCa")
    p.add_argument("--top", type=int, default=d.top, metavar="N",
                   help=f"retrieval: the N best captions per place; default {d.top}")
    p.add_argument("--templates", default=d.templates, metavar="SET",
                   help=f"retrieval: how captions are encoded (default {d.templates}: as written)")
    p.add_argument("--generate", action="store_true",
                   help="write a caption with the model (CoCa) even when --bank is given")
    p.add_argument("--method", choices=list(CAPTION_METHODS), default=d.method,
                   help=f"generation: beam_search, or sampling (top_k, top_p); default {d.method}")
    p.add_argument("--beams", type=int, default=d.beams, help=f"beam search: beams; default {d.beams}")
    p.add_argument("--max-length", type=int, default=d.max_length, metavar="TOKENS",
                   help=f"generation: tokens at most; default {d.max_length}")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature; default {d.temperature:g}")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"top_p sampling; default {d.top_p:g}")
    p.add_argument("--sample-top-k", type=int, default=d.sample_top_k, metavar="K",
                   help=f"top_k sampling; default {d.sample_top_k}")
    p.add_argument("--seed", type=int, default=d.seed, help=f"sampling seed; default {d.seed}")
    p.add_argument("--bands", default=None, metavar="R,G,B",
                   help="1-based bands read as R,G,B (default: by colour interpretation)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (method, model, places with caption and captions)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from . import cancel_event
    args.raster = raster_arg(args.raster)   # local, or remote opened by GDAL
    example = "500000,4000000,501000,4001000"
    if args.box:
        places = [parse_floats(b, 4, "--box", f"--box {example}") for b in args.box]
    elif args.extent:
        places = [parse_floats(args.extent, 4, "--extent", f"--extent {example}")]
    else:
        if args.extent_crs:
            raise UsageError("--extent-crs given without --extent or --box",
                             "add --extent xmin,ymin,xmax,ymax")
        places = [None]
    bank = read_caption_bank(args.bank) if args.bank else None  # bad banks before the model
    opts = replace(CaptionOptions(), top=args.top, templates=args.templates, method=args.method,
                   beams=args.beams, max_length=args.max_length, temperature=args.temperature,
                   top_p=args.top_p, sample_top_k=args.sample_top_k, seed=args.seed,
                   read=ReadOptions(bands=parse_bands(args.bands)), device=args.device,
                   precision=args.precision)
    result = caption(args.raster, args.model, places, extent_crs=args.extent_crs, bank=bank,
                     options=opts, generate=True if args.generate else None,
                     cancel=cancel_event())
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        print_json(result.to_json())
        return 0
    for place in result.places:
        print(f"{map_bounds(place.bounds, result.crs)}:")
        for c in place.captions:
            extra = "" if result.method == "generation" else f"  (cosine {c.cosine:.3f})"
            print(f"  #{c.rank} {c.text}{extra}")
    return 0
