"""Every option of the engine, its default, its valid values and its meaning: once.

This module needs only the standard library, so any front end (the CLI, the
QGIS dock, the Processing provider) can build, show and check options even
when torch, open_clip or rasterio are missing.

Front ends change options with :func:`dataclasses.replace` and never hold a
copy of a default. Options whose best value depends on the model (tile size,
window, batch size, top-k, threshold) default to ``None``, meaning "the
model's default": :func:`with_model_defaults` fills them from the model's
:class:`ModelDefaults` (data on its preset, or in its model folder), then from
:data:`GENERIC_DEFAULTS`. The engine calls it on entry, so the CLI, the dock and
Processing give the same result for the same model.

:func:`check` validates an options value before any work; its errors name
the option (``MapClipError.option``) so each front end can word the fix in
its own terms (``--tile`` on the command line, "Tile size" in the dock).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeVar

from .errors import UsageError

# --------------------------------------------------------------------------- #
# Choices.
# --------------------------------------------------------------------------- #
#: detect: window (K x K tiles per window, the thesis method) or dense (patch-level)
MODES = ("window", "dense")
#: detect, window mode: keep the best window per object, or grow it to the union of its neighbours
MERGES = ("nms", "union")
#: dense mode: the changed last ViT block (mapclip/engine/model/dense.py): ClearCLIP, SCLIP's
#: attention without residual, SegEarth-OV's q+k+v, SCLIP as published, k-k, v-v
ATTENTION_MODES = ("clearclip", "sclip-style", "segearth", "sclip", "kk", "vv")
#: the names these modes had before (still accepted)
ATTENTION_ALIASES = {"qq": "clearclip", "qq+kk": "sclip-style", "qq+kk+vv": "segearth"}
DEFAULT_ATTENTION = "clearclip"


def canonical_attention(mode: str) -> str:
    """The mode's name in ATTENTION_MODES (old names mapped); ValueError if unknown."""
    name = ATTENTION_ALIASES.get(str(mode).strip().lower(), str(mode).strip().lower())
    if name not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {', '.join(ATTENTION_MODES)}")
    return name
#: dense mode: SegEarth-OV's class-token weight (its ``cls_token_lambda``: score = cos(patch, t)
#: + lambda cos(cls, t)) where a mode is named after a reference that sets one; else 0
DEFAULT_CLS_TOKEN_LAMBDA = {"segearth": -0.3}


#: the front ends' help for the class-token weight
CLS_TOKEN_LAMBDA_HELP = ("dense mode: SegEarth-OV's class-token weight L (its cls_token_lambda): a patch "
                         "scores cos(patch, prompt) + L cos(class token, prompt); default: the "
                         "attention mode's (" + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_CLS_TOKEN_LAMBDA.items())
                         + " as in SegEarth-OV's configs; 0 for the others)")


def cls_token_lambda_for(attention: str, value: Optional[float] = None) -> float:
    """The class-token weight a dense pass uses: ``value``, or (None) the mode's default."""
    if value is not None:
        return float(value)
    return float(DEFAULT_CLS_TOKEN_LAMBDA.get(ATTENTION_ALIASES.get(attention, attention), 0.0))
#: eval retrieval: the order of images (and so of each image's captions), which decides ties:
#: "name" sorts images by file name, as RemoteCLIP's retrieval.py does; "data" keeps the file's order
RETRIEVAL_ORDERS = ("name", "data")
DEFAULT_RETRIEVAL_ORDER = "name"
#: dense mode's default threshold on the softmax score
DENSE_THRESHOLD = 0.5
#: count methods
COUNT_METHODS = ("prompt", "dense", "both")
#: index search methods
SEARCH_METHODS = ("auto", "exact", "approx")
#: fine-tuning: which tower stays frozen
FREEZE = ("none", "text", "vision")
#: fine-tuning recipes: RemoteCLIP's symmetric InfoNCE, or PIR (PIR-CLIP: a scene prior
#: instructs the image tower; InfoNCE plus the cluster-wise affiliation loss)
RECIPES = ("clip", "pir")
#: where recipe pir reads each image's scene class: a label/class column of the caption file,
#: or the file name's part before the first "_" (PIR-CLIP's code: RSITMD's airport_12.tif)
PIR_LABELS = ("column", "filename")
#: the weight decay each recipe uses when none is given (PIR-CLIP's README trains with 0.5)
RECIPE_WEIGHT_DECAY = {"clip": 0.2, "pir": 0.5}
#: how raster values become 8-bit colours
STRETCHES = ("auto", "percentile", "minmax", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
#: tiles with a smaller share of valid (non-nodata) area are not scored (every raster job, the index)
MIN_VALID = 0.5
#: Box-to-Caption: side of an image's central region as a fraction of its side (0.5: the middle half)
CENTRE_FRACTION = 0.5

#: generic scene content a target is scored against (``background=`` replaces it)
DEFAULT_BACKGROUND_PROMPTS: Tuple[str, ...] = (
    "a satellite image",
    "an aerial photo",
    "bare ground",
    "grass",
    "trees",
    "a road",
    "water",
)

#: prompt template ensembles (the named sets, a template file): engine.core.templates
from .templates import (DEFAULT_ENSEMBLE_MEAN, DEFAULT_TEMPLATES, ENSEMBLE_MEANS,  # noqa: E402,F401
                        REMOTE_SENSING_TEMPLATES, TEMPLATE_SETS, template_error, template_strings)


# --------------------------------------------------------------------------- #
# What users type: one parser each, for every front end.
# --------------------------------------------------------------------------- #
def split_prompts(text: str) -> List[str]:
    """Prompts typed in one field: one per line or separated by ';' (commas stay
    inside a prompt); blanks dropped, inner spaces collapsed, repeats dropped."""
    seen, out = set(), []
    for part in (text or "").replace("\r", "\n").replace(";", "\n").split("\n"):
        prompt = " ".join(part.split())
        if prompt and prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


#: the most reader processes ReadOptions.workers may ask for (each holds about 15 MB)
MAX_READ_WORKERS = 64


def parse_read_workers(text: Any) -> Any:
    """Reader processes typed as text ("auto", "0", "3"; empty: "auto") as
    ReadOptions.workers; anything else is returned as typed for :func:`check` to refuse
    with the fix."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    t = str(text if text is not None else "").strip().lower()
    if t in ("", "auto"):
        return "auto"
    try:
        return int(t)
    except ValueError:
        return t


def parse_bands(text: Optional[str]) -> Optional[List[int]]:
    """Band numbers typed as "4,3,2" (commas, spaces or ';'); empty: None (the reader's choice).

    Raises a UsageError about the option ``bands``."""
    parts = [p for p in re.split(r"[,;\s]+", (text or "").strip()) if p]
    if not parts:
        return None
    try:
        bands = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"bands {text!r} are not band numbers", "give 1-based band numbers, "
                         "e.g. 1,2,3 or 4,3,2", option="bands") from None
    if any(b < 1 for b in bands):
        raise UsageError(f"bands {text!r}: bands are numbered from 1", "e.g. 1,2,3 or 4,3,2",
                         option="bands")
    return bands


# --------------------------------------------------------------------------- #
# Per-model defaults.
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ModelDefaults:
    """What a model does best with; ``None``: no opinion (the generic default).

    Presets carry one (engine.model.presets.PRESETS), a model folder may carry one in
    its ``open_clip_config.json`` under ``mapclip.defaults``, and fine-tuning
    copies the base model's into the folder it writes.
    """

    tile_px: Optional[int] = None        # detect: base tile (window mode) / tile (dense)
    window: Optional[int] = None         # detect, window mode: K x K tiles
    batch_size: Optional[int] = None     # images per model call
    top_k: Optional[int] = None          # detect: boxes per prompt
    threshold: Optional[float] = None    # detect, window mode: minimum softmax score
    dense_tile_px: Optional[int] = None  # dense detect and dense count: tile size
    #: count, prompt method: added to the score of each count 1..10 before the argmax,
    #: fitted on the model's own count sentences (engine.count.fit_count_bias)
    count_bias: Optional[Tuple[float, ...]] = None

    def over(self, base: "ModelDefaults") -> "ModelDefaults":
        """These values where set, ``base``'s elsewhere."""
        return replace(base, **{f.name: getattr(self, f.name) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def to_json(self, weight_bound: bool = False) -> Dict[str, Any]:
        """The values set, for ``mapclip.defaults``. Values fitted to these very
        weights (:data:`WEIGHT_BOUND`, e.g. ``count_bias``) only with
        ``weight_bound``: fine-tuning copies the rest to the model it writes."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in fields(self) for v in [getattr(self, f.name)]
                if v is not None and (weight_bound or f.name not in WEIGHT_BOUND)}

    @classmethod
    def from_json(cls, data: Any) -> "ModelDefaults":
        """From a model folder's ``mapclip.defaults`` (unknown keys ignored)."""
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in fields(cls)}
        out = {}
        for k, v in data.items():
            if k == "count_bias":
                if (isinstance(v, (list, tuple)) and len(v) == 10
                        and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                and math.isfinite(x) for x in v)):
                    out[k] = tuple(float(x) for x in v)
            elif k in known and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v) if k == "threshold" else int(v)
        return cls(**out)


#: model defaults fitted to one model's weights, which a fine-tuned copy must not inherit
WEIGHT_BOUND = ("count_bias",)
#: what every model gets where neither it nor the user says otherwise
GENERIC_DEFAULTS = ModelDefaults(tile_px=128, window=2, batch_size=64, top_k=20,
                                 threshold=None, dense_tile_px=None)


# --------------------------------------------------------------------------- #
# Option values.
# --------------------------------------------------------------------------- #
#: how labelled examples refine a search (engine.model.scoring.example_scorer; measured in
#: bench/bench_examples.py): blend each score with the likeness to the examples, move the
#: prompt (Rocchio), or fit a probe held near the prompt
EXAMPLE_METHODS = ("affinity", "rocchio", "probe")

#: the embedding cache's bounds (engine.cache.store): in memory and on disk, MB
CACHE_MEMORY_MB = 512
CACHE_DISK_MB = 4096


@dataclass
class ReadOptions:
    """How raster bands become 8-bit RGB tiles (see engine.raster.reader)."""

    bands: Optional[Sequence[int]] = None           # 1-based, read as R,G,B (one: grey)
    stretch: str = "auto"
    percentiles: Tuple[float, float] = (2.0, 98.0)
    fixed_range: Optional[Tuple[float, float]] = None
    gsd: Optional[float] = None                     # resample to metres per pixel; None: native
    workers: Any = "auto"                           # reader processes: "auto", 0 (threads) or N (engine.raster.workers)


@dataclass
class DetectOptions:
    """How to detect. ``None``: the model's default (see the module doc)."""

    mode: str = "window"                 # one of MODES
    tile_px: Optional[int] = None        # base tile (window mode) / tile (dense), output px
    window: Optional[int] = None         # window mode: windows of k x k tiles
    stride: int = 1                      # window mode: stride in tiles
    batch_size: Optional[int] = None
    top_k: Optional[int] = None          # boxes per prompt
    threshold: Optional[float] = None    # minimum softmax score of a box (dense: DENSE_THRESHOLD)
    merge: str = "nms"                   # one of MERGES
    background: Sequence[str] = DEFAULT_BACKGROUND_PROMPTS
    read: ReadOptions = field(default_factory=ReadOptions)
    device: Optional[str] = None
    precision: Optional[str] = None
    heatmap: bool = True
    iou: float = 0.0                     # windows overlapping more (IoU) are one object; 0 = any
    min_valid: float = MIN_VALID         # tiles with less valid (non-nodata) area are skipped
    overlap: float = 0.125               # dense: tile overlap, share of a tile
    attention: str = DEFAULT_ATTENTION   # dense: one of ATTENTION_MODES
    cls_token_lambda: Optional[float] = None  # dense: + lambda cos(cls, t); None: the mode's (cls_token_lambda_for)
    workers: int = 2                     # reader threads
    prefetch: int = 2                    # batches read ahead
    templates: Any = None                # prompt template set, template or list; None: the model's
    dense_input_px: Optional[int] = None  # dense: model input side (a multiple of the patch); None: the model's
    dense_slide: bool = False            # dense: slide crops of the model's size over a larger input
    refine: bool = True                  # fit each box to the object inside it (engine.detect's module doc)
    refine_min: float = 0.3              # a fitted box must keep this share of its window's score
    compile: bool = False                # CUDA: torch.compile the image tower (engine.model.accel; cached)
    cache: bool = True                   # keep/reuse the raster's embeddings (engine.cache)
    examples_method: str = "affinity"    # how labelled examples refine the search (EXAMPLE_METHODS)


@dataclass
class CountOptions:
    """How to count. ``tile_px``: None counts the whole extent as one image
    (prompt method); a size counts per tile and sums. ``zero``: add the n = 0
    caption (default: only when counting per tile). ``threshold``/``min_area``:
    dense components (default threshold: DENSE_THRESHOLD)."""

    tile_px: Optional[int] = None
    zero: Optional[bool] = None
    dense_tile_px: Optional[int] = None  # dense tiles; None: the model's default, else its input size
    threshold: Optional[float] = None
    min_area: int = 1
    batch_size: Optional[int] = None
    read: Optional[ReadOptions] = None
    device: Optional[str] = None
    precision: Optional[str] = None
    templates: Any = None                # dense method: prompt templates; None: the model's
    calibrate: bool = True               # prompt method: apply the model's count_bias, if it has one
    peaks: bool = True                   # dense method: one object per heatmap peak, not per blob
    peak_distance: int = 2               # dense method: least distance between peaks, heatmap cells
    cache: bool = True                   # keep/reuse the raster's embeddings (engine.cache)


@dataclass
class IndexOptions:
    """How tiles are cut and embedded.

    The layout fields (``tile_px``, ``scales``, ``stride_px``, ``gsd``,
    ``read``, ``min_valid``) are fixed when an index is created: ``None``
    means "the index's value" when appending, and the default for a new
    index (tile = the model's input size, no overlap, native resolution).
    ``scales`` lists several tile sizes; ``stride_px`` is for the first and
    the others keep the same overlap fraction.
    """

    tile_px: Optional[int] = None
    scales: Optional[Sequence[int]] = None
    stride_px: Optional[int] = None
    gsd: Optional[float] = None
    read: Optional[ReadOptions] = None
    min_valid: Optional[float] = None     # default MIN_VALID
    batch_size: Optional[int] = None
    commit_tiles: int = 4096              # tiles per shard: work lost to a crash at most
    # only the tiles of this area (xmin, ymin, xmax, ymax; in extent_crs, else each
    # raster's CRS); mandatory for unbounded web sources (UNBOUNDED_DRIVERS)
    extent: Optional[Sequence[float]] = None
    extent_crs: Optional[str] = None
    reindex: bool = False                 # re-embed given rasters even when unchanged
    footprints: bool = True               # write footprints.gpkg at the end
    device: Optional[str] = None
    precision: Optional[str] = None
    # Ray (mapclip/engine/archive/distributed.py, docs/scale.md): None builds in this process;
    # RAY_LOCAL ("local") uses Ray's default (RAY_ADDRESS if set, else a new
    # cluster on this machine); anything else is a cluster address for ray.init
    # ("auto", "HOST:PORT", "ray://HOST:10001").
    ray: Optional[str] = None
    ray_workers: Optional[int] = None     # model workers; default: one per GPU, else per CPU
    ray_retries: int = 3                  # restarts of a worker that died, per worker


#: GDAL drivers of web map services (a GDAL WMS/TMS/XYZ XML, WMTS): the whole world at
#: the finest zoom, so an index of them needs IndexOptions.extent
UNBOUNDED_DRIVERS = ("WMS", "WMTS")

#: IndexOptions.ray for "Ray's default cluster" (--ray with no address)
RAY_LOCAL = "local"


@dataclass
class SearchOptions:
    """How a query is run. ``method``: ``auto`` (exact below the approximate
    threshold, approximate above), ``exact`` or ``approx``. The score of a tile is
    ``cos(tile, query) - negative_weight * mean(cos(tile, negative_j))``."""

    top_k: int = 20
    negative: Sequence[str] = ()
    negative_weight: float = 1.0
    method: str = "auto"
    device: Optional[str] = None
    precision: Optional[str] = None
    templates: Any = None                # prompt templates for text queries; None: the model's
    examples_method: str = "affinity"    # how marked places refine the ranking (EXAMPLE_METHODS)


#: near-duplicate images (engine.dedup): RemoteCLIP's "Hamming distance below 2"
DEFAULT_MAX_DISTANCE = 1
#: p-Hash of DEFAULT_HASH_SIZE**2 bits
DEFAULT_HASH_SIZE = 8


@dataclass
class DedupOptions:
    """How :func:`engine.dedup.duplicates.find_duplicates` hashes and compares."""

    max_distance: int = DEFAULT_MAX_DISTANCE   # duplicates: Hamming distance <= this
    hash_size: int = DEFAULT_HASH_SIZE         # hash has hash_size**2 bits
    segments: Optional[int] = None             # default max_distance + 1
    cache: Optional[str] = "default"           # SQLite file; "default": default_cache_path(); None: off
    workers: int = 2                           # hashing threads
    overwrite: bool = False


@dataclass
class FinetuneOptions:
    """Everything one fine-tuning run needs; defaults suit ViT-B/32 on a GPU."""

    model: str
    data: Any                     # a caption file or folder, or a list of them
    out: str
    epochs: int = 10
    batch_size: int = 64          # pairs per forward pass (micro-batch)
    accum: int = 1                # micro-batches per step: contrastive batch = batch_size * accum
    lr: float = 1e-5
    weight_decay: Optional[float] = None   # None: the recipe's (RECIPE_WEIGHT_DECAY)
    warmup: float = 0.05          # fraction of all steps spent warming up
    min_lr_ratio: float = 0.0     # cosine decays to lr * min_lr_ratio
    val_split: float = 0.1        # fraction of images held out when the data names no split
    freeze: str = "none"          # one of FREEZE
    unlock_last: int = 0          # >0: train only the last N blocks of unfrozen towers
    resume: bool = False
    device: Optional[str] = None
    precision: Optional[str] = None   # autocast: None = bf16 on CUDA, fp32 on CPU
    strict: bool = False
    seed: int = 0
    workers: int = 2
    image_root: Optional[str] = None  # base folder for relative image paths
    crop_scale: Tuple[float, float] = (0.5, 1.0)
    eval_batch_size: int = 128
    recipe: str = "clip"              # one of RECIPES
    pir_prior: Optional[str] = None   # PIR: the scene classifier's checkpoint; None: trained first
    pir_prior_epochs: int = 5         # PIR: epochs of the first stage (the scene classifier)
    pir_prior_lr: float = 1e-3        # PIR: the first stage's learning rate
    pir_cal_weight: float = 1.0       # PIR: weight of the cluster-wise affiliation loss
    pir_labels: str = "column"        # PIR: where the scene classes come from (PIR_LABELS)
    raster: Optional[str] = None      # marks given as data: the raster they were made on
    marks_caption: Optional[str] = None   # marks: caption of a "like this" mark without a prompt
    marks_chip_px: Optional[int] = None   # marks: chip side in native px; None: the model's window

    @property
    def decay(self) -> float:
        """The weight decay in force: the one given, else the recipe's."""
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return RECIPE_WEIGHT_DECAY.get(self.recipe, RECIPE_WEIGHT_DECAY["clip"])


#: classify: the most classes a uint8 class map holds (0 = unknown, 255 = not scored)
MAX_CLASSES = 254
#: caption generation (CoCa): how the text is decoded
CAPTION_METHODS = ("beam_search", "top_k", "top_p")


@dataclass
class ClassifyOptions:
    """How to make a class map (engine.classify). ``None``: the model's default.

    Tiles of ``tile_px`` overlapping by ``overlap`` give one patch-level score
    map per class (softmax among the classes) in one pass (engine.model.dense);
    maps are upsampled to ``upsample`` cells per patch side, optionally
    smoothed (Gaussian, ``smoothing`` cells), and blended with ramps toward
    tile borders. A cell whose best class scores below ``threshold`` is
    "unknown" (value 0); None keeps every cell's best class.
    """

    tile_px: Optional[int] = None        # None: the model's dense tile, else its tile
    overlap: float = 0.25                # share of a tile
    threshold: Optional[float] = None    # below: "unknown"; None: never unknown
    smoothing: float = 0.0               # Gaussian sigma in output cells; 0: none
    upsample: int = 2                    # output cells per patch side
    scores: bool = False                 # keep (or write) the per-class score arrays
    batch_size: Optional[int] = None
    read: ReadOptions = field(default_factory=ReadOptions)
    device: Optional[str] = None
    precision: Optional[str] = None
    min_valid: float = MIN_VALID         # tiles with less valid area are not scored
    attention: str = DEFAULT_ATTENTION   # one of ATTENTION_MODES
    cls_token_lambda: Optional[float] = None  # + lambda cos(cls, t); None: the mode's (cls_token_lambda_for)
    dense_input_px: Optional[int] = None  # model input side per tile; None: the model's
    dense_slide: bool = False
    templates: Any = None                # prompt templates; None: the model's
    workers: int = 2
    prefetch: int = 2
    cache: bool = True                   # keep/reuse the raster's embeddings (engine.cache)


@dataclass
class CaptionOptions:
    """How to describe a place (engine.caption).

    Retrieval (any CLIP): the ``top`` best captions of a bank by cosine with
    the place's image. Generation (CoCa models): ``method`` beam search or
    sampling (``top_k`` / ``top_p``), at most ``max_length`` tokens.
    """

    top: int = 5                         # retrieval: captions returned
    templates: Any = "raw"               # retrieval: captions are encoded as written
    method: str = "beam_search"          # generation: one of CAPTION_METHODS
    beams: int = 4                       # generation, beam search: beams
    max_length: int = 30                 # generation: tokens at most
    temperature: float = 1.0             # generation, sampling
    top_p: float = 0.9                   # generation, top_p sampling
    sample_top_k: int = 50               # generation, top_k sampling
    seed: int = 0                        # generation, sampling: torch seed
    read: ReadOptions = field(default_factory=ReadOptions)
    device: Optional[str] = None
    precision: Optional[str] = None
    batch_size: Optional[int] = None


@dataclass
class BoxCaptionOptions:
    """How Box-to-Caption (engine.data.box_caption) reads boxes and writes captions."""

    format: str = "coco"                  # one of engine.data.annotations.FORMATS
    images_dir: Optional[str] = None      # images folder: paths and sizes (needed for YOLO)
    seed: int = 0
    centre_fraction: float = CENTRE_FRACTION
    include_difficult: bool = True        # DOTA / VOC "difficult" objects count too
    overwrite: bool = False


@dataclass
class MaskOptions:
    """How Mask-to-Box (engine.data.mask_box) finds regions."""

    min_area: int = 0                      # regions with fewer class pixels are dropped
    ignore_index: Optional[int] = None     # e.g. 0 (background) or 255 (void)
    images_dir: Optional[str] = None       # images named like the masks (by stem)
    overwrite: bool = False
    captions: Optional[str] = None         # also write Box-to-Caption captions here
    seed: int = 0                          # for the captions
    keep_background: bool = False          # box a class named "background" too


# --------------------------------------------------------------------------- #
# Model defaults applied.
# --------------------------------------------------------------------------- #
O = TypeVar("O")


def with_model_defaults(options: O, defaults: Optional[ModelDefaults] = None) -> O:
    """``options`` with every ``None`` that a model default covers filled in.

    The model's defaults win over :data:`GENERIC_DEFAULTS`; what the caller set
    wins over both. Which option takes which default is :func:`_model_fields`.
    """
    md = (defaults or ModelDefaults()).over(GENERIC_DEFAULTS)
    changes: Dict[str, Any] = {}
    for name, value in _model_fields(options, md).items():
        if getattr(options, name) is None and value is not None:
            changes[name] = value
    return replace(options, **changes) if changes else options  # type: ignore[type-var]


def _model_fields(options: Any, md: ModelDefaults) -> Dict[str, Any]:
    """Option field -> the model default it takes, for each options class."""
    if isinstance(options, DetectOptions):
        dense = options.mode == "dense"
        return {"tile_px": (md.dense_tile_px or md.tile_px) if dense else md.tile_px,
                "window": md.window, "batch_size": md.batch_size, "top_k": md.top_k,
                "threshold": DENSE_THRESHOLD if dense else md.threshold}
    if isinstance(options, CountOptions):  # tile_px None means "the extent as one image"
        return {"dense_tile_px": md.dense_tile_px, "batch_size": md.batch_size}
    if isinstance(options, IndexOptions):  # tiles default to the model's input size
        return {"batch_size": md.batch_size}
    if isinstance(options, ClassifyOptions):
        return {"tile_px": md.dense_tile_px or md.tile_px, "batch_size": md.batch_size}
    return {}


# --------------------------------------------------------------------------- #
# Checks: one place for valid ranges.
# --------------------------------------------------------------------------- #
def _bad(option: str, message: str, fix: str) -> UsageError:
    return UsageError(message, fix, option=option)


def _finite(option: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise _bad(option, f"{option} {value!r} is not a number", "give a number") from None
    if not math.isfinite(v):
        raise _bad(option, f"{option} {value!r} is not a finite number", "give a finite number")
    return v


def _at_least(option: str, value: Any, low: float, whole: bool = True) -> None:
    """``value`` (None: unset) is a number >= ``low``; a whole number unless ``whole`` is False."""
    if value is None:
        return
    v = _finite(option, value)
    if whole and int(v) != v:
        raise _bad(option, f"{option} {value!r} is not a whole number", "give a whole number")
    if v < low:
        raise _bad(option, f"{option} {value!r} is too small", f"give {low:g} or more")


def _positive(option: str, value: Any) -> None:
    if value is None:
        return
    v = _finite(option, value)
    if v <= 0:
        raise _bad(option, f"{option} {value!r} must be greater than 0", "give a positive number")


def _within(option: str, value: Any, low: float, high: float) -> None:
    if value is None:
        return
    v = _finite(option, value)
    if not low <= v <= high:
        raise _bad(option, f"{option} {value!r} is outside {low:g}..{high:g}",
                   f"give a value from {low:g} to {high:g}")


def _choice(option: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise _bad(option, f"unknown {option} {value!r}: not one of {', '.join(choices)}",
                   f"choose one of {', '.join(choices)}")


def _check_read(read: Optional[ReadOptions]) -> None:
    if read is None:
        return
    _positive("gsd", read.gsd)
    if read.bands is not None:
        bands = list(read.bands)
        if not bands or any(not isinstance(b, int) or b < 1 for b in bands):
            raise _bad("bands", f"bands {read.bands!r} are not band numbers from 1",
                       "give 1-based band numbers, e.g. 4,3,2")
    _choice("stretch", read.stretch, STRETCHES)
    w = getattr(read, "workers", "auto")
    if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
        raise _bad("read_workers", f"read_workers {w!r} is not auto or a whole number >= 0",
                   "give auto (processes for large jobs), 0 (read in threads) or a number of "
                   "reader processes")
    if w != "auto" and w > MAX_READ_WORKERS:
        raise _bad("read_workers", f"read_workers {w} is more than {MAX_READ_WORKERS} reader "
                   "processes (each holds about 15 MB)",
                   f"give at most {MAX_READ_WORKERS}, or auto (one per core but one)")


def _check_common(options: Any) -> None:
    if getattr(options, "precision", None) is not None:
        _choice("precision", options.precision, PRECISIONS)
    if getattr(options, "batch_size", None) is not None:
        _at_least("batch_size", options.batch_size, 1)


def check(options: Any) -> Any:  # long: one range table per options class
    """Raise a UsageError naming the option when a value is out of range; else return ``options``."""
    _check_common(options)
    template_strings(getattr(options, "templates", None))    # a UsageError naming the problem
    if isinstance(options, DetectOptions):
        o = options
        _choice("mode", o.mode, MODES)
        _choice("merge", o.merge, MERGES)
        _choice("examples_method", o.examples_method, EXAMPLE_METHODS)
        _choice("attention", ATTENTION_ALIASES.get(o.attention, o.attention), ATTENTION_MODES)
        _at_least("tile_px", o.tile_px, 8)
        _at_least("window", o.window, 1)
        _at_least("stride", o.stride, 1)
        _at_least("top_k", o.top_k, 1)
        _within("threshold", o.threshold, 0.0, 1.0)
        _within("iou", o.iou, 0.0, 1.0)
        _within("min_valid", o.min_valid, 0.0, 1.0)
        _within("overlap", o.overlap, 0.0, 0.49)
        _within("cls_token_lambda", o.cls_token_lambda, -10.0, 10.0)
        _at_least("workers", o.workers, 1)
        _at_least("dense_input_px", o.dense_input_px, 8)
        if not isinstance(o.refine, bool):
            raise _bad("refine", f"refine {o.refine!r} is not true or false",
                       "give True to fit boxes to objects, False to keep window boxes")
        _within("refine_min", o.refine_min, 0.0, 1.0)
        if not isinstance(o.compile, bool):
            raise _bad("compile", f"compile {o.compile!r} is not true or false",
                       "give True to compile the model on CUDA (torch.compile), False not to")
        if any(not str(b).strip() for b in (o.background or ())):
            raise _bad("background", "a background prompt is empty",
                       "give background prompts with words, or leave them out for the defaults")
        if o.window is not None and o.stride > o.window:
            raise _bad("stride", f"stride {o.stride} is larger than the window ({o.window})",
                       "give a stride no larger than the window, or windows would skip tiles")
        _check_read(o.read)
    elif isinstance(options, CountOptions):
        o = options
        _at_least("tile_px", o.tile_px, 8)
        _at_least("dense_tile_px", o.dense_tile_px, 8)
        _within("threshold", o.threshold, 0.0, 1.0)
        _at_least("min_area", o.min_area, 1)
        for flag in ("calibrate", "peaks"):
            if not isinstance(getattr(o, flag), bool):
                raise _bad(flag, f"{flag} {getattr(o, flag)!r} is not true or false", "give True or False")
        _at_least("peak_distance", o.peak_distance, 1)
        _check_read(o.read)
    elif isinstance(options, IndexOptions):
        o = options
        _at_least("tile_px", o.tile_px, 8)
        for s in (o.scales or ()):
            _at_least("scales", s, 8)
        _at_least("stride_px", o.stride_px, 1)
        _positive("gsd", o.gsd)
        _within("min_valid", o.min_valid, 0.0, 1.0)
        _at_least("commit_tiles", o.commit_tiles, 1)
        _check_read(o.read)
        if o.extent is not None:
            vals = [_finite("extent", v) for v in o.extent]
            if len(vals) != 4 or not (vals[0] < vals[2] and vals[1] < vals[3]):
                raise _bad("extent", f"extent {tuple(o.extent)!r} is not xmin,ymin,xmax,ymax "
                           "with xmin < xmax and ymin < ymax", "e.g. --extent 500000,4000000,501000,4001000")
        if o.extent_crs is not None and o.extent is None:
            raise _bad("extent_crs", "extent_crs given without an extent",
                       "add --extent xmin,ymin,xmax,ymax")
        if o.ray is not None and (not isinstance(o.ray, str) or not o.ray.strip()
                                  or any(c.isspace() for c in o.ray)):
            raise _bad("ray", f"Ray address {o.ray!r} is not an address",
                       f"give {RAY_LOCAL} (this machine), auto (the cluster this machine is part "
                       "of), HOST:PORT or ray://HOST:10001")
        _at_least("ray_workers", o.ray_workers, 1)
        _at_least("ray_retries", o.ray_retries, 0)
        if o.ray is None and o.ray_workers is not None:
            raise _bad("ray_workers", "ray_workers given without a Ray cluster",
                       "add --ray (or --ray ADDRESS) to build on Ray workers, or leave out "
                       "--ray-workers")
    elif isinstance(options, SearchOptions):
        o = options
        _at_least("top_k", o.top_k, 1)
        _finite("negative_weight", o.negative_weight)
        _choice("method", o.method, SEARCH_METHODS)
        _choice("examples_method", o.examples_method, EXAMPLE_METHODS)
    elif isinstance(options, FinetuneOptions):
        o = options
        _at_least("epochs", o.epochs, 1)
        _at_least("accum", o.accum, 1)
        _positive("lr", o.lr)
        _at_least("weight_decay", o.weight_decay, 0.0, whole=False)
        _within("warmup", o.warmup, 0.0, 1.0)
        _within("min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)
        _within("val_split", o.val_split, 0.0, 0.9)
        _choice("freeze", o.freeze, FREEZE)
        _choice("recipe", o.recipe, RECIPES)
        _choice("pir_labels", o.pir_labels, PIR_LABELS)
        _at_least("pir_prior_epochs", o.pir_prior_epochs, 1)
        _positive("pir_prior_lr", o.pir_prior_lr)
        _at_least("pir_cal_weight", o.pir_cal_weight, 0.0, whole=False)
        _at_least("unlock_last", o.unlock_last, 0)
        _at_least("workers", o.workers, 0)
        lo, hi = (_finite("crop_scale", v) for v in o.crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise _bad("crop_scale", f"crop scale {o.crop_scale!r} is not 0 < low <= high <= 1",
                       "give two shares of the image, e.g. 0.5 1.0")
    elif isinstance(options, ClassifyOptions):
        o = options
        _choice("attention", ATTENTION_ALIASES.get(o.attention, o.attention), ATTENTION_MODES)
        _at_least("tile_px", o.tile_px, 8)
        _within("overlap", o.overlap, 0.0, 0.49)
        _within("threshold", o.threshold, 0.0, 1.0)
        _within("smoothing", o.smoothing, 0.0, 64.0)
        _at_least("upsample", o.upsample, 1)
        _within("upsample", o.upsample, 1, 16)
        _within("min_valid", o.min_valid, 0.0, 1.0)
        _within("cls_token_lambda", o.cls_token_lambda, -10.0, 10.0)
        _at_least("dense_input_px", o.dense_input_px, 8)
        _at_least("workers", o.workers, 1)
        _check_read(o.read)
    elif isinstance(options, CaptionOptions):
        o = options
        _at_least("top", o.top, 1)
        _choice("method", o.method, CAPTION_METHODS)
        _at_least("beams", o.beams, 1)
        _at_least("max_length", o.max_length, 2)
        _positive("temperature", o.temperature)
        _within("top_p", o.top_p, 0.0, 1.0)
        _at_least("sample_top_k", o.sample_top_k, 1)
        _at_least("seed", o.seed, 0)
        _check_read(o.read)
    elif isinstance(options, ReadOptions):
        _check_read(options)
    return options
