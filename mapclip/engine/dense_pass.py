"""The dense pass: one heatmap per prompt over a raster job's area, from patch features.

Tiles of ``tile_px`` pixels overlapping by ``overlap`` of a tile give one
patch-level score map each in one forward pass (engine.model.dense); maps are
upsampled (x :data:`DENSE_UPSAMPLE`), weighted by a linear ramp toward tile
borders and blended into one heatmap, cropped to the cells that touch the area
(cells never scored are NaN). The tiles' patch features are the job's kept
embedding pass (``detect-dense``), so a later prompt scores them again without
reading a pixel. Detect's dense mode makes boxes of it (engine.detect); count's
dense method counts its peaks (engine.count).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .core.errors import UsageError
from .core.options import DetectOptions, cls_token_lambda_for
from .geo.tiling import PixelWindow, TileGrid
from .model.batching import BatchRunner
from .model.scoring import PromptBank
from .model.dense import dense_features
from .model.scoring import score_maps

#: dense heatmap cells per patch side
DENSE_UPSAMPLE = 2


@dataclass
class DenseHeat:
    """A dense pass's heatmaps, cropped to the area: ``heat`` (softmax shares) and
    ``cosine`` (raw cosines), (prompts, rows, cols) each; ``transform`` maps their
    cells to the raster's CRS; ``origin`` is the first cell's corner in native pixels
    and ``cell`` a cell's (width, height) in native pixels."""

    heat: np.ndarray
    cosine: np.ndarray
    transform: object
    origin: Tuple[float, float]
    cell: Tuple[float, float]
    tiles: int
    skipped: int


def tile_grid(info, area: PixelWindow, opts: DetectOptions, stride_px: Optional[int] = None) -> TileGrid:
    """The tile grid of a raster job's area for ``opts`` (its tile size and GSD)."""
    return TileGrid.for_raster(info, area, int(opts.tile_px), stride_px=stride_px,
                               gsd=opts.read.gsd)


def crop_heat(heat: np.ndarray, origin: Tuple[float, float], cell: Tuple[float, float],
              area: PixelWindow, transform):
    """Crop a heat grid to the cells touching ``area``; return (heat, cell transform)."""
    from affine import Affine
    ox, oy = origin
    cx, cy = cell
    j0 = max(0, int(math.floor((area.col - ox) / cx + 1e-9)))
    i0 = max(0, int(math.floor((area.row - oy) / cy + 1e-9)))
    j1 = min(heat.shape[2], int(math.ceil((area.col_end - ox) / cx - 1e-9)))
    i1 = min(heat.shape[1], int(math.ceil((area.row_end - oy) / cy - 1e-9)))
    heat = np.ascontiguousarray(heat[:, i0:i1, j0:j1])
    tf = transform @ Affine.translation(ox + j0 * cx, oy + i0 * cy) @ Affine.scale(cx, cy)
    return heat, tf


def _ramp(n: int, ramp: float) -> np.ndarray:
    """Blend weights along one tile axis: 1 inside, linear toward the borders."""
    i = np.arange(n, dtype=np.float32) + 0.5
    w = np.minimum(1.0, np.minimum(i, n - i) / max(ramp, 1.0))
    return np.maximum(w, 1e-3).astype(np.float32)


def dense_heatmap(rj, bank: PromptBank, opts: DetectOptions, runner: BatchRunner) -> DenseHeat:
    """The dense pass of raster job ``rj`` (engine.rasterjob) for ``bank``'s prompts."""
    import torch
    import torch.nn.functional as F

    info, area, lm, job = rj.info, rj.area, rj.lm, rj.job
    t = int(opts.tile_px)
    ov = int(round(t * opts.overlap))
    grid = tile_grid(info, area, opts, stride_px=max(1, t - ov))
    cov = grid.covered()
    size = int(opts.dense_input_px or lm.image_size)              # the model input per tile
    if lm.patch_size and size % lm.patch_size:
        raise UsageError(f"dense input {size} px is not a multiple of {lm.arch}'s {lm.patch_size} px patch",
                         f"give a multiple of {lm.patch_size}, e.g. {2 * lm.image_size}",
                         option="dense_input_px")
    crop = lm.image_size if opts.dense_slide and size > lm.image_size else None
    gh = gw = max(1, size // max(1, lm.patch_size))
    hh, hw = gh * DENSE_UPSAMPLE, gw * DENSE_UPSAMPLE           # heat cells per tile
    cx, cy = grid.tile_width / hw, grid.tile_height / hh         # native px per heat cell
    Wh, Hh = int(math.ceil(cov.width / cx - 1e-9)), int(math.ceil(cov.height / cy - 1e-9))
    P = bank.n_prompts
    acc = np.zeros((P, Hh, Wh), np.float32)
    acc_cos = np.zeros((P, Hh, Wh), np.float32)
    wsum = np.zeros((Hh, Wh), np.float32)
    ramp_cells = max(1.0, ov / max(cx, 1e-9))
    weight = np.outer(_ramp(hh, ramp_cells), _ramp(hw, ramp_cells))
    job.set_total(len(grid.tiles))
    lam = cls_token_lambda_for(opts.attention, opts.cls_token_lambda)
    # the pass kept for later prompts: each valid tile's patch features
    params = {"tile_px": t, "overlap": float(opts.overlap), "input_px": size, "crop": crop,
              "attention": opts.attention, "cls_token_lambda": lam,
              "min_valid": float(opts.min_valid)}

    def features(batch: torch.Tensor):
        return runner(lambda b: dense_features(lm, b, mode=opts.attention, cls_token_lambda=lam,
                                               input_size=size, crop=crop).float(), batch)

    def score_features(feats: torch.Tensor):
        probs, cos = score_maps(feats, bank)
        both = torch.cat([probs, cos], dim=1)
        both = F.interpolate(both, size=(hh, hw), mode="bilinear", align_corners=False)
        return both[:, :P], both[:, P:]

    for tiles, feats in rj.tile_features("detect-dense", params, grid.tiles, features, opts.batch_size,
                                         prefetch=opts.prefetch, workers=opts.workers,
                                         min_valid=opts.min_valid):
        with torch.inference_mode():
            probs, cos = runner(score_features, feats)
        probs, cos = probs.cpu().numpy(), cos.cpu().numpy()
        for tile, pr, co in zip(tiles, probs, cos):
            x = int(round((tile.col - cov.col) / cx))
            y = int(round((tile.row - cov.row) / cy))
            x1, y1 = min(Wh, x + hw), min(Hh, y + hh)
            w = weight[:y1 - y, :x1 - x]
            acc[:, y:y1, x:x1] += pr[:, :y1 - y, :x1 - x] * w
            acc_cos[:, y:y1, x:x1] += co[:, :y1 - y, :x1 - x] * w
            wsum[y:y1, x:x1] += w
    skipped = rj.skipped
    covered = wsum > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        heat = np.where(covered, acc / np.where(covered, wsum, 1.0), np.nan).astype(np.float32)
        heat_cos = np.where(covered, acc_cos / np.where(covered, wsum, 1.0), np.nan)
    del acc, acc_cos
    # boxes only from the cells that touch the requested area
    heat_a, heat_tf = crop_heat(heat, (cov.col, cov.row), (cx, cy), area, info.transform)
    cos_a, _ = crop_heat(heat_cos, (cov.col, cov.row), (cx, cy), area, info.transform)
    j0 = int(math.floor((area.col - cov.col) / cx + 1e-9))
    i0 = int(math.floor((area.row - cov.row) / cy + 1e-9))
    origin = (cov.col + max(0, j0) * cx, cov.row + max(0, i0) * cy)
    return DenseHeat(heat_a, cos_a, heat_tf, origin, (cx, cy), len(grid.tiles), skipped)
