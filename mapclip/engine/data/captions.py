"""Readers for image-caption datasets, the input of fine-tuning.

Three layouts are read, chosen by the file's suffix:

- ``.csv`` / ``.tsv`` / ``.txt``: one row per (image, caption); a header is
  optional. With a header, the image column is the first named ``image``,
  ``filepath``, ``filename``, ``path``, ``file`` or ``img``; every column whose
  name starts with ``caption``, ``text``, ``title``, ``sentence`` or ``raw`` is
  a caption (so ``caption_1 .. caption_5`` in one row works), and a ``split``
  column is honoured, as is a ``label`` (or ``class``) column naming the image's
  scene class (fine-tuning's PIR recipe). Without a header: column 1 image,
  column 2 caption.
  ``.csv`` is comma-separated, ``.tsv``/``.txt`` tab-separated.
- ``.jsonl`` / ``.ndjson``: one object per line with an image key (as above)
  and ``caption``/``text``/``title`` (a string) or ``captions``/``sentences``
  (a list of strings or of ``{"raw": ...}``), optional ``split`` and
  ``label``/``class`` (all three JSON layouts).
- ``.json``: the RSICD / UCM / RSITMD (Karpathy) layout,
  ``{"images": [{"filename", "sentences": [{"raw"}], "split"}]}`` (an
  optional ``filepath`` is a sub-folder), or a JSON list of JSONL-style records.

Several rows naming the same image merge into one item with several captions.
Relative image paths resolve against ``image_root`` when given, else against
the caption file's own folder. Problems never stop the reading: a missing
image, an empty caption, an unreadable file are counted in a
:class:`SkipReport` (or raise :class:`UsageError` with ``strict=True``).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..core.errors import UsageError

IMAGE_KEYS = ("image", "filepath", "filename", "path", "file", "img", "image_path")
CAPTION_PREFIXES = ("caption", "text", "title", "sentence", "raw")
#: the column (key) naming an image's scene class (fine-tuning's PIR recipe)
LABEL_KEYS = ("label", "class")
CAPTION_LIST_KEYS = ("captions", "sentences", "texts")
SKIP_REASONS = ("missing_image", "unreadable_image", "empty_caption", "no_caption", "bad_record")
#: how many examples of skipped records a report keeps
MAX_EXAMPLES = 20


@dataclass
class CaptionItem:
    """One image with all of its captions (a training or evaluation unit)."""

    path: str
    captions: List[str]
    split: Optional[str] = None
    label: Optional[str] = None   # the scene class (a label/class column), if the data names one


@dataclass
class SkipReport:
    """What was skipped and why: counts per reason plus a few examples."""

    counts: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    examples: List[str] = field(default_factory=list)

    def add(self, reason: str, where: str, strict: bool = False) -> None:
        if strict:
            raise UsageError(f"bad data: {reason.replace('_', ' ')}: {where}",
                             "fix or remove that record, or run without --strict to skip "
                             "bad records")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{reason}: {where}")

    def merge(self, other: "SkipReport") -> None:
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.examples.extend(other.examples[:max(0, MAX_EXAMPLES - len(self.examples))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        parts = [f"{v} {k.replace('_', ' ')}" for k, v in self.counts.items() if v]
        return "nothing skipped" if not parts else "skipped: " + ", ".join(parts)

    def to_json(self) -> Dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": list(self.examples)}


@dataclass
class CaptionSet:
    """The items read from one or more caption files."""

    items: List[CaptionItem]
    skipped: SkipReport
    sources: List[str]

    @property
    def n_captions(self) -> int:
        return sum(len(i.captions) for i in self.items)


# --------------------------------------------------------------------------- #
# Reading.
# --------------------------------------------------------------------------- #
class _Collector:
    """Merges (image, caption) records into items, resolving and checking paths."""

    def __init__(self, base: Path, report: SkipReport, strict: bool, check_exists: bool):
        self.base = base
        self.report = report
        self.strict = strict
        self.check_exists = check_exists
        self.items: Dict[str, CaptionItem] = {}
        self.missing: set = set()

    def add(self, image: Any, captions: Iterable[Any], split: Any, where: str,
            label: Any = None) -> None:
        if not isinstance(image, str) or not image.strip():
            self.report.add("bad_record", f"{where}: no image path", self.strict)
            return
        path = Path(os.path.expanduser(image.strip()))
        if not path.is_absolute():
            path = self.base / path
        key = os.path.normpath(str(path))
        if key in self.missing:
            return
        if key not in self.items and self.check_exists and not os.path.isfile(key):
            self.missing.add(key)
            self.report.add("missing_image", f"{where}: {key}", self.strict)
            return
        texts = []
        for c in captions:
            text = c.get("raw") if isinstance(c, dict) else c
            if text is not None and not isinstance(text, str):   # a number, a list: not a caption
                self.report.add("bad_record", f"{where}: a caption is {type(text).__name__} "
                                f"{text!r:.40}, not text", self.strict)
                continue
            text = " ".join(text.split()) if text is not None else ""
            if text:
                texts.append(text)
            else:
                self.report.add("empty_caption", f"{where}: {image}", self.strict)
        item = self.items.get(key)
        if item is None:
            item = self.items[key] = CaptionItem(key, [], None)
        for t in texts:
            if t not in item.captions:
                item.captions.append(t)
        if split not in (None, "") and item.split is None:
            item.split = str(split).strip().lower()
        if label not in (None, "") and item.label is None:
            item.label = " ".join(str(label).split())

    def finish(self, where: str) -> List[CaptionItem]:
        out = []
        for item in self.items.values():
            if item.captions:
                out.append(item)
            else:
                self.report.add("no_caption", f"{where}: {item.path}", self.strict)
        return out


def _image_value(lower: Dict[str, Any]) -> Any:
    for key in IMAGE_KEYS:
        if key in lower:
            return lower[key]
    return None


def _label_value(lower: Dict[str, Any]) -> Any:
    return next((lower[k] for k in LABEL_KEYS if isinstance(lower.get(k), (str, int))), None)


def _record_fields(record: Dict[str, Any]) -> Tuple[Any, List[Any], Any]:
    """(image, captions, split) of one JSON/JSONL record."""
    lower = {str(k).lower(): v for k, v in record.items()}
    image = _image_value(lower)
    if lower.get("filepath") and lower.get("filename"):  # Karpathy: folder + name
        image = os.path.join(str(lower["filepath"]), str(lower["filename"]))
    captions: List[Any] = []
    for key in CAPTION_LIST_KEYS:
        val = lower.get(key)
        if isinstance(val, list):
            captions.extend(val)
        elif isinstance(val, str):
            captions.append(val)
    for key, val in lower.items():
        if key in IMAGE_KEYS or key in CAPTION_LIST_KEYS or key == "split":
            continue
        if key.startswith(CAPTION_PREFIXES) and (isinstance(val, str) or val is None):
            captions.append(val)
    return image, captions, lower.get("split")


def _read_delimited(path: Path, col: _Collector) -> None:
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh, delimiter=delimiter))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        return
    head = [c.strip().lower() for c in rows[0]]
    image_col = next((head.index(k) for k in IMAGE_KEYS if k in head), None)
    caption_cols = [i for i, h in enumerate(head) if h.startswith(CAPTION_PREFIXES)]
    if image_col is not None and caption_cols:
        split_col = head.index("split") if "split" in head else None
        label_col = next((head.index(k) for k in LABEL_KEYS if k in head), None)
        body, first_line = rows[1:], 2
    else:
        image_col, caption_cols, split_col, body, first_line = 0, [1], None, rows, 1
        label_col = None
    for n, row in enumerate(body, start=first_line):
        where = f"{path.name}:{n}"
        if len(row) <= max([image_col] + caption_cols[:1]):
            col.report.add("bad_record", f"{where}: expected image and caption columns", col.strict)
            continue
        caps = [row[i] if i < len(row) else "" for i in caption_cols]
        split = row[split_col] if split_col is not None and split_col < len(row) else None
        label = row[label_col] if label_col is not None and label_col < len(row) else None
        col.add(row[image_col], caps, split, where, label)


def _read_jsonl(path: Path, col: _Collector) -> None:
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                col.report.add("bad_record", f"{where}: not JSON ({exc})", col.strict)
                continue
            if not isinstance(record, dict):
                col.report.add("bad_record", f"{where}: not a JSON object", col.strict)
                continue
            image, caps, split = _record_fields(record)
            col.add(image, caps, split, where, _label_value({str(k).lower(): v
                                                             for k, v in record.items()}))


def _read_json(path: Path, col: _Collector) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc})",
                         "use the RSICD/UCM/RSITMD caption JSON layout, JSONL, CSV or TSV") from None
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        records = data["images"]
    elif isinstance(data, list):
        records = data
    else:
        raise UsageError(f"{path} holds no 'images' list",
                         "the caption JSON layout is {\"images\": [{\"filename\": ..., "
                         "\"sentences\": [{\"raw\": ...}], \"split\": ...}]}")
    for n, record in enumerate(records):
        where = f"{path.name}:images[{n}]"
        if not isinstance(record, dict):
            col.report.add("bad_record", f"{where}: not an object", col.strict)
            continue
        image, caps, split = _record_fields(record)
        col.add(image, caps, split, where, _label_value({str(k).lower(): v
                                                         for k, v in record.items()}))


READERS = {".csv": _read_delimited, ".tsv": _read_delimited, ".txt": _read_delimited,
           ".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json}


def read_captions(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                  image_root: Optional[Union[str, os.PathLike]] = None, strict: bool = False,
                  check_exists: bool = True) -> CaptionSet:
    """Read one or more caption files into items (image + captions + split).

    Missing images, empty captions and malformed records are skipped and
    counted (``strict=True``: the first one raises :class:`UsageError`).
    Images are checked for existence only; :func:`check_images` decodes them.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise UsageError("no caption file given", "pass --data with a CSV, TSV, JSONL or JSON file")
    report = SkipReport()
    items: Dict[str, CaptionItem] = {}
    sources = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise UsageError(f"caption file {path} does not exist", "check the --data path")
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise UsageError(f"unknown caption file type {path.suffix!r} ({path})",
                             "use .csv, .tsv, .jsonl or .json (RSICD/UCM/RSITMD layout)")
        base = Path(image_root).expanduser() if image_root else path.resolve().parent
        col = _Collector(base, report, strict, check_exists)
        try:
            reader(path, col)
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path} is not UTF-8 text ({exc.reason})",
                             "save the caption file as UTF-8") from None
        for item in col.finish(path.name):
            if item.path in items:  # same image in two files: merge captions
                have = items[item.path]
                have.captions.extend(c for c in item.captions if c not in have.captions)
                have.split = have.split or item.split
                have.label = have.label or item.label
            else:
                items[item.path] = item
        sources.append(str(path))
    return CaptionSet(list(items.values()), report, sources)


def check_images(items: Sequence[CaptionItem], report: SkipReport, strict: bool = False,
                 job=None) -> List[CaptionItem]:
    """Keep the items whose image PIL can open and decode; count the others.

    Decoding everything up front is what keeps a bad file from surfacing in
    the middle of an epoch (it would change the batches, and resuming exactly
    would then be impossible).
    """
    from PIL import Image
    keep = []
    for n, item in enumerate(items):
        try:
            with Image.open(item.path) as im:
                im.load()
                if im.width < 1 or im.height < 1:
                    raise OSError("empty image")
            keep.append(item)
        except FileNotFoundError:
            report.add("missing_image", item.path, strict)
        except Exception as exc:  # PIL raises many types for broken files
            report.add("unreadable_image", f"{item.path} ({type(exc).__name__})", strict)
        if job is not None and (n + 1) % 64 == 0:
            job.check()
    return keep


def file_digest(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file's bytes (hex); OSError when it cannot be read."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def caption_files_digest(paths: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """SHA-256 of each caption file's bytes, in order: what a run was trained on,
    so that resuming it after a caption file changed is refused rather than
    silently continued on other data."""
    out = []
    for p in paths:
        try:
            out.append(file_digest(p))
        except OSError:
            out.append(None)
    return out

