"""`python -m engine models`: list presets, or load one and report on it."""
from __future__ import annotations

import argparse

from . import print_json, tqdm_progress
from ..model import architectures, hub, models, presets


def register(sub) -> None:
    p = sub.add_parser("models", help="list model presets, or check that one loads",
                       description="List the model presets and where each loads from; with "
                                   "--check SPEC, load SPEC and print its embedding size, "
                                   "device and precision.")
    p.add_argument("--check", metavar="SPEC", help="load this model and report on it")
    p.add_argument("--archs", action="store_true", help="list the open_clip architectures")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.check:
        bar = tqdm_progress("download", unit="B")
        try:
            lm = models.load_model(args.check, device=args.device, precision=args.precision,
                                   progress=bar)
        finally:
            bar.close()
        info = lm.describe()
        if args.json:
            print_json(info)
        else:
            print(f"model:      {info['model']} ({info['arch']})")
            print(f"embed_dim:  {info['embed_dim']}")
            print(f"image_size: {info['image_size']}")
            print(f"device:     {info['device']}")
            print(f"precision:  {info['precision']}")
        return 0
    if args.archs:
        import open_clip
        architectures.register_configs()
        for name in open_clip.list_models():
            print(name)
        return 0
    from ..core.options import GENERIC_DEFAULTS  # deferred: a test replaces it at call time
    rows = [{"name": p.name, "arch": p.arch, "family": p.family, "description": p.description,
             "loads_from": hub.preset_location(p), "available": hub.preset_available(p),
             "defaults": presets.model_defaults(p.name).over(GENERIC_DEFAULTS).to_json(),
             "templates": p.templates, "reference": p.reference}
            for p in presets.list_presets()]
    if args.json:
        print_json({"presets": rows, "cache": str(hub.cache_dir()), "default": presets.DEFAULT_MODEL})
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "*" if r["available"] else " "
        print(f"{mark} {r['name']:<{width}}  {r['arch']:<20} {r['description']}")
        print(f"  {'':<{width}}  from {r['loads_from']}")
        print(f"  {'':<{width}}  defaults: " + ", ".join(f"{k} {v}" for k, v in r["defaults"].items()))
    print(f"\n* = available offline. Cache folder: {hub.cache_dir()} (set $MAPCLIP_CACHE to move it).")
    print("Other specs: ARCH:TAG (open_clip), ARCH:CHECKPOINT, hf-hub:ORG/NAME, or a model folder.")
    return 0
