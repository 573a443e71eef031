"""Captions for a place: the best captions of a bank (any CLIP), or generated text (CoCa).

A place is an extent (or a box) of a raster, read as one image at the
model's input size (engine.raster.reader resamples on read, so a large extent never
comes into memory at full resolution).

**Retrieval** (:func:`rank_captions`, every CLIP model): the captions of a
bank are encoded once (as written: the ``raw`` template by default) and
ranked by cosine similarity with the place's image embedding; the ``top``
best are returned with their cosine and their softmax share among the bank
(the model's logit scale). A bank is read by :func:`read_caption_bank`:

- a TXT: one caption a line, exactly as written (no quoting, no header);
- a CSV / TSV: the caption columns of a caption file (a header of column
  names such as ``caption``, ``caption_2``, ``text``, ``title``, ``sentence``,
  ``raw``, as Box-to-Caption and fine-tuning files have), else the first
  column of every row; a quote left open over a line break is refused;
- a JSON / JSONL caption dataset: RSICD / UCM / RSITMD's
  ``{"images": [{"sentences": [{"raw": ...}]}]}`` or JSONL records
  (engine.data.captions reads them; images need not exist).

Repeated captions are kept once (first spelling).

**Generation** (:func:`generate_captions`, open_clip CoCa models only): the
model's text decoder writes a caption from the image, by beam search or by
sampling (top-k / top-p), see :class:`engine.core.options.CaptionOptions`.
"""
from __future__ import annotations

import csv
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .core.errors import UsageError
from .core.options import CaptionOptions, check
from .core.jobs import Job
from .data.captions import IMAGE_KEYS, read_captions
from .model.scoring import encode_prompts, model_logit_scale
from .rasterjob import raster_job

if TYPE_CHECKING:
    from .model.models import LoadedModel

Extent = Tuple[float, float, float, float]
#: captions encoded per model call
TEXT_BATCH = 256


# --------------------------------------------------------------------------- #
# Banks.
# --------------------------------------------------------------------------- #
#: a header cell of a caption column: ``caption``, ``captions``, ``caption_2``, ``raw``, ...
_CAPTION_HEADER = re.compile(r"^(caption|text|title|sentence|raw)s?[ _-]?\d*$")


def _table_captions(p: Path, delimiter: str) -> List[str]:
    """The caption cells of a CSV / TSV bank: the caption columns under a header
    made of column names, else the first column of every row. A cell running over
    a line break is a quote never closed, and refused with its line."""
    rows = []
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        start = 1
        fix = "close the quote on its line, or name the bank .txt (one caption a line, no quoting)"
        try:
            for r in reader:
                if any("\n" in c or "\r" in c for c in r):
                    raise UsageError(f"caption bank {p}, line {start}: a quote opened there is "
                                     f"closed only on line {reader.line_num}, so the lines "
                                     "between would be one caption", fix)
                if any(c.strip() for c in r):
                    rows.append(r)
                start = reader.line_num + 1
        except csv.Error as exc:
            raise UsageError(f"caption bank {p}, line {start}: a quote is left open or "
                             f"misplaced ({exc})", fix) from None
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0]]
    cols = [i for i, h in enumerate(head) if _CAPTION_HEADER.match(h)]
    if cols:
        body = rows[1:]
    elif len(head) >= 2 and any(k in head for k in IMAGE_KEYS):
        raise UsageError(f"caption bank {p} has no caption column",
                         "name the caption column 'caption' (or text, title)")
    else:
        cols, body = [0], rows
    return [r[i] for r in body for i in cols if i < len(r)]


def read_caption_bank(path: Union[str, Path]) -> List[str]:
    """The unique captions of a caption bank file (see the module doc); UsageError
    when the file is missing, unreadable or holds no caption."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"caption bank {p} does not exist", "check the --bank path")
    suffix = p.suffix.lower()
    captions: List[str] = []
    try:
        if suffix in (".json", ".jsonl", ".ndjson"):
            cs = read_captions(p, check_exists=False)
            for item in cs.items:
                captions.extend(item.captions)
        elif suffix == ".txt":
            # one caption a line, as written: no quoting, no header
            captions.extend(p.read_text(encoding="utf-8-sig").splitlines())
        elif suffix in (".csv", ".tsv"):
            captions.extend(_table_captions(p, "," if suffix == ".csv" else "\t"))
        else:
            raise UsageError(f"unknown caption bank type {suffix or '(none)'} ({p})",
                             "use a .csv/.tsv/.txt (one caption a line, or a caption column) "
                             "or a .json/.jsonl caption dataset (RSICD layout)")
    except UnicodeDecodeError as exc:
        raise UsageError(f"caption bank {p} is not UTF-8 text ({exc.reason})",
                         "save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"cannot read caption bank {p} ({exc.strerror or exc})",
                         "check the file and its permissions") from None
    seen, out = set(), []
    for c in captions:
        c = " ".join(str(c).split())
        if c and c.lower() not in seen:
            seen.add(c.lower())
            out.append(c)
    if not out:
        raise UsageError(f"caption bank {p} holds no captions",
                         "give a file with one caption a line, a caption column, or an RSICD-style "
                         "caption JSON")
    return out


@dataclass
class CaptionBank:
    """Captions and their normalised embeddings (float32, on the model's device)."""

    captions: List[str]
    text: Any
    logit_scale: float


def encode_bank(lm: LoadedModel, captions: Sequence[str], templates: Any = "raw",
                job=None) -> CaptionBank:
    """Encode ``captions`` in batches of :data:`TEXT_BATCH` (cancellable between them)."""
    import torch

    captions = list(captions)
    if not captions:
        raise UsageError("the caption bank is empty", "give a bank with at least one caption")
    chunks = []
    for i in range(0, len(captions), TEXT_BATCH):
        if job is not None:
            job.check()
        chunks.append(encode_prompts(lm, captions[i:i + TEXT_BATCH], templates))
    return CaptionBank(captions, torch.cat(chunks), model_logit_scale(lm))


# --------------------------------------------------------------------------- #
# Places.
# --------------------------------------------------------------------------- #
@dataclass
class Caption:
    text: str
    score: float          # retrieval: softmax share among the bank; generation: NaN
    cosine: float         # retrieval: cosine with the image; generation: NaN
    rank: int

    def to_json(self) -> Dict[str, Any]:
        return {"text": self.text, "rank": self.rank,
                "score": None if np.isnan(self.score) else round(self.score, 6),
                "cosine": None if np.isnan(self.cosine) else round(self.cosine, 6)}


@dataclass
class PlaceCaptions:
    bounds: Extent                      # raster CRS
    pixel: Tuple[int, int, int, int]    # col0, row0, col1, row1
    captions: List[Caption]

    @property
    def best(self) -> Optional[str]:
        return self.captions[0].text if self.captions else None

    def to_json(self) -> Dict[str, Any]:
        return {"bounds": list(self.bounds), "pixel": list(self.pixel), "caption": self.best,
                "captions": [c.to_json() for c in self.captions]}


@dataclass
class CaptionResult:
    places: List[PlaceCaptions]
    method: str                         # "retrieval" or "generation"
    model: str
    device: str
    precision: str
    crs: Optional[str]
    bank_size: int = 0
    seconds: float = 0.0
    warnings: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        return {"method": self.method, "model": self.model, "device": self.device,
                "precision": self.precision, "crs": self.crs, "bank_size": self.bank_size,
                "seconds": round(self.seconds, 4), "places": [p.to_json() for p in self.places],
                "warnings": list(self.warnings)}


def can_generate(lm: LoadedModel) -> bool:
    """True for open_clip captioning models (CoCa: a text decoder with ``generate``)."""
    return callable(getattr(lm.model, "generate", None)) and hasattr(lm.model, "text_decoder")


def read_places(reader, places: Sequence[Optional[Extent]], extent_crs: Optional[str],
                size: int) -> Tuple[np.ndarray, List[Tuple[Extent, Tuple[int, int, int, int]]]]:
    """uint8 (N, size, size, 3) images of places (None: the whole raster), resampled on read."""
    from .geo.extent import extent_to_window
    info = reader.info
    images, where = [], []
    for ext in places:
        win = extent_to_window(info, ext, extent_crs)
        rgb, _ = reader.read(win, out_shape=(size, size))
        images.append(rgb)
        where.append((win.bounds(info.transform),
                      (win.col, win.row, win.col_end, win.row_end)))
    return np.stack(images), where


def caption(raster: str, model: Union[str, LoadedModel], places: Sequence[Optional[Extent]] = (None,),
            extent_crs: Optional[str] = None, bank: Union[None, str, Sequence[str]] = None,
            options: Optional[CaptionOptions] = None, generate: Optional[bool] = None,
            progress=None, cancel=None) -> CaptionResult:
    """Describe each place (an extent in the raster's CRS, or ``extent_crs``; None: the whole
    raster) of ``raster``.

    With ``bank`` (a file path or a list of captions) the captions are ranked
    (retrieval). Without it, a CoCa model generates one caption per place;
    another model is refused (give a bank). ``generate=True`` asks for
    generation even with a bank (refused for non-CoCa models).
    """
    t0 = time.perf_counter()
    opts = check(options or CaptionOptions())
    places = list(places) or [None]
    job = Job(progress, cancel)
    texts = None
    if bank is not None:
        texts = read_caption_bank(bank) if isinstance(bank, (str, Path)) else \
            [" ".join(str(c).split()) for c in bank if str(c).strip()]
        if not texts:
            raise UsageError("the caption bank is empty", "give at least one caption")
    with raster_job(raster, model, options=opts, job=job) as rj:
        reader, info, lm, notes = rj.reader, rj.info, rj.lm, rj.notes
        from .geo.extent import extent_to_window
        for ext in places:  # a place outside the raster is refused before any work
            extent_to_window(info, ext, extent_crs)
        gen = can_generate(lm) if generate is None else bool(generate)
        if texts is not None and generate is None:
            gen = False
        if gen and not can_generate(lm):
            raise UsageError(f"{lm.spec} cannot write captions (it is not a CoCa captioning model)",
                             "give a caption bank (--bank) to rank captions, or a captioning (CoCa) "
                             "model such as demo-captioner or coca-vit-b-32")
        if not gen and texts is None:
            raise UsageError(f"no caption bank given, and {lm.spec} cannot generate captions",
                             "give a caption bank (--bank: a CSV, an RSICD-style JSON or "
                             "Box-to-Caption output), or a captioning (CoCa) model such as "
                             "demo-captioner or coca-vit-b-32")
        job.set_total(len(places))
        if gen:
            out = _generate(reader, lm, places, extent_crs, opts, job)
        else:
            cb = encode_bank(lm, texts, opts.templates, job)
            out = _retrieve(reader, lm, places, extent_crs, cb, opts, job)
    return CaptionResult(out, "generation" if gen else "retrieval", lm.spec, str(lm.device),
                         lm.precision, info.crs, bank_size=len(texts or ()),
                         seconds=time.perf_counter() - t0, warnings=notes)


def _batches(places, n):
    for i in range(0, len(places), n):
        yield places[i:i + n]


def _retrieve(reader, lm, places, extent_crs, cb: CaptionBank, opts: CaptionOptions, job):
    import torch

    from .model.encode import encode_images
    out: List[PlaceCaptions] = []
    top = min(int(opts.top), len(cb.captions))
    for part in _batches(places, int(opts.batch_size or 32)):
        job.check()
        images, where = read_places(reader, part, extent_crs, lm.image_size)
        emb = encode_images(lm, images)
        cos = emb @ cb.text.T
        probs = torch.softmax(cos * cb.logit_scale, dim=-1)
        val, idx = torch.topk(cos, top, dim=-1)
        for k, (bounds, pix) in enumerate(where):
            caps = [Caption(cb.captions[int(j)], float(probs[k, int(j)]), float(v), r + 1)
                    for r, (v, j) in enumerate(zip(val[k].tolist(), idx[k].tolist()))]
            out.append(PlaceCaptions(bounds, pix, caps))
        job.step(len(part))
    return out


def _generate(reader, lm, places, extent_crs, opts: CaptionOptions, job):
    out: List[PlaceCaptions] = []
    for part in _batches(places, int(opts.batch_size or 8)):
        job.check()
        images, where = read_places(reader, part, extent_crs, lm.image_size)
        texts = generate_captions(lm, images, opts)
        for (bounds, pix), text in zip(where, texts):
            out.append(PlaceCaptions(bounds, pix, [Caption(text, float("nan"), float("nan"), 1)]))
        job.step(len(part))
    return out


def generate_captions(lm: LoadedModel, images: np.ndarray, options: Optional[CaptionOptions] = None
                      ) -> List[str]:
    """Captions written by a CoCa model for uint8 images (B, H, W, 3)."""
    import torch
    from open_clip.tokenizer import decode

    from .model.encode import to_model_input
    opts = check(options or CaptionOptions())
    if not can_generate(lm):
        raise UsageError(f"{lm.spec} is not a CoCa captioning model", "use a CoCa model")
    x = to_model_input(lm, images)
    ctx = int(lm.model_cfg.get("text_cfg", {}).get("context_length", 77))
    max_len = max(2, min(int(opts.max_length), ctx - 2))
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(opts.seed))
        image_latent, image_embs = lm.model._encode_image(x)
        if opts.method == "beam_search":
            seqs = [_beam_search(lm.model, x[i:i + 1], image_latent[i:i + 1], image_embs[i:i + 1],
                                 int(opts.beams), max_len) for i in range(len(x))]
        else:
            seqs = _sample(lm.model, x, image_latent, image_embs, opts, max_len)
    out = []
    for row in seqs:
        ids = [int(t) for t in row if int(t) not in (SOT, EOT, 0)]
        out.append(" ".join(decode(torch.tensor(ids, dtype=torch.long)).split()).strip(" ."))
    return out


#: the CLIP tokenizer's start and end of text
SOT, EOT = 49406, 49407
#: generation: an end of text is allowed from this many tokens on
MIN_TOKENS = 2


def _next_logits(model, x, tokens, latent, embs):
    return model(x, tokens, image_latent=latent, image_embs=embs,
                 output_labels=False)["logits"][:, -1].float()


def _beam_search(model, x, latent, embs, beams: int, max_len: int) -> List[int]:
    """The most likely token sequence (log-probability per token) by beam search."""
    import torch
    seqs = torch.full((1, 1), SOT, dtype=torch.long, device=x.device)
    scores = torch.zeros(1, device=x.device)
    finished: List[Tuple[float, List[int]]] = []
    for step in range(max_len):
        n = len(seqs)
        logp = torch.log_softmax(_next_logits(model, x.expand(n, -1, -1, -1), seqs,
                                              latent.expand(n, -1), embs.expand(n, -1, -1)), dim=-1)
        if step < MIN_TOKENS:
            logp[:, EOT] = -float("inf")
        cand = (scores[:, None] + logp).reshape(-1)
        vals, idx = cand.topk(min(2 * beams, cand.numel()))
        keep_seqs, keep_scores = [], []
        for v, j in zip(vals.tolist(), idx.tolist()):
            b, t = divmod(j, logp.shape[1])
            seq = seqs[b].tolist() + [t]
            if t == EOT:
                finished.append((v / (len(seq) - 1), seq))
            else:
                keep_seqs.append(seq)
                keep_scores.append(v)
            if len(keep_seqs) == beams:
                break
        if len(finished) >= beams or not keep_seqs:
            break
        seqs = torch.tensor(keep_seqs, dtype=torch.long, device=x.device)
        scores = torch.tensor(keep_scores, device=x.device)
    if not finished:
        finished = [(float(s) / (len(q) - 1), q.tolist()) for s, q in zip(scores, seqs)]
    return max(finished, key=lambda f: f[0])[1]


def _sample(model, x, latent, embs, opts: CaptionOptions, max_len: int) -> List[List[int]]:
    """Token sequences sampled with temperature and top-k or top-p (nucleus) filtering."""
    import torch
    B = len(x)
    out = torch.full((B, 1), SOT, dtype=torch.long, device=x.device)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    for step in range(max_len):
        logits = _next_logits(model, x, out, latent, embs) / float(opts.temperature)
        # a non-finite logit is never drawn; a row with none left ends its caption
        logits = torch.nan_to_num(logits, nan=-float("inf"), posinf=-float("inf"))
        if step < MIN_TOKENS:
            logits[:, EOT] = -float("inf")
        dead = ~torch.isfinite(logits).any(dim=-1)
        logits[dead, EOT] = 0.0
        if opts.method == "top_k":
            k = min(int(opts.sample_top_k), logits.shape[1])
            kth = logits.topk(k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        else:
            sorted_l, order = logits.sort(dim=-1, descending=True)
            cum = torch.softmax(sorted_l, dim=-1).cumsum(dim=-1)
            drop = cum - torch.softmax(sorted_l, dim=-1) > float(opts.top_p)  # keep the first
            sorted_l = sorted_l.masked_fill(drop, -float("inf"))
            logits = torch.full_like(logits, -float("inf")).scatter(1, order, sorted_l)
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1)
        nxt[done] = EOT
        out = torch.cat([out, nxt], dim=1)
        done |= nxt[:, 0] == EOT
        if bool(done.all()):
            break
    return [row.tolist() for row in out]
