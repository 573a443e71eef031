"""`python -m engine convert b2c|m2b`: annotations into captions, masks into boxes."""
from __future__ import annotations

import argparse
import sys

from . import cancel_event, print_json, tqdm_progress
from ..core.options import BoxCaptionOptions, MaskOptions
from ..data.annotations import FORMATS
from ..data.box_caption import box_to_caption
from ..data.mask_box import mask_to_box


def register(sub) -> None:
    p = sub.add_parser("convert", help="Box-to-Caption and Mask-to-Box dataset conversion",
                       description="Turn detection annotations into image-caption pairs "
                                   "(b2c) and segmentation masks into boxes (m2b), as in "
                                   "RemoteCLIP's data-scaling recipe.")
    conv = p.add_subparsers(dest="convert_command", metavar="STEP")
    conv.required = True

    b = conv.add_parser("b2c", help="five captions per image from its boxes",
                        description="Box-to-Caption: five captions per image (objects in the "
                                    "central region, objects outside it, three counting "
                                    "captions); images without objects get none.")
    b.add_argument("--annotations", required=True, metavar="ANN",
                   help="COCO JSON file, or a label file / folder (DOTA .txt, YOLO .txt, VOC .xml)")
    b.add_argument("--format", required=True, metavar="FORMAT",
                   help=f"annotation format: {', '.join(FORMATS)}")
    b.add_argument("--images", metavar="DIR", default=None,
                   help="folder of the images: their paths and sizes (required for YOLO)")
    b.add_argument("--out", required=True, help="captions file (.csv, .tsv or .jsonl)")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    b.add_argument("--skip-difficult", action="store_true",
                   help="leave out objects marked difficult (DOTA, VOC)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output")
    b.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    b.set_defaults(func=run_b2c)

    m = conv.add_parser("m2b", help="boxes (COCO JSON) from class-index masks",
                        description="Mask-to-Box: one box per region (8-connected component, "
                                    "so a same-class island in a hole gets its own box) of "
                                    "each class in single-band class-index masks, written as "
                                    "COCO JSON. A class named background is skipped unless "
                                    "--keep-background.")
    m.add_argument("--masks", required=True, metavar="DIR", help="folder of masks (or one mask)")
    m.add_argument("--classes", required=True, metavar="CLASSES.json",
                   help='class index -> name, e.g. {"1": "building", "2": "road"}')
    m.add_argument("--out", required=True, help="COCO JSON file to write")
    m.add_argument("--min-area", type=int, default=0, metavar="PX",
                   help="drop regions with fewer pixels (default 0: keep all)")
    m.add_argument("--ignore-index", type=int, default=None, metavar="N",
                   help="a mask value to skip as well, e.g. 255 (void); a class named "
                        "background is skipped anyway unless --keep-background")
    m.add_argument("--keep-background", action="store_true",
                   help="also box the class named background")
    m.add_argument("--images", metavar="DIR", default=None,
                   help="folder of the images named like the masks (used in file_name and captions)")
    m.add_argument("--captions", metavar="CSV", default=None,
                   help="also write Box-to-Caption captions of the boxes here")
    m.add_argument("--seed", type=int, default=0, help="random seed for --captions (default 0)")
    m.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    m.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    m.set_defaults(func=run_m2b)


def _report_empty(empty) -> None:
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        print(f"{len(empty)} image(s) without objects got no captions: {shown}", file=sys.stderr)


def run_b2c(args: argparse.Namespace) -> int:
    opts = BoxCaptionOptions(format=args.format, images_dir=args.images, seed=args.seed,
                          include_difficult=not args.skip_difficult, overwrite=args.overwrite)
    bar = tqdm_progress("caption", unit="img")
    try:
        res = box_to_caption(args.annotations, args.out, opts, progress=bar, cancel=cancel_event())
    finally:
        bar.close()
    _report_empty(res.empty)
    if args.json:
        print_json(res.to_json())
    else:
        print(f"{res.captions} captions for {res.captioned} of {res.images} images "
              f"({res.objects} objects, {len(res.categories)} classes) -> {res.out}")
    return 0


def run_m2b(args: argparse.Namespace) -> int:
    opts = MaskOptions(min_area=args.min_area, ignore_index=args.ignore_index,
                       images_dir=args.images, overwrite=args.overwrite,
                       captions=args.captions, seed=args.seed,
                       keep_background=args.keep_background)
    bar = tqdm_progress("masks", unit="mask")
    try:
        res = mask_to_box(args.masks, args.classes, args.out, opts, progress=bar,
                          cancel=cancel_event())
    finally:
        bar.close()
    if res.unknown_values:
        vals = ", ".join(f"{k} ({v} px)" for k, v in list(res.unknown_values.items())[:8])
        print(f"mask values not in the classes were skipped: {vals}", file=sys.stderr)
    if res.captions is not None:
        _report_empty(res.captions.empty)
    if args.json:
        print_json(res.to_json())
    else:
        print(f"{res.boxes} boxes from {res.masks} masks "
              f"({res.dropped_small} regions under --min-area dropped) -> {res.out}")
        if res.captions is not None:
            print(f"{res.captions.captions} captions for {res.captions.captioned} images "
                  f"-> {res.captions.out}")
    return 0
