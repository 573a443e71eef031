"""`python -m engine eval`: reproduce the papers' tables (retrieval, zero-shot classification, RemoteCount)."""
from __future__ import annotations

import argparse

from . import add_model_args, print_json, tqdm_progress
from ..core.templates import DEFAULT_ENSEMBLE_MEAN, ENSEMBLE_MEANS, TEMPLATES_HELP
from ..core.options import DEFAULT_RETRIEVAL_ORDER, RETRIEVAL_ORDERS
from ..data.metrics import DEFAULT_TIES, TIE_MODES
from .. import evaluate


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a model: retrieval, zero-shot classification, counting",
        description="Evaluate a model with the protocols of the published tables: "
                    "'retrieval' (RSICD / RSITMD / UCM caption JSON or a CSV: recall@1/5/10 both "
                    "ways, mean recall), 'classify' (a folder per class: zero-shot top-1/top-5 "
                    "with the prompt template ensemble), 'count' (RemoteCount: image,object,count "
                    "rows). See docs/models.md for the numbers RemoteCLIP reports.")
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True

    r = tasks.add_parser("retrieval", help="image-text retrieval recall",
                         description="Recall@1/5/10 image->text and text->image and their mean.")
    r.add_argument("data", help="caption JSON (dataset_rsicd.json, ...) or CSV with image and caption columns")
    r.add_argument("--images", default=None, metavar="DIR", help="image folder (default: beside DATA)")
    r.add_argument("--split", default="test", help="JSON split to evaluate (default test; 'all' for every image)")
    r.add_argument("--ties", choices=list(TIE_MODES), default=DEFAULT_TIES,
                   help="order: ties broken by sort order like RemoteCLIP's evaluation (default); "
                        "pessimistic: every tie counts against the query")
    r.add_argument("--order", choices=list(RETRIEVAL_ORDERS), default=DEFAULT_RETRIEVAL_ORDER,
                   help="image order, which decides ties under --ties order: name: sorted by file "
                        "name, each image's captions together, as RemoteCLIP's retrieval.py reads "
                        "the data (default); data: the file's order")

    c = tasks.add_parser("classify", help="zero-shot classification accuracy",
                         description="Zero-shot top-1 / top-5 accuracy on a folder with one sub-folder "
                                     "of images per class (EuroSAT, RESISC45, AID, UCM, ...).")
    c.add_argument("data", metavar="FOLDER", help="dataset folder, one sub-folder per class")
    c.add_argument("--classes", default=None, metavar="FILE",
                   help="class names: one per line in sorted folder order, or folder<TAB>name lines "
                        "(default: folder names, _ and - as spaces)")
    c.add_argument("--templates", default=None, metavar="SET|FILE", help=TEMPLATES_HELP)
    c.add_argument("--ensemble-mean", choices=list(ENSEMBLE_MEANS), default=DEFAULT_ENSEMBLE_MEAN,
                   help="how a class's template embeddings are averaged: normalised: each "
                        "normalised first (CLIP, CLIP_benchmark, RemoteCLIP; default); raw: as the "
                        "text tower gives them (GeoRSCLIP's zero-shot evaluation)")

    n = tasks.add_parser("count", help="RemoteCount counting accuracy",
                         description="RemoteCount: each image is scored against 'there are {n} "
                                     "{objects} in the image', n = 1..10; top-1 accuracy and MAE.")
    n.add_argument("data", help="CSV (or JSON list) with image, object and count")
    n.add_argument("--images", default=None, metavar="DIR", help="image folder (default: beside DATA)")

    for q in (r, c, n):
        add_model_args(q)
        q.add_argument("--batch-size", type=int, default=64, help="images per model call; default 64")
        q.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lm = args.model          # loaded by the evaluation once the data has been read
    kw = {"device": args.device, "precision": args.precision}
    bar = tqdm_progress(f"eval {args.task}", unit="img")
    try:
        if args.task == "retrieval":
            res = evaluate.eval_retrieval(lm, args.data, args.images,
                                          None if args.split == "all" else args.split,
                                          args.ties, args.batch_size, bar, order=args.order, **kw)
        elif args.task == "classify":
            res = evaluate.eval_classify(lm, args.data, args.classes, args.templates,
                                         args.batch_size, bar, mean=args.ensemble_mean, **kw)
        else:
            res = evaluate.eval_count(lm, args.data, args.images, args.batch_size, bar, **kw)
    finally:
        bar.close()
    if args.json:
        print_json(res)
        return 0
    if args.task == "retrieval":
        print(f"{res['images']} images, {res['texts']} captions ({res['distinct_captions']} distinct), "
              f"ties: {res['ties']}, order: {res['order']}")
        print(f"image->text R@1/5/10 {res['i2t_r1']:5.2f} {res['i2t_r5']:5.2f} {res['i2t_r10']:5.2f}")
        print(f"text->image R@1/5/10 {res['t2i_r1']:5.2f} {res['t2i_r5']:5.2f} {res['t2i_r10']:5.2f}")
        print(f"mean recall          {res['mean_recall']:5.2f}")
    elif args.task == "classify":
        k = [key for key in res if key.startswith("top") and key != "top1"][0]
        print(f"{res['images']} images, {res['classes']} classes, {len(res['templates'])} templates")
        print(f"top-1 {res['top1']:5.2f}   {k[:3]}-{k[3:]} {res[k]:5.2f}")
    else:
        print(f"{res['images']} images: top-1 accuracy {res['top1']:5.2f}, mean absolute error {res['mae']:.2f}")
    return 0
