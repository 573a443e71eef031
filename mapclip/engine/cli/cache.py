"""`python -m engine cache info|clear`: what the embedding cache holds, and emptying it."""
from __future__ import annotations

import argparse

from . import print_json
from ..cache.store import CACHE


def register(sub) -> None:
    p = sub.add_parser(
        "cache", help="show or empty the embedding cache (a raster embedded once answers later prompts)",
        description="detect and count keep each raster's embeddings (per extent, tiling, read "
                    "options and model) so a later prompt on the same extent is answered without "
                    "reading or encoding the raster again. They are kept in memory for one "
                    "process and on disk under $MAPCLIP_CACHE/embeddings (~/.cache/mapclip/embeddings) "
                    "for later runs, QGIS and Processing alike; the oldest are removed past the "
                    "bound ($MAPCLIP_CACHE_DISK_MB, $MAPCLIP_CACHE_MEMORY_MB). --no-cache on a "
                    "command turns it off for that run.")
    p.add_argument("action", choices=["info", "clear"], help="info: where, how many, how big; "
                                                             "clear: remove every kept embedding")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "clear":
        removed = CACHE.clear()
        info = dict(CACHE.info(), removed=removed)
        if args.json:
            print_json(info)
        else:
            print(f"removed {removed} cached embedding passes from {info['folder']}")
        return 0
    info = CACHE.info()
    if args.json:
        print_json(info)
    else:
        print(f"{info['entries']} cached embedding passes, {info['disk_mb']:.1f} MB of "
              f"{info['disk_limit_mb']:.0f} MB, in {info['folder']}")
        print("memory bound per process: "
              f"{info['memory_limit_mb']:.0f} MB ($MAPCLIP_CACHE_MEMORY_MB); empty it with "
              "`python -m engine cache clear`")
    return 0
