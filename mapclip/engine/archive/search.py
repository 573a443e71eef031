"""Searching an index by text, by an example image or by a place: the query
vector, the ranking (exact up to :data:`approx.APPROX_MIN_ROWS` rows, then
approximate with exact re-ranking), the hits and their vector file.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union
import numpy as np
from ..core.errors import UsageError
from ..core.jobs import Job
from ..core.options import SearchOptions, check
from ..core.outputs import HIT_FIELDS, hit_query, hit_rows, output_crs, same_crs, vector_driver, write_vector
from . import ann, approx
from .shards import top_rows
from .store import Hit, Index, open_index
from ..core.jobs import check_outputs
from ..model.models import LoadedModel, load_model
from ..model.scoring import AFFINITY_WEIGHT, example_affinity, prompt_key, refine_query
from ..model.scoring import encode_prompts


@dataclass
class SearchResult:
    hits: List[Hit]
    query: Dict[str, Any]
    method: str
    rows: int
    seconds: float
    model: str
    params: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"query": self.query, "method": self.method, "rows": self.rows,
                "seconds": round(self.seconds, 4), "model": self.model, "params": self.params,
                "hits": [h.to_json() for h in self.hits]}


def _encode_query_image(lm, p: Path) -> np.ndarray:
    """The embedding of a query image file: an ordinary picture through PIL, and
    anything PIL cannot decode (a float32 or 16-bit GeoTIFF, JPEG2000, ...)
    through the raster reader, stretched to 8 bit like the tiles of an index."""
    from PIL import Image, UnidentifiedImageError

    from ..model.encode import encode_image_files, encode_images
    try:
        with Image.open(p) as im:
            im.convert("RGB").load()
        return encode_image_files(lm, [str(p)])[0].cpu().numpy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        pass
    from ..raster.reader import open_raster
    try:
        with open_raster(str(p)) as reader:
            rgb, _ = reader.read(reader.info.window, out_shape=(lm.image_size, lm.image_size))
    except UsageError:
        raise UsageError(f"cannot read image {p} as a query: it is neither a picture (PNG, "
                         "JPEG, 8-bit TIFF) nor a raster GDAL can open",
                         "give an image file, or a raster GDAL can open (check it with "
                         "gdalinfo FILE)") from None
    return encode_images(lm, rgb[None])[0].cpu().numpy()


# --------------------------------------------------------------------------- #
# Queries.
# --------------------------------------------------------------------------- #
def _load_query_model(index: Index, model, options: SearchOptions):
    if isinstance(model, LoadedModel):
        lm = model
    else:
        lm = load_model(model or index.model.get("spec"), device=options.device,
                        precision=options.precision)
    index.check_model(lm)
    return lm


def _parse_point(like) -> Tuple[float, float]:
    if isinstance(like, str):
        parts = like.replace(";", ",").split(",")
        try:
            x, y = (float(v) for v in parts)
        except ValueError:
            raise UsageError(f"--like {like!r} is not a point X,Y", "write it as X,Y, e.g. 512300.5,4403120") from None
        return x, y
    try:
        x, y = like
        return float(x), float(y)
    except (TypeError, ValueError):
        raise UsageError(f"--like {like!r} is not a point (x, y)", "pass two numbers") from None


def locate(index: Index, point, crs: Optional[str] = None) -> int:
    """Row of the stored tile containing ``point`` (x, y in ``crs``).

    ``crs`` defaults to the CRS the index's rasters share (UsageError if they
    differ). Among several tiles containing the point (overlap, scales) the one
    whose centre is nearest wins, the smaller tile on ties.
    """
    index.require_rows()
    x, y = _parse_point(point)
    if crs is not None:
        import rasterio
        from rasterio.crs import CRS
        try:
            with rasterio.Env():   # GDAL's messages go to logging, not stray "ERROR 1:" lines
                CRS.from_user_input(crs)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the user's CRS
            raise UsageError(f"unknown CRS {crs!r} for the point ({exc})",
                             "give it as EPSG:N, e.g. --crs EPSG:4326 for lon,lat") from None
    tiles = index.tiles()
    crss = {r.get("crs") or "" for r in index.rasters.values()}
    if crs is None:
        if len(crss) > 1 and any(not same_crs(a, b) for a in crss for b in crss):
            raise UsageError("the index holds rasters in several CRS, so the point's CRS is ambiguous",
                             "pass --crs EPSG:N (e.g. --crs EPSG:4326 for lon,lat)")
    best = None
    for rid, r in index.rasters.items():
        sel = np.flatnonzero(tiles["raster"] == rid)
        if sel.size == 0:
            continue
        rcrs = r.get("crs")
        px, py = x, y
        if crs is not None and not same_crs(crs, rcrs):
            if not rcrs:
                continue
            import rasterio
            from rasterio.warp import transform
            try:
                with rasterio.Env():
                    xs, ys = transform(crs, rcrs, [x], [y])
            except Exception as exc:
                raise UsageError(f"cannot transform the point from {crs} ({exc})",
                                 "pass --crs as EPSG:N") from None
            px, py = float(xs[0]), float(ys[0])
        t = tiles[sel]
        inside = (t["xmin"] <= px) & (px <= t["xmax"]) & (t["ymin"] <= py) & (py <= t["ymax"])
        if not inside.any():
            continue
        cand = sel[inside]
        t = tiles[cand]
        cx, cy = (t["xmin"] + t["xmax"]) / 2, (t["ymin"] + t["ymax"]) / 2
        w = np.maximum(t["xmax"] - t["xmin"], 1e-12)
        dist = np.hypot((cx - px) / w, (cy - py) / w)
        order = np.lexsort((t["tile_px"], dist))
        row, d = int(cand[order[0]]), float(dist[order[0]])
        if best is None or d < best[1]:
            best = (row, d)
    if best is None:
        where = f" ({crs})" if crs else ""
        raise UsageError(f"the point {x:g},{y:g}{where} lies outside every indexed tile",
                         "pick a location inside an indexed raster, and give --crs if the point "
                         "is not in the rasters' CRS")
    return best[0]


def query_vector(index: Index, text: Optional[str] = None, image: Optional[str] = None,
                 like=None, like_crs: Optional[str] = None, model=None,
                 options: Optional[SearchOptions] = None, examples: bool = False
                 ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Dict[str, Any]]:
    """(score vector, cosine vector, query facts) for exactly one of text/image/like
    (or none of them when ``examples`` will give the query: then (None, None, {})).

    The score vector folds in the negative prompts: ``q - w * mean(neg)``.
    """
    options = check(options or SearchOptions())
    given = [k for k, v in (("text", text), ("image", image), ("like", like)) if v is not None]
    if not given and examples and not options.negative:
        return None, None, {}
    if len(given) != 1:
        raise UsageError("give exactly one query: --text, --image or --like (or marked places: "
                         "--examples, several --like, --unlike)",
                         f"got {', '.join(given) if given else 'none'}")
    negatives = [str(n).strip() for n in options.negative or ()]
    if any(not n for n in negatives):
        raise UsageError("empty negative prompt", "give --negative a non-empty text")
    same = [n for n in negatives if text is not None and prompt_key(n) == prompt_key(text)]
    if same:
        raise UsageError(f"the negative prompt {same[0]!r} is the query text itself: it would "
                         "cancel the query and rank the tiles by noise",
                         "give --negative a text that differs from --text", option="negative")
    lm = None
    if text is not None:
        if not str(text).strip():
            raise UsageError("empty query text", "give --text a non-empty description, e.g. --text quarry")
        lm = _load_query_model(index, model, options)
        q = encode_prompts(lm, [str(text).strip()], getattr(options, "templates", None))[0].cpu().numpy()
        facts = {"text": str(text).strip()}
    elif image is not None:
        p = Path(str(image))
        if p.is_dir():
            raise UsageError(f"query image {p} is a folder, not an image file",
                             "give one image file (PNG, JPEG, TIFF or any raster GDAL reads)")
        if not p.is_file():
            raise UsageError(f"query image {p} does not exist", "check the path")
        lm = _load_query_model(index, model, options)
        q = _encode_query_image(lm, p)
        facts = {"image": str(p)}
    else:
        row = locate(index, like, like_crs)
        q = index.vectors([row])[0]
        q /= max(float(np.linalg.norm(q)), 1e-12)
        facts = {"like": list(_parse_point(like)), "crs": like_crs, "row": row}
    q = np.asarray(q, np.float32)
    score_q = q
    if negatives:
        lm = lm or _load_query_model(index, model, options)
        neg = encode_prompts(lm, negatives, getattr(options, "templates", None)).cpu().numpy().astype(np.float32)
        score_q = q - float(options.negative_weight) * neg.mean(axis=0)
        facts["negative"] = negatives
        facts["negative_weight"] = float(options.negative_weight)
    return score_q.astype(np.float32), q, facts


def ranked_rows(index: Index, score_q: np.ndarray, k: int, method: str = "auto"
                ) -> Tuple[np.ndarray, np.ndarray, str, Dict[str, Any]]:
    """(rows, scores, method used, parameters) of the top ``k`` rows for ``score_q``."""
    index.require_rows()
    if k < 1:
        raise UsageError(f"top-k must be at least 1, got {k}", "pass --top-k 1 or more")
    if method not in ("auto", "exact", "approx"):
        raise UsageError(f"unknown search method {method!r}", "use auto, exact or approx")
    n = index.rows
    use = method if method != "auto" else ("approx" if n >= approx.APPROX_MIN_ROWS else "exact")
    params: Dict[str, Any] = {"threshold_rows": approx.APPROX_MIN_ROWS}
    if use == "approx" and n < approx.APPROX_MIN_TRAIN:
        use = "exact"
        params["note"] = f"approximate search needs {approx.APPROX_MIN_TRAIN} rows or more; searched exactly"
    if use == "exact":
        rows, scores = index.exact_top(score_q, k)
        return rows, scores, "exact", params
    if ann.use_ivf(n):        # IVF-PQ: codes in memory, vectors read from the shards
        rows, scores, more = ann.ranked_rows(index, score_q, k)
        return rows, scores, "approx", dict(params, **more)
    fi = index.approx()
    kc = approx.approx_candidates(k, n)
    _, cand = fi.search(np.asarray(score_q, np.float32)[None], kc)
    cand = cand[0]
    cand = cand[cand >= 0]
    exact = index.rerank(cand, score_q)
    top = top_rows(exact, k)
    return cand[top], exact[top], "approx", {
        "threshold_rows": approx.APPROX_MIN_ROWS, "faiss": approx.approx_factory(index.embed_dim),
        "candidates": int(kc)}


def search(index: Union[str, os.PathLike, Index], text: Optional[str] = None,
           image: Optional[str] = None, like=None, like_crs: Optional[str] = None,
           model=None, options: Optional[SearchOptions] = None,
           progress=None, cancel=None, examples=None, examples_crs: Optional[str] = None
           ) -> SearchResult:
    """Rank the index's tiles for one query (text, image file, or a location).

    ``model``: a spec or LoadedModel for text/image queries (default: the
    index's own model); refused when it embeds into another space. A
    location query (``like``, x,y in ``like_crs``) needs no model: the stored
    embedding of the tile containing the point is the query.

    ``examples`` (engine.data.examples.Example, in ``examples_crs`` unless one names its
    own): places marked "like this" / "not this"; the stored embedding of the tile at each
    refines the ranking by ``options.examples_method`` (:func:`refine_by_examples`). With
    no text, image or location the examples alone are the query ("more like these").
    """
    t0 = time.perf_counter()
    options = check(options or SearchOptions())
    job = Job(progress, cancel, total=2)
    idx = open_index(index)
    idx.require_rows()
    score_q, q, facts = query_vector(idx, text, image, like, like_crs, model, options,
                                     examples=bool(examples))
    job.step()
    k = int(options.top_k)
    if examples:
        rows, scores, cos, method, params, more = refine_by_examples(
            idx, score_q, q, examples, examples_crs, options)
        facts["examples"] = more
    else:
        rows, scores, method, params = ranked_rows(idx, score_q, k, options.method)
        cos = idx.rerank(rows, q) if len(rows) else np.zeros(0, np.float32)
    hits = [idx.hit(i + 1, int(r), float(s), float(c)) for i, (r, s, c) in enumerate(zip(rows, scores, cos))]
    job.step()
    return SearchResult(hits=hits, query=facts, method=method, rows=idx.rows,
                        seconds=time.perf_counter() - t0, model=str(idx.model.get("spec")),
                        params=params)


#: affinity over an index: candidates from the query moved by Rocchio, this many per hit
#: asked (every row below the approximate-search threshold), then re-scored exactly
AFFINITY_CANDIDATES = 50


def example_rows(index: Index, examples, crs: Optional[str]) -> Tuple[List[int], List[int], int]:
    """(rows of the positives, rows of the negatives, places outside every tile)."""
    pos: List[int] = []
    neg: List[int] = []
    outside = 0
    for e in examples:
        try:
            own = getattr(e, "crs", None)          # "": the rasters' own CRS
            row = locate(index, (e.x, e.y), crs if own is None else (own or None))
        except UsageError as exc:
            if "outside every indexed tile" not in exc.message:
                raise
            outside += 1
            continue
        (pos if e.positive else neg).append(row)
    if not pos and not neg:
        raise UsageError(f"none of the {len(examples)} marked places lies on an indexed tile",
                         "mark places inside the indexed rasters (give --crs if the points are "
                         "not in the rasters' CRS)", option="examples")
    return pos, neg, outside


def refine_by_examples(index: Index, score_q: Optional[np.ndarray], q: Optional[np.ndarray],
                       examples, crs: Optional[str], options: SearchOptions):
    """The ranking refined by marked places: (rows, scores, cosines, method, params, facts).

    ``rocchio`` / ``probe`` move the query (engine.model.scoring.refine_query) and search
    with it as usual. ``affinity`` blends each tile's cosine ``c`` to the query with its
    likeness ``a`` to the marks (engine.model.scoring.example_affinity) as ``(c + w a) / (1 + w)``,
    over the candidates of the Rocchio-moved query. Without a query the mean of the
    positives is the start. Cosines are to the query (the moved one without a query)."""
    import torch

    pos, neg, outside = example_rows(index, examples, crs)
    if score_q is None and not pos:
        raise UsageError("marked places alone need at least one 'like this'",
                         "mark a place you mean (label 1, or --like X,Y), or add --text",
                         option="examples")

    def unit(rows):
        v = index.vectors(rows) if rows else np.zeros((0, index.embed_dim), np.float32)
        return torch.as_tensor(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))

    P, N = unit(pos), unit(neg)
    start = None if score_q is None else torch.as_tensor(np.asarray(score_q, np.float32))
    method = options.examples_method
    moved = refine_query(start, P if len(P) else None, N if len(N) else None,
                         "rocchio" if method == "affinity" else method).numpy().astype(np.float32)
    k = int(options.top_k)
    facts = {"positive": len(pos), "negative": len(neg), "outside": outside, "method": method}
    if method != "affinity":
        rows, scores, used, params = ranked_rows(index, moved, k, options.method)
        cos = index.rerank(rows, q if q is not None else moved) if len(rows) else np.zeros(0, np.float32)
        return rows, scores, cos, used, params, facts
    n_cand = index.rows if index.rows < approx.APPROX_MIN_ROWS else min(index.rows, AFFINITY_CANDIDATES * k)
    cand, _, used, params = ranked_rows(index, moved, n_cand, options.method)
    base = np.asarray(score_q if score_q is not None else moved, np.float32)
    vec = index.vectors(cand)
    vec = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
    a = example_affinity(torch.as_tensor(vec), P if len(P) else None, N if len(N) else None).numpy()
    scores = (vec @ base + AFFINITY_WEIGHT * a) / (1 + AFFINITY_WEIGHT)
    top = top_rows(scores, k)
    rows = cand[top]
    cos = vec[top] @ np.asarray(q if q is not None else moved, np.float32)
    return rows, scores[top].astype(np.float32), cos, used, dict(params, candidates=int(len(cand))), facts


def search_index(index, text: Optional[str] = None, image: Optional[str] = None, like=None,
                 like_crs: Optional[str] = None, model=None, options: Optional[SearchOptions] = None,
                 progress=None, cancel=None, examples=None, examples_crs: Optional[str] = None) -> List[Hit]:
    """The ranked hits of :func:`search` (the shared-interface entry point)."""
    return search(index, text, image, like, like_crs, model, options, progress, cancel,
                  examples=examples, examples_crs=examples_crs).hits


# --------------------------------------------------------------------------- #
# Writing hits.
# --------------------------------------------------------------------------- #
def write_hits(result: SearchResult, path: Union[str, os.PathLike], overwrite: bool = False) -> Path:
    """Write hits as footprint polygons (.gpkg or .geojson), atomically.

    CRS: the one the hits' rasters share (exact native footprints), else
    WGS84 (EPSG:4326) from the stored lon/lat bounds. Fields: engine.core.outputs.HIT_FIELDS.
    """
    vector_driver(path, "hits")
    from ..raster.reader import raster_files
    inputs = [("--image", result.query.get("image"))]
    inputs += [("indexed raster", f) for r in sorted({h.raster for h in result.hits})
               for f in raster_files(r)]
    check_outputs([("--out", path)], inputs, overwrite=overwrite)   # never over an input
    crs = output_crs(h.crs for h in result.hits)
    rows, bounds = hit_rows(result.hits, result.model, hit_query(result.query), crs)
    return write_vector(path, HIT_FIELDS, rows, bounds, crs, "hits", overwrite, what="hits")
