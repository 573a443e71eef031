"""`python -m engine finetune`: contrastive fine-tuning on image-caption pairs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import add_model_args, cancel_event, print_json, tqdm_progress
from ..core.jobs import check_outputs
from ..core.options import FREEZE, FinetuneOptions, PIR_LABELS, RECIPES, RECIPE_WEIGHT_DECAY


#: options that default to FinetuneOptions' values, or to the run's with --resume
TUNABLE = ("epochs", "batch_size", "accum", "lr", "weight_decay", "warmup", "val_split", "freeze",
           "crop_scale",
           "unlock_last", "seed", "recipe", "pir_prior", "pir_prior_epochs", "pir_prior_lr",
           "pir_cal_weight", "pir_labels")


def register(sub) -> None:
    d = FinetuneOptions(model="", data="", out="")
    p = sub.add_parser(
        "finetune", help="fine-tune a CLIP model on image-caption pairs",
        description="Continue contrastive (InfoNCE) training of a CLIP model on image-caption "
                    "pairs, evaluate retrieval before and after, and keep the best model as "
                    "RUN_DIR/best (loadable with --model RUN_DIR/best). Use --model ARCH:random "
                    "to train an architecture from a random initialisation.")
    add_model_args(p)
    p.add_argument("--data", required=True, nargs="+", metavar="DATA",
                   help="caption file(s): CSV/TSV (image, caption), JSONL, or RSICD/UCM/RSITMD JSON; "
                        "or a file of marked places (.gpkg, .geojson, .shp: a 'label' field, "
                        "1 like this, 0 not this) with --raster")
    p.add_argument("--raster", default=None, metavar="RASTER",
                   help="the raster marked places were made on: each mark's chip is cut from it")
    p.add_argument("--marks-caption", default=None, metavar="T",
                   help="caption of a 'like this' mark without its own prompt or caption field")
    p.add_argument("--marks-chip", type=int, default=None, metavar="PX",
                   help="chip side around each mark in raster pixels (default: the model's window)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="folder for relative image paths (default: each caption file's folder)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (new or empty, or --resume)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"pairs per forward pass (default {d.batch_size})")
    p.add_argument("--accum", type=int, default=None,
                   help="micro-batches per step; the contrastive batch is batch-size x accum "
                        f"(default {d.accum})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay (default: the recipe's, "
                        + ", ".join(f"{k} {v:g}" for k, v in RECIPE_WEIGHT_DECAY.items()) + ")")
    p.add_argument("--warmup", type=float, default=None,
                   help=f"fraction of steps for linear warm-up (default {d.warmup:g})")
    p.add_argument("--val-split", type=float, default=None,
                   help="fraction of images held out for evaluation when the data names no split; "
                        f"0 evaluates on the training images (default {d.val_split:g})")
    p.add_argument("--freeze", choices=FREEZE, default=None,
                   help=f"freeze one tower (default {d.freeze})")
    p.add_argument("--unlock-last", type=int, default=None, metavar="N",
                   help="train only the last N blocks (+ final norm/projection) of unfrozen towers; "
                        "0 = all (default)")
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="clip: symmetric InfoNCE (RemoteCLIP); pir: PIR-CLIP, a scene classifier "
                        "instructs the image tower, InfoNCE plus the cluster-wise affiliation loss; "
                        "needs a label (or class) column with each image's scene class "
                        f"(default {d.recipe})")
    p.add_argument("--pir-prior", default=None, metavar="FILE",
                   help="recipe pir: the scene classifier's checkpoint (a prior.safetensors of an "
                        "earlier run, a PIR model folder, or a PIR-CLIP checkpoint); default: "
                        "trained first on the same data")
    p.add_argument("--pir-labels", choices=PIR_LABELS, default=None,
                   help="recipe pir: each image's scene class from the caption file's label (or "
                        "class) column, or from the file name's part before the first _ (PIR-CLIP's "
                        f"rule, RSITMD's airport_12.tif) (default {d.pir_labels})")
    p.add_argument("--pir-prior-epochs", type=int, default=None, metavar="N",
                   help=f"recipe pir: epochs of the scene classifier's stage (default {d.pir_prior_epochs})")
    p.add_argument("--pir-prior-lr", type=float, default=None, metavar="X",
                   help=f"recipe pir: that stage's learning rate (default {d.pir_prior_lr:g})")
    p.add_argument("--pir-cal-weight", type=float, default=None, metavar="X",
                   help="recipe pir: weight of the cluster-wise affiliation loss "
                        f"(default {d.pir_cal_weight:g}, as the reference sums the two losses)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in RUN_DIR (settings not given again are "
                        "taken from the run)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad record instead of skipping it")
    p.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    p.add_argument("--crop-scale", type=_crop_scale, default=None, metavar="MIN,MAX",
                   help="random resized crop keeps this fraction of the image area "
                        f"(default {d.crop_scale[0]:g},{d.crop_scale[1]:g}; raise MIN for small objects)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help=f"image decoding processes, 0 = main process (default {d.workers})")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def _crop_scale(text: str):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN,MAX (e.g. 0.8,1.0)") from None
    if not 0 < lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"crop scale {text} must satisfy 0 < MIN <= MAX <= 1")
    return (lo, hi)


def _print_metrics(name: str, m: dict) -> None:
    if not m:
        return
    print(f"{name:<7} R@1/5/10 image->text {m['i2t_r1']:5.1f} {m['i2t_r5']:5.1f} {m['i2t_r10']:5.1f}"
          f"   text->image {m['t2i_r1']:5.1f} {m['t2i_r5']:5.1f} {m['t2i_r10']:5.1f}"
          f"   mean recall {m['mean_recall']:5.1f}")


def run(args: argparse.Namespace) -> int:
    from ..finetune import finetune
    from ..finetune import options_from_run
    given = {k: getattr(args, k) for k in TUNABLE if getattr(args, k) is not None}
    # the model's files (a folder, or the checkpoint of ARCH:CHECKPOINT) are inputs too
    model_files = [m for m in {args.model, args.model.split(":", 1)[-1]} if Path(m).exists()]
    check_outputs([("--out", args.out)],
                  [("--data", d) for d in args.data] + [("--images", args.images)]
                  + [("--model", m) for m in model_files]
                  + ([("--pir-prior", args.pir_prior)] if args.pir_prior else [])
                  + ([("--raster", args.raster)] if args.raster else []),
                  folders=["--out"], may_exist=["--out"])
    common = dict(model=args.model, data=args.data, device=args.device, precision=args.precision,
                  strict=args.strict, workers=args.workers, raster=args.raster,
                  marks_caption=args.marks_caption, marks_chip_px=args.marks_chip)
    if args.images:
        common["image_root"] = args.images
    if args.resume and Path(args.out, "run.json").is_file():
        # settings not given again on the command line are those of the run
        options = options_from_run(args.out, **common, **given)
    else:
        options = FinetuneOptions(out=args.out, resume=args.resume, **common, **given)
    bar = tqdm_progress("fine-tune", unit="step")
    try:
        result = finetune(options, progress=bar, cancel=cancel_event())
    finally:
        bar.close()
    skipped = result.skipped
    if skipped.total:
        print(f"{skipped.summary()}", file=sys.stderr)
        for line in skipped.examples[:5]:
            print(f"  {line}", file=sys.stderr)
    if args.json:
        print_json(result.to_json())
        return 0
    print(f"model:    {result.model} on {result.device} ({result.precision})")
    print(f"data:     {result.train_images} training images ({result.train_captions} captions), "
          f"evaluated on {result.eval_split}: {result.eval_images} images, {result.eval_texts} captions")
    print(f"skipped:  {skipped.summary()}")
    if result.marks:
        m = result.marks
        print(f"marks:    {m['positive']} 'like this' and {m['negative']} captioned 'not this' "
              f"pairs ({m['left_out']} 'not this' without a caption left out, {m['outside']} "
              "outside the raster)")
    if result.prior:
        acc = result.prior.get("accuracy")
        print(f"prior:    {len(result.prior['classes'])} scene classes"
              + (f", training accuracy {acc:.1f} %" if acc is not None else "")
              + (f" -> {result.prior['file']}" if result.prior.get("file") else ""))
    _print_metrics("before", result.metrics_before)
    _print_metrics("after", result.metrics_after)
    print(f"training: {result.epochs_run} epoch(s) run"
          + (f" (resumed after epoch {result.resumed_from_epoch})" if result.resumed_from_epoch else "")
          + f", {result.steps} steps, {result.samples_per_s:.1f} samples/s, {result.seconds:.1f} s")
    if result.best_path:
        print(f"best:     epoch {result.best_epoch}, mean recall {result.best_mean_recall:.1f} -> "
              f"{result.best_path}  (use --model {result.best_path})")
    return 0
