"""`python -m engine dedup`: near-duplicate and test-contaminated images by p-Hash."""
from __future__ import annotations

import argparse
import sys

from . import cancel_event, print_json, tqdm_progress
from ..core.errors import UsageError
from ..core.options import DEFAULT_HASH_SIZE, DEFAULT_MAX_DISTANCE, DedupOptions
from ..dedup.duplicates import find_duplicates
from ..dedup.hashing import input_roots
from ..dedup.quarantine import check_quarantine, move_duplicates, undo_move


def register(sub) -> None:
    p = sub.add_parser("dedup", help="find near-duplicate images (p-Hash), optionally set them aside",
                       description="Hash every image (p-Hash), find pairs within a Hamming "
                                   "distance through a segment index, group them and keep one "
                                   "per group; with --against, flag images that duplicate a "
                                   "test set. Inputs are never modified; --move-to moves the "
                                   "images not kept, --undo MANIFEST puts them back.")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="folders of images (searched recursively)")
    p.add_argument("--against", action="append", metavar="TEST_DIR", default=None,
                   help="test-set folder: report input images that duplicate its images "
                        "(repeat for several)")
    p.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE, metavar="D",
                   help="duplicates have Hamming distance <= D bits (default "
                        f"{DEFAULT_MAX_DISTANCE}: RemoteCLIP's 'below 2')")
    p.add_argument("--hash-size", type=int, default=DEFAULT_HASH_SIZE, metavar="S",
                   help=f"p-Hash of S*S bits (default {DEFAULT_HASH_SIZE}: 64 bits)")
    p.add_argument("--segments", type=int, default=None, metavar="N",
                   help="segments per hash, must exceed D (default D + 1)")
    p.add_argument("--out", metavar="report.csv", help="report to write (required unless --undo)")
    p.add_argument("--move-to", metavar="QUARANTINE", default=None,
                   help="move the images not kept there, with a manifest for --undo")
    p.add_argument("--undo", metavar="MANIFEST", default=None,
                   help="put back the files a --move-to manifest lists, and stop")
    p.add_argument("--cache", metavar="PATH", default="default",
                   help="hash cache file (SQLite; default $MAPCLIP_CACHE/dedup/phash.sqlite)")
    p.add_argument("--no-cache", action="store_true", help="hash every image afresh")
    p.add_argument("--workers", type=int, default=2, help="hashing threads (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.undo:
        if args.dirs or args.move_to or args.against:
            raise UsageError("--undo takes only the manifest", "run the undo on its own")
        res = undo_move(args.undo, progress=None, cancel=cancel_event())
        for s in res.skipped:
            print(f"skipped {s}", file=sys.stderr)
        _removed_partials(res)
        if args.json:
            print_json(res.to_json())
        else:
            print(f"moved {res.moved} file(s) back ({len(res.skipped)} skipped) from {res.manifest}")
        return 0
    if not args.dirs:
        raise UsageError("no input folders", "name at least one folder of images")
    if not args.out:
        raise UsageError("--out is required", "name the report, e.g. --out report.csv")
    if args.move_to:  # refused before any work: no report is written for a bad quarantine
        check_quarantine(args.move_to, input_roots(list(args.dirs) + list(args.against or [])))
    opts = DedupOptions(max_distance=args.max_distance, hash_size=args.hash_size,
                        segments=args.segments, cache=None if args.no_cache else args.cache,
                        workers=args.workers, overwrite=args.overwrite)
    cancel = cancel_event()
    bar = tqdm_progress("hash", unit="img")
    try:
        res = find_duplicates(args.dirs, args.out, args.against, opts, progress=bar, cancel=cancel)
    finally:
        bar.close()
    for path, why in res.unreadable[:10]:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if len(res.unreadable) > 10:
        print(f"... {len(res.unreadable) - 10} more unreadable (see the report)", file=sys.stderr)
    moved = None
    if args.move_to:
        moved = move_duplicates(res, args.move_to, cancel=cancel)
        _removed_partials(moved)
    if args.json:
        out = res.to_json()
        out["move"] = moved.to_json() if moved else None
        print_json(out)
    else:
        print(f"{res.images} images ({res.from_cache} hashes from cache), {res.pairs} duplicate "
              f"pairs in {len(res.groups)} groups, {len(res.contaminated)} contaminated, "
              f"{len(res.unreadable)} unreadable; {len(res.remove)} not kept -> {res.report}")
        if moved:
            print(f"moved {moved.moved} file(s); undo with: python -m engine dedup --undo "
                  f"{moved.manifest}")
    return 0


def _removed_partials(res) -> None:
    for path in res.removed_partial:
        print(f"removed {path}: a partial copy left by an interrupted move or undo",
              file=sys.stderr)
