"""Evaluation of a model on the published benchmarks' protocols (``python -m engine eval``).

- :func:`eval_retrieval`: image-text retrieval on RSICD / RSITMD / UCM-Captions
  (their caption JSON, the Karpathy layout ``{"images": [{"filename",
  "split", "sentences": [{"raw"}]}]}``) or a CSV of ``image,caption`` rows;
  recall@1/5/10 both ways and mean recall with :mod:`engine.data.metrics`
  (ties broken by sort order as RemoteCLIP's evaluation does, or
  pessimistically), images sorted by file name as RemoteCLIP's retrieval.py
  reads them (or in the data's order).
- :func:`eval_classify`: zero-shot classification on a folder-per-class
  dataset (EuroSAT, RESISC45, AID, UCM ...): every class name goes through
  the prompt template ensemble (engine.model.scoring), top-1 and top-5 accuracy.
- :func:`eval_count`: RemoteCLIP's RemoteCount protocol: every image of a
  list of ``image,object,count`` rows is scored against the ten captions
  "there are {n} {objects} in the image" (n = 1..10, words and digits,
  engine.count), the argmax is the predicted count; top-1 accuracy and the
  mean absolute error.

Images are read whole and preprocessed like the references (short side
resized to the model's input, centre crop: engine.model.encode.encode_image_files).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .core.errors import UsageError
from .core.options import DEFAULT_RETRIEVAL_ORDER, RETRIEVAL_ORDERS
from .core.templates import DEFAULT_ENSEMBLE_MEAN, ENSEMBLE_MEANS
from .model.models import as_loaded
from .core.options import template_strings
from .count import COUNT_RANGE
from .data.metrics import TIE_MODES, retrieval_metrics
from .model.scoring import encode_prompts, resolve_templates

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def _embed_images(lm, paths: Sequence[str], batch_size: int, progress=None):
    import torch

    from .model.encode import encode_image_files
    out = []
    for i in range(0, len(paths), batch_size):
        out.append(encode_image_files(lm, paths[i:i + batch_size], batch_size))
        if progress:
            progress(min(i + batch_size, len(paths)), len(paths))
    return torch.cat(out) if out else torch.zeros(0, lm.embed_dim)


# --------------------------------------------------------------------------- #
# Retrieval.
# --------------------------------------------------------------------------- #
RSICD_LAYOUT = 'the RSICD layout is {"images": [{"filename": "a.jpg", "split": "test", ' \
               '"sentences": [{"raw": "a caption"}]}]}'


def _read_text(p: Path) -> str:
    """A data file's text; one error line when it is not UTF-8."""
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                         "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _csv_records(p: Path, delimiter: str = ",") -> Tuple[List[str], List[Dict[str, Any]]]:
    """(header, rows as dicts) of a CSV with a header row."""
    try:
        reader = csv.DictReader(io.StringIO(_read_text(p), newline=""), delimiter=delimiter,
                                strict=True)
        rows = list(reader)
    except csv.Error as exc:
        raise UsageError(f"{p} is not readable CSV ({exc}, line {reader.line_num})",
                         "check the file's quotes") from None
    return list(reader.fieldnames or []), rows


def _rsicd_rows(p: Path, split: Optional[str]) -> List[Tuple[str, str]]:
    """(file name, caption) of each sentence of the images of ``split`` in an RSICD
    JSON, its shape and types checked first: a record that is not what the layout
    says is refused, named, never read as text ("None", or a string's letters)."""
    try:
        data = json.loads(_read_text(p))
    except ValueError as exc:
        raise UsageError(f"{p} is not valid JSON ({exc})", RSICD_LAYOUT) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UsageError(f"{p} has no 'images' list", RSICD_LAYOUT)
    rows = []
    for n, e in enumerate(data["images"]):
        where = f"{p.name}: images[{n}]"
        if not isinstance(e, dict):
            raise UsageError(f"{where} is {type(e).__name__} {e!r:.40}, not an object", RSICD_LAYOUT)
        name, sentences = e.get("filename"), e.get("sentences")
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"{where} has no filename", RSICD_LAYOUT)
        if not isinstance(sentences, list):
            raise UsageError(f"{where} ({name}): 'sentences' is "
                             f"{type(sentences).__name__}, not a list", RSICD_LAYOUT)
        if split and e.get("split") != split:
            continue
        for k, sent in enumerate(sentences):
            text = sent.get("raw") if isinstance(sent, dict) else sent
            if not isinstance(text, str):
                raise UsageError(f"{where}.sentences[{k}] ({name}) is {type(text).__name__}, "
                                 "not a caption text", RSICD_LAYOUT)
            if text.strip():
                rows.append((name, text.strip()))
    return rows


def read_retrieval_data(path: str, images: Optional[str] = None, split: Optional[str] = "test",
                        order: str = "name") -> Tuple[List[str], List[str], List[int]]:
    """(image paths, captions, owner image index per caption) from a caption JSON or CSV.

    ``order`` (RETRIEVAL_ORDERS): ``"name"`` reads the data as RemoteCLIP's
    retrieval.py does: when an image has more than one caption, the images are
    sorted by file name as written in the data (its ``np.unique``) and each
    image's captions follow together, in the data's order; otherwise the data's
    order stays. ``"data"`` keeps the file's order. With ties broken by order
    (``--ties order``) the order decides which of two equal scores is first.

    JSON (RSICD, RSITMD, UCM-Captions): images of ``split`` (None: all), each
    with its sentences; image files are looked up in ``images`` (default: the
    JSON's folder, then its ``images``/``imgs`` subfolder). CSV: a header with
    an image column (``filepath``, ``image``, ``filename`` or ``path``) and a
    caption column (``caption``, ``title``, ``text`` or ``raw``); paths are
    relative to ``images`` or the CSV's folder.
    """
    if order not in RETRIEVAL_ORDERS:
        raise UsageError(f"unknown image order {order!r}",
                         f"use --order {' or --order '.join(RETRIEVAL_ORDERS)}", option="order")
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"retrieval data {p} does not exist", "give a caption JSON (RSICD/RSITMD/UCM) or a CSV")
    root = Path(images) if images else p.parent
    rows: List[Tuple[str, str]] = []
    if p.suffix.lower() == ".json":
        rows = _rsicd_rows(p, split)
        if not images:
            for sub in ("", "images", "imgs", "RSICD_images"):
                if rows and (p.parent / sub / rows[0][0]).is_file():
                    root = p.parent / sub
                    break
    elif p.suffix.lower() in (".csv", ".tsv"):
        header, reader = _csv_records(p, "\t" if p.suffix.lower() == ".tsv" else ",")
        fields = {f.lower(): f for f in header}
        img_col = next((fields[c] for c in ("filepath", "image", "filename", "path") if c in fields), None)
        cap_col = next((fields[c] for c in ("caption", "title", "text", "raw") if c in fields), None)
        if not img_col or not cap_col:
            raise UsageError(f"{p} has no image and caption columns",
                             "name them e.g. filepath,caption (a header row)")
        rows = [(r[img_col], r[cap_col].strip()) for r in reader
                if r[img_col] and (r[cap_col] or "").strip()]
    else:
        raise UsageError(f"cannot read retrieval data {p}", "give a .json caption file or a .csv")
    if not rows:
        raise UsageError(f"{p} holds no captions" + (f" in split {split!r}" if split else ""),
                         "check --split (RSICD/UCM/RSITMD use train/val/test)")
    if order == "name" and len({name for name, _ in rows}) < len(rows):
        rank = {name: i for i, name in enumerate(sorted({name for name, _ in rows}))}
        rows = sorted(rows, key=lambda row: rank[row[0]])       # stable: captions keep their order
    seen: Dict[str, int] = {}
    captions, owner = [], []
    for name, text in rows:
        full = str((root / name) if not Path(name).is_absolute() else Path(name))
        owner.append(seen.setdefault(full, len(seen)))
        captions.append(text)
    paths = list(seen)
    missing = [q for q in paths if not Path(q).is_file()]
    if missing:
        raise UsageError(f"{len(missing)} images are missing, e.g. {missing[0]}",
                         "give the image folder with --images")
    return paths, captions, owner


def eval_retrieval(model, data: str, images: Optional[str] = None, split: Optional[str] = "test",
                   ties: str = "order", batch_size: int = 64, progress=None,
                   device=None, precision=None, order: str = DEFAULT_RETRIEVAL_ORDER) -> Dict[str, Any]:
    """Recall@1/5/10 both ways and mean recall (percent) on a retrieval dataset; images
    and captions in ``order`` (:func:`read_retrieval_data`)."""
    import torch

    from .model.encode import encode_text
    if ties not in TIE_MODES:
        raise UsageError(f"unknown tie rule {ties!r}", f"use one of {', '.join(TIE_MODES)}")
    paths, captions, owner = read_retrieval_data(data, images, split, order)
    lm = as_loaded(model, device, precision)  # after the data was read: bad data fails fast
    img = _embed_images(lm, paths, batch_size, progress)
    with torch.inference_mode():
        txt = encode_text(lm, captions)   # captions are whole sentences: no templates (the protocol)
    metrics = retrieval_metrics((img @ txt.T).cpu(), owner, ties=ties)
    return {"task": "retrieval", "data": str(data), "split": split, "model": lm.spec,
            "ties": ties, "order": order, "distinct_captions": len(set(captions)), **metrics}


# --------------------------------------------------------------------------- #
# Zero-shot classification.
# --------------------------------------------------------------------------- #
def read_class_folder(folder: str, classes: Optional[str] = None) -> Tuple[List[str], List[str], List[int]]:
    """(class names, image paths, label per image) of a folder-per-class dataset.

    Class names are the sub-folder names with ``_`` and ``-`` as spaces, or
    from ``classes``: a text file with one ``folder<TAB>name`` (or
    ``folder: name``) per line, or just one name per line in the sorted
    order of the sub-folders.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"dataset folder {root} does not exist", "give a folder with one sub-folder per class")
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if len(dirs) < 2:
        raise UsageError(f"{root} has {len(dirs)} class folders", "zero-shot classification needs at least two")
    names = {d.name: d.name.replace("_", " ").replace("-", " ").strip() for d in dirs}
    if classes:
        lines = [ln.strip() for ln in Path(classes).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if all(("\t" in ln or ":" in ln) for ln in lines):
            for ln in lines:
                key, _, name = ln.partition("\t") if "\t" in ln else ln.partition(":")
                if key.strip() in names:
                    names[key.strip()] = name.strip()
        elif len(lines) == len(dirs):
            names = {d.name: ln for d, ln in zip(dirs, lines)}
        else:
            raise UsageError(f"{classes} has {len(lines)} names for {len(dirs)} class folders",
                             "one name per class folder (sorted order), or folder<TAB>name lines")
    paths, labels = [], []
    for i, d in enumerate(dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(f))
                labels.append(i)
    if not paths:
        raise UsageError(f"no images in {root}'s class folders", f"use {', '.join(IMAGE_SUFFIXES)} files")
    return [names[d.name] for d in dirs], paths, labels


def eval_classify(model, folder: str, classes: Optional[str] = None, templates=None,
                  batch_size: int = 64, progress=None, device=None, precision=None,
                  mean: str = DEFAULT_ENSEMBLE_MEAN) -> Dict[str, Any]:
    """Zero-shot top-1 / top-5 accuracy (percent) with the template ensemble, its template
    embeddings averaged as ``mean`` says (engine.core.templates.ENSEMBLE_MEANS)."""
    import torch

    names, paths, labels = read_class_folder(folder, classes)
    template_strings(templates)          # a bad set name or template file fails before the model loads
    if mean not in ENSEMBLE_MEANS:
        raise UsageError(f"unknown ensemble mean {mean!r}",
                         f"use --ensemble-mean {' or --ensemble-mean '.join(ENSEMBLE_MEANS)}",
                         option="ensemble_mean")
    lm = as_loaded(model, device, precision)  # after the data was read: bad data fails fast
    temps = resolve_templates(templates, lm)
    with torch.inference_mode():
        text = encode_prompts(lm, names, temps, mean)
    img = _embed_images(lm, paths, batch_size, progress)
    sims = (img @ text.T).cpu()
    y = torch.as_tensor(labels)
    k5 = min(5, len(names))
    top = sims.topk(k5, dim=1).indices
    top1 = float((top[:, 0] == y).float().mean()) * 100.0
    top5 = float((top == y[:, None]).any(dim=1).float().mean()) * 100.0
    per_class = {n: round(float((top[y == i, 0] == i).float().mean()) * 100.0, 2)
                 for i, n in enumerate(names) if (y == i).any()}
    return {"task": "classify", "data": str(folder), "model": lm.spec, "classes": len(names),
            "images": len(paths), "templates": list(temps), "ensemble_mean": mean,
            "top1": top1, f"top{k5}": top5,
            "per_class_top1": per_class}


# --------------------------------------------------------------------------- #
# RemoteCount.
# --------------------------------------------------------------------------- #
def _whole(value: Any) -> int:
    """A count as written: 3, "3" or 3.0; not 2.7, "2.7", true or null."""
    if isinstance(value, bool) or value is None:
        raise TypeError(value)
    f = float(value)
    if f != int(f):
        raise ValueError(value)
    return int(f)


def read_count_data(path: str, images: Optional[str] = None) -> List[Tuple[str, str, int]]:
    """(image path, object name, count) rows from a CSV with ``image,object,count`` columns
    (or a JSON list of such objects); paths relative to ``images`` or the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"count data {p} does not exist", "give a CSV with image,object,count columns")
    root = Path(images) if images else p.parent
    if p.suffix.lower() == ".json":
        try:
            raw = json.loads(_read_text(p))
        except ValueError as exc:
            raise UsageError(f"{p} is not JSON ({exc})", "a list of {image, object, count} objects") from None
        if not isinstance(raw, list):
            raise UsageError(f"{p} is a JSON {type(raw).__name__}, not a list of rows",
                             "a list of {image, object, count} objects")
    else:
        raw = _csv_records(p)[1]
    rows = []
    lo, hi = COUNT_RANGE[0], COUNT_RANGE[-1]
    for k, r in enumerate(raw, start=1 if p.suffix.lower() == ".json" else 2):
        where = f"{p.name}: {'row' if p.suffix.lower() == '.json' else 'line'} {k}"
        try:
            img, obj, n = str(r["image"]), str(r["object"]).strip(), _whole(r["count"])
        except (KeyError, ValueError, TypeError, OverflowError):
            raise UsageError(f"{where} ({r!r:.80}) lacks image, object or an integer count",
                             "columns: image,object,count") from None
        if not lo <= n <= hi:
            raise UsageError(f"{where} ({img}, {obj}) has count {n}: RemoteCount counts are "
                             f"{lo} to {hi}", f"fix that row, or remove it (the model "
                             f"chooses among {lo}..{hi} objects)")
        full = root / img if not Path(img).is_absolute() else Path(img)
        if not full.is_file():
            raise UsageError(f"image {full} does not exist", "give the image folder with --images")
        rows.append((str(full), obj, n))
    if not rows:
        raise UsageError(f"{p} holds no rows", "columns: image,object,count")
    return rows


def eval_count(model, data: str, images: Optional[str] = None, batch_size: int = 64,
               progress=None, device=None, precision=None) -> Dict[str, Any]:
    """RemoteCount: top-1 accuracy (percent) and mean absolute error of the predicted counts."""
    import torch

    from .count import COUNT_RANGE, VARIANTS, argmax_count, count_captions  # deferred: a test replaces it at call time
    rows = read_count_data(data, images)
    lm = as_loaded(model, device, precision)  # after the data was read: bad data fails fast
    img = _embed_images(lm, [r[0] for r in rows], batch_size, progress)
    counts = list(COUNT_RANGE)
    text_by_obj = {}
    with torch.inference_mode():
        for obj in sorted({r[1] for r in rows}):
            caps = count_captions(obj, counts)
            text_by_obj[obj] = encode_prompts(lm, [c for v in VARIANTS for c in caps[v]], "raw")
    preds = []
    for e, (_, obj, _) in zip(img, rows):
        sims = (e[None] @ text_by_obj[obj].T).reshape(len(VARIANTS), len(counts)).cpu().numpy()
        preds.append(argmax_count(sims, counts)[0])
    truth = np.array([r[2] for r in rows])
    pred = np.array(preds)
    return {"task": "count", "data": str(data), "model": lm.spec, "images": len(rows),
            "top1": float((pred == truth).mean() * 100.0), "mae": float(np.abs(pred - truth).mean()),
            "predictions": [{"image": r[0], "object": r[1], "count": r[2], "predicted": int(q)}
                            for r, q in zip(rows, preds)]}
