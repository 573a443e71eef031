"""Marks as training data: a file of marked places (engine.data.examples) and the raster
they were made on become image-caption pairs for fine-tuning.

Each mark's chip is the window of the raster centred on it, ``chip_px`` native pixels a
side (default: the model's search window, tile size x window). A "Yes, like this" mark is
captioned by its ``caption`` field, else its ``prompt`` field (the search it was made in:
the dock writes it), else ``options.marks_caption``; a "Not this" mark is a pair only when
the user typed what it is (``caption``): then it is a hard negative for the other captions
of its batch; otherwise it is left out. The pairs land in ``RUN_DIR/marks/`` (PNG chips
and ``captions.csv``), written the same way on every run so that a resumed run sees the
same data (its digests are part of the run's fingerprint).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..core.errors import UsageError
from ..core.options import FinetuneOptions
from ..data.examples import is_marks_file
from ..data.examples import read_examples
from ..geo.tiling import PixelWindow
from ..model.presets import model_defaults

#: the folder of the run that holds the pairs made from marks
MARKS_DIR = "marks"


def pairs_from_marks(data: List[str], o: FinetuneOptions, run_dir: Path) -> Tuple[List[str], Dict[str, int]]:
    """``data`` with every marks file replaced by the caption file of its pairs (written
    into ``run_dir/marks``), and what was made: positives, negatives kept, left out."""
    files = [d for d in data if is_marks_file(d)]
    if not files:
        return data, {}
    if not o.raster:
        raise UsageError(f"{files[0]} is a file of marked places: its chips are cut from the "
                         "raster the marks were made on", "give that raster with --raster",
                         option="raster")
    folder = run_dir / MARKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    out, made = [], {"positive": 0, "negative": 0, "left_out": 0, "outside": 0}
    for i, path in enumerate(files):
        examples, crs = read_examples(path)
        rows = _chips(examples, crs, o, folder, f"m{i}", made)
        if not rows:
            raise UsageError(f"no mark in {path} gives a training pair (marks inside the raster: "
                             "a 'like this' with a prompt, or a 'not this' with a caption)",
                             "add 'like this' marks, or give --marks-caption for those without a "
                             "prompt", option="raster")
        csv_path = folder / f"captions_{i}.csv"
        _write_csv(csv_path, rows)
        out.append(str(csv_path.resolve()))
    return [d for d in data if not is_marks_file(d)] + out, made


def _caption(e, o: FinetuneOptions) -> Optional[str]:
    if e.caption:
        return e.caption
    if not e.positive:
        return None                      # "not this" without words: left out
    return e.prompt or o.marks_caption


def _chips(examples, crs, o: FinetuneOptions, folder: Path, tag: str,
           made: Dict[str, int]) -> List[Tuple[str, str]]:
    from PIL import Image

    from ..geo.extent import places_to_pixels
    from ..raster.sources import open_job_raster
    rows: List[Tuple[str, str]] = []
    with open_job_raster(o.raster) as reader:
        info = reader.info
        pixels = places_to_pixels(info, [e.x for e in examples], [e.y for e in examples], crs)
        size = int(o.marks_chip_px or _model_window(o.model))
        for k, ((c, r), e) in enumerate(zip(pixels, examples)):
            caption = _caption(e, o)
            if caption is None:
                made["left_out"] += 1
                continue
            if not (0 <= c < info.width and 0 <= r < info.height):
                made["outside"] += 1
                continue
            c0 = int(np.clip(round(c - size / 2), 0, max(info.width - size, 0)))
            r0 = int(np.clip(round(r - size / 2), 0, max(info.height - size, 0)))
            win = PixelWindow(c0, r0, min(size, info.width - c0), min(size, info.height - r0))
            rgb, _ = reader.read(win)
            name = f"{tag}_{k:05d}.png"
            Image.fromarray(np.ascontiguousarray(rgb)).save(folder / name)
            rows.append((name, caption))
            made["positive" if e.positive else "negative"] += 1
    return rows


def _model_window(spec: str) -> int:
    """The model's search window in pixels (tile size x window), as the dock describes a place."""
    from ..core.options import GENERIC_DEFAULTS  # deferred: a test replaces it at call time
    d = model_defaults(str(spec)).over(GENERIC_DEFAULTS)
    return int(d.tile_px) * int(d.window)


def _write_csv(path: Path, rows: List[Tuple[str, str]]) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    os.replace(tmp, path)
