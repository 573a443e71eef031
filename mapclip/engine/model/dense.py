"""Patch-level text similarity in one forward pass (training-free dense CLIP).

A CLIP ViT's patch tokens do not live in the text space: the last block's
attention mixes every token toward a global summary, and its residual and
MLP carry that away from the patches. SCLIP, ClearCLIP and SegEarth-OV show
that changing only the *last* block is enough to make patch tokens
text-comparable. The modes (``mode=``), each named for what it is:

- ``"clearclip"`` (ClearCLIP, Lan et al. 2024; the default; old name
  ``"qq"``): attention ``softmax(q q^T / sqrt(d)) v``, then ``out_proj``; the
  residual connection and the feed-forward network are dropped;
- ``"sclip-style"`` (old name ``"qq+kk"``): SCLIP's correlative attention
  ``(softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))) v`` in ClearCLIP's
  block, without residual and FFN (SegEarth-OV's "SCLIP" setting); *not*
  SCLIP's published model, which keeps both: that is ``"sclip"``;
- ``"sclip"`` (SCLIP, Wang et al. 2024): the same correlative attention with
  the block's residual and FFN kept, ``x + attn; x + mlp(ln_2(x))``;
- ``"segearth"`` (SegEarth-OV, Li et al. 2025, its default): ``(softmax(q q^T)
  + softmax(k k^T) + softmax(v v^T)) v / sqrt(d)``-scaled, no residual, no FFN;
- ``"kk"`` and ``"vv"``: single self-self attentions, no residual, no FFN.

The result goes through ``ln_post`` and ``proj`` like the class token. With
``cls_token_lambda`` (SegEarth-OV's name and sign; its configs use -0.3, the
``segearth`` mode's default in the options, engine.core.options.cls_token_lambda_for),
SegEarth-OV's global-bias removal is applied: the score of a patch for a text t
is ``cos(patch, t) + lambda * cos(cls, t)`` with the class token of the same
changed block; the returned feature is then ``normalise(patch) + lambda *
normalise(cls)``, so any dot product with a unit text vector gives exactly that
score (such features are not unit length).

Input size: by default the batch is resized to the model's image size. Any
``input_size`` that is a multiple of the patch works: the position
embeddings are interpolated bicubically over the patch grid as ClearCLIP and
SegEarth-OV (after DINO) do. With ``crop`` (and ``stride``, default half the
crop), crops of that size slide over the input and each patch's feature is
the mean over the crops that hold it (SegEarth-OV's ``slide_crop`` /
``slide_stride``, 224 / 112 in its configs); as scores are linear in the
features, that is the mean of the crops' scores.

This module runs the visual tower's pieces itself (conv1, class and
positional embeddings, ln_pre, all blocks but the last, then the changed
last block); open_clip is not patched, so the same model still serves the
ordinary image encoder. Only open_clip's standard ``VisionTransformer`` with
``ResidualAttentionBlock`` blocks qualifies; :func:`dense_unsupported` says
why another model does not (ResNets fall back to window mode in detect).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

if TYPE_CHECKING:  # torch loads on first use (the CLI imports the constants cheaply)
    import torch

    from .models import LoadedModel

from ..core.options import ATTENTION_MODES, DEFAULT_ATTENTION, canonical_attention
from ..core.errors import UsageError


def dense_unsupported(lm: LoadedModel) -> Optional[str]:
    """None if dense features work for ``lm``, else the reason they do not."""
    import torch
    if not lm.is_vit:
        return f"{lm.arch} is not a ViT (dense mode needs a ViT's patch tokens)"
    visual = getattr(lm.model, "visual", None)
    for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer",
                 "ln_post", "proj"):
        if not hasattr(visual, name):
            return f"{lm.arch}'s image tower has no {name} (not an open_clip VisionTransformer)"
    if getattr(visual, "prior", None) is not None:
        return (f"{lm.arch} is a PIR model (its image tower weighs the tokens by a scene prior, "
                "so the patch tokens alone are not its features)")
    if getattr(visual, "attn_pool", None) is not None:
        return f"{lm.arch} pools with attention (dense mode needs token pooling)"
    blocks = getattr(visual.transformer, "resblocks", None)
    if not blocks:
        return f"{lm.arch}'s image tower has no transformer blocks"
    last = blocks[-1]
    attn = getattr(last, "attn", None)
    if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
        return f"{lm.arch}'s last block is not a standard attention block"
    return None


def _embed(visual, x: torch.Tensor) -> torch.Tensor:
    """Patch embedding, class token, positional embedding and ln_pre: (B, 1+N, W)."""
    import torch
    x = visual.conv1(x)
    b, w, gh, gw = x.shape
    x = x.reshape(b, w, -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = interpolate_positions(visual.positional_embedding, gh, gw).to(x.dtype)
    return visual.ln_pre(x + pos)


def interpolate_positions(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Position embeddings (1 + n*n, W) for a gh x gw patch grid.

    The class position is kept; the n x n grid of patch positions is resized
    bicubically with a scale factor of (g + 0.1) / n, the recipe of DINO that
    ClearCLIP and SegEarth-OV use (the 0.1 avoids a floating-point miss of
    the output size). The model's own grid is returned unchanged.
    """
    import math

    import torch
    import torch.nn.functional as F
    n = int(round(math.sqrt(pos.shape[0] - 1)))
    if n * n != pos.shape[0] - 1:
        raise ValueError(f"position embeddings of {pos.shape[0]} rows are not 1 + a square grid")
    if (gh, gw) == (n, n):
        return pos
    grid = pos[1:].float().reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic",
                         align_corners=False)
    if grid.shape[-2:] != (gh, gw):
        raise ValueError(f"could not interpolate position embeddings to {gh} x {gw}")
    grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)
    return torch.cat([pos[:1], grid], dim=0)


def _self_self_attention(block, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The changed last block: self-self attention on ln_1(x), out_proj; residual
    and MLP only for "sclip"."""
    import torch.nn.functional as F
    attn = block.attn
    y = block.ln_1(x)
    b, n, d = y.shape
    heads = attn.num_heads
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
    if mode == "clearclip":
        out = F.scaled_dot_product_attention(q, q, v)
    elif mode == "kk":
        out = F.scaled_dot_product_attention(k, k, v)
    elif mode in ("sclip-style", "sclip"):
        out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    elif mode == "segearth":
        out = (F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
               + F.scaled_dot_product_attention(v, v, v))
    elif mode == "vv":
        out = F.scaled_dot_product_attention(v, v, v)
    else:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {ATTENTION_MODES}")
    out = out.transpose(1, 2).reshape(b, n, d)
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    ls = getattr(block, "ls_1", None)
    out = ls(out) if ls is not None else out
    if mode != "sclip":
        return out
    x = x + out
    mlp = block.mlp(block.ln_2(x))
    ls2 = getattr(block, "ls_2", None)
    return x + (ls2(mlp) if ls2 is not None else mlp)


def dense_features(lm: LoadedModel, batch: Union[np.ndarray, torch.Tensor],
                   mode: str = DEFAULT_ATTENTION, cls_token_lambda: float = 0.0,
                   input_size: Optional[int] = None, crop: Optional[int] = None,
                   stride: Optional[int] = None) -> torch.Tensor:
    """(B, h, w, D) patch embeddings for a uint8 batch (B, H, W, 3).

    The batch is resized to ``input_size`` (default: the model's image size;
    any multiple of the patch) on the device; ``h, w`` is that size's patch
    grid (7 x 7 for ViT-B/32 at 224 px). ``mode`` picks the changed last
    block (see module doc; old names accepted); ``cls_token_lambda`` applies
    SegEarth-OV's class-token correction; ``crop`` / ``stride`` slide crops
    over the input. Features are L2-normalised unless ``cls_token_lambda`` or
    ``crop`` is used (then scores stay the references' linear combinations).
    """
    import torch
    import torch.nn.functional as F
    reason = dense_unsupported(lm)
    if reason:
        raise ValueError(reason)
    mode = canonical_attention(mode)
    p = lm.patch_size or 1
    size = int(input_size or lm.image_size)
    if size % p:
        raise ValueError(f"input size {size} px is not a multiple of the {p} px patch")
    if crop is not None:
        crop = int(crop)
        stride = int(stride or max(p, (crop // 2) // p * p))
        if crop % p or stride % p or crop > size or stride < 1:
            raise ValueError(f"crop {crop} and stride {stride} must be multiples of the {p} px patch, "
                             f"the crop at most the input size {size}")
    per_image, bound = dense_bytes(lm, size, crop), dense_memory_bound(lm)
    if per_image > bound:
        raise dense_too_large(lm, size, crop, per_image, bound)
    chunk = max(1, int(bound // per_image))        # images whose features fit at once
    if len(batch) > chunk:
        return torch.cat([dense_features(lm, batch[i:i + chunk], mode, cls_token_lambda, input_size,
                                         crop, stride) for i in range(0, len(batch), chunk)])
    from .encode import to_model_input
    with torch.inference_mode():
        x = to_model_input(lm, batch, size)
        if crop is None or crop == size:
            return _dense_features(lm, x, mode, cls_token_lambda, F)
        return _sliding(lm, x, mode, cls_token_lambda, crop, stride, p, F)


#: the share of the device's free memory one batch of dense features may take
DENSE_MEMORY_SHARE = 0.5


def dense_bytes(lm: LoadedModel, size: int, crop: Optional[int] = None) -> int:
    """About the bytes one image of a dense batch takes at input ``size`` (crops of
    ``crop``): the resized input, the tokens through a block, one attention
    matrix (the largest single allocation when attention is not fused), and the
    sliding crops' sum."""
    p = lm.patch_size or 1
    t = lm.model.visual.transformer
    width = int(getattr(t, "width", 0) or lm.embed_dim)
    heads = int(getattr(t.resblocks[0].attn, "num_heads", 1))
    c = int(crop or size)
    tokens = (c // p) ** 2 + 1
    grid = (size // p) ** 2
    return 4 * (2 * 3 * size * size + 12 * tokens * width + heads * tokens * tokens
                + (grid * lm.embed_dim if crop else 0))


def dense_memory_bound(lm: LoadedModel) -> int:
    """Bytes a dense batch may take: :data:`DENSE_MEMORY_SHARE` of the model's
    device's free memory (CUDA: free plus what torch holds unused; CPU: MemAvailable)."""
    import torch
    dev = getattr(lm, "device", None)
    free = None
    if dev is not None and getattr(dev, "type", str(dev)) == "cuda" and torch.cuda.is_available():
        got, _ = torch.cuda.mem_get_info(dev)
        free = got + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    else:
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
        except OSError:
            pass
        if free is None:
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                free = 8 << 30
    return int(free * DENSE_MEMORY_SHARE)


def dense_too_large(lm: LoadedModel, size: int, crop: Optional[int], need: int,
                    bound: int):
    """The refusal of a dense input whose one image would not fit ``bound`` bytes."""
    p = lm.patch_size or 1
    fits = next((s for s in range(size - p, p - 1, -p) if dense_bytes(lm, s, crop and min(crop, s))
                 <= bound), p)
    return UsageError(
        f"dense_input_px {size} px needs about {need / 2 ** 30:.1f} GB for each tile "
        f"({(int(crop or size) // p) ** 2} patches attending to each other), more than "
        f"{bound / 2 ** 30:.1f} GB, half of the memory free on {lm.device}",
        f"give a smaller --dense-input (at most {fits} px here; the model's own size is "
        f"{lm.image_size} px), or --dense-slide to slide crops of the model's size over it; "
        "--batch-size only sets how many tiles go together", option="dense_input_px")


def _crop_starts(size: int, crop: int, stride: int):
    """Crop origins covering [0, size): every stride, the last one flush with the end."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, size - crop) for i in range(n)})


def _sliding(lm, x, mode: str, cls_token_lambda: float, crop: int, stride: int, p: int, F):
    import torch
    b, _, h, w = x.shape
    acc = None
    count = torch.zeros(h // p, w // p, 1, device=x.device)
    for y0 in _crop_starts(h, crop, stride):
        for x0 in _crop_starts(w, crop, stride):
            f = _dense_features(lm, x[:, :, y0:y0 + crop, x0:x0 + crop], mode, cls_token_lambda, F)
            if acc is None:
                acc = torch.zeros(b, h // p, w // p, f.shape[-1], device=x.device)
            acc[:, y0 // p:(y0 + crop) // p, x0 // p:(x0 + crop) // p] += f
            count[y0 // p:(y0 + crop) // p, x0 // p:(x0 + crop) // p] += 1
    return acc / count


def _dense_features(lm, x, mode: str, cls_token_lambda: float, F):
    """Features of a normalised model input x (B, 3, H, W)."""
    visual = lm.model.visual
    gh, gw = x.shape[-2] // (lm.patch_size or 1), x.shape[-1] // (lm.patch_size or 1)
    x = _embed(visual, x)
    transformer = visual.transformer
    batch_first = getattr(transformer, "batch_first", True)
    blocks = transformer.resblocks
    if not batch_first:
        x = x.transpose(0, 1)
    for blk in blocks[:-1]:
        x = blk(x)
    if not batch_first:
        x = x.transpose(0, 1)
    x = _self_self_attention(blocks[-1], x, mode)
    x = visual.ln_post(x)
    if visual.proj is not None:
        x = x @ visual.proj
    x = x.float()
    patches = F.normalize(x[:, 1:], dim=-1)
    if cls_token_lambda:
        patches = patches + float(cls_token_lambda) * F.normalize(x[:, :1], dim=-1)
    return patches.reshape(x.shape[0], gh, gw, -1)


def _grid(visual, n: int):
    grid = getattr(visual, "grid_size", None)
    if grid and grid[0] * grid[1] == n:
        return int(grid[0]), int(grid[1])
    side = int(round(n ** 0.5))
    return side, n // side


def similarity_maps(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine of each patch with each text embedding: (B, h, w, D) x (T, D) -> (B, T, h, w)."""
    import torch
    return torch.einsum("bhwd,td->bthw", features.float(), text.float())


def patch_grid(lm: LoadedModel) -> int:
    """Patches per side of the model's input (e.g. 7 for ViT-B/32 at 224 px)."""
    p = lm.patch_size or 1
    return max(1, lm.image_size // p)
