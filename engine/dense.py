"""Patch-level text similarity in one forward pass (training-free dense CLIP).

A CLIP ViT's patch tokens do not live in the text space: the last block's
attention mixes every token toward a global summary, and its residual and
MLP carry that away from the patches. SCLIP, ClearCLIP and SegEarth-OV show
that changing only the *last* block is enough to make patch tokens
text-comparable:

- its attention becomes self-self attention: ``softmax(q q^T)`` (ClearCLIP,
  mode ``"qq"``, the default), ``softmax(q q^T) + softmax(k k^T)`` (SCLIP,
  ``"qq+kk"``), ``softmax(k k^T)`` (``"kk"``) or ``softmax(v v^T)``
  (``"vv"``), each scaled by 1/sqrt(head dim) and applied to v;
- its residual connection and its feed-forward network are dropped;
- the result goes through ``ln_post`` and ``proj`` like the class token;
- optionally a share of the class token's response is subtracted from every
  patch (SegEarth-OV's global-bias removal, ``cls_weight``).

This module runs the visual tower's pieces itself (conv1, class and
positional embeddings, ln_pre, all blocks but the last, then the changed
last block); open_clip is not patched, so the same model still serves the
ordinary image encoder. Only open_clip's standard ``VisionTransformer`` with
``ResidualAttentionBlock`` blocks qualifies; :func:`dense_unsupported` says
why another model does not (ResNets fall back to window mode in detect).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import numpy as np

if TYPE_CHECKING:  # torch loads on first use (the CLI imports the constants cheaply)
    import torch

    from .models import LoadedModel

from .options import ATTENTION_MODES, DEFAULT_ATTENTION  # noqa: E402,F401


#: bytes of float pixels converted at once before resizing (bounds peak memory)
MODEL_INPUT_CHUNK_BYTES = 16 << 20


def resize_normalise(lm: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) already on its device -> normalised (B, 3, S, S), computed there.

    The same arithmetic as engine.encode.to_model_input, for batches that are
    already on the model's device (window bands assembled on the GPU), which
    to_model_input would try to pin.
    """
    import torch
    import torch.nn.functional as F
    compute = torch.float32 if batch.device.type == "cpu" else lm.dtype
    x = batch.permute(0, 3, 1, 2).to(compute).div_(255.0)
    if x.shape[-2:] != (lm.image_size, lm.image_size):
        x = F.interpolate(x, size=(lm.image_size, lm.image_size), mode="bilinear",
                          antialias=True, align_corners=False)
    mean = torch.tensor(lm.mean, device=x.device, dtype=compute).view(1, 3, 1, 1)
    std = torch.tensor(lm.std, device=x.device, dtype=compute).view(1, 3, 1, 1)
    return ((x - mean) / std).to(lm.dtype)


def _model_input_one(lm: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    from .encode import to_model_input
    if batch.device.type == "cpu":
        return to_model_input(lm, batch)  # copies to the device (pinned) and converts there
    return resize_normalise(lm, batch)


def model_input(lm: LoadedModel, batch: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 (B, H, W, 3) on the CPU or the device -> the model's input (B, 3, S, S).

    Large images are converted to float and resized in chunks of about
    MODEL_INPUT_CHUNK_BYTES, so a batch of big windows never needs its
    full-size float copy at once (the resized result is small).
    """
    import torch
    batch = torch.as_tensor(batch)
    per_image = max(1, batch[0].numel() * 4) if len(batch) else 1
    chunk = max(1, MODEL_INPUT_CHUNK_BYTES // per_image)
    if len(batch) <= chunk:
        return _model_input_one(lm, batch)
    return torch.cat([_model_input_one(lm, batch[i:i + chunk]) for i in range(0, len(batch), chunk)])


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
    b, w = x.shape[:2]
    x = x.reshape(b, w, -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding.to(x.dtype)
    if pos.shape[0] != x.shape[1]:
        raise ValueError(f"input gives {x.shape[1]} tokens, the model has {pos.shape[0]} positions; "
                         "resize the input to the model's image size")
    return visual.ln_pre(x + pos)


def _self_self_attention(block, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The changed last block: self-self attention on ln_1(x), out_proj, no residual/MLP."""
    import torch.nn.functional as F
    attn = block.attn
    y = block.ln_1(x)
    b, n, d = y.shape
    heads = attn.num_heads
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
    if mode == "qq":
        out = F.scaled_dot_product_attention(q, q, v)
    elif mode == "kk":
        out = F.scaled_dot_product_attention(k, k, v)
    elif mode == "qq+kk":
        out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    elif mode == "vv":
        out = F.scaled_dot_product_attention(v, v, v)
    else:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {ATTENTION_MODES}")
    out = out.transpose(1, 2).reshape(b, n, d)
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    ls = getattr(block, "ls_1", None)
    return ls(out) if ls is not None else out


def dense_features(lm: LoadedModel, batch: Union[np.ndarray, torch.Tensor],
                   mode: str = DEFAULT_ATTENTION, cls_weight: float = 0.0) -> torch.Tensor:
    """(B, h, w, D) L2-normalised patch embeddings for a uint8 batch (B, H, W, 3).

    The batch is resized to the model's input on the device (as for the
    image encoder); ``h, w`` is the model's patch grid (7 x 7 for ViT-B/32
    at 224 px). ``mode`` picks the self-self attention (see module doc);
    ``cls_weight`` subtracts that share of the class token's response.
    """
    import torch
    import torch.nn.functional as F
    reason = dense_unsupported(lm)
    if reason:
        raise ValueError(reason)
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {ATTENTION_MODES}")
    with torch.inference_mode():
        return _dense_features(lm, batch, mode, cls_weight, F)


def _dense_features(lm, batch, mode: str, cls_weight: float, F):
    visual = lm.model.visual
    x = _embed(visual, model_input(lm, batch))
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
    patches = x[:, 1:]
    if cls_weight:
        patches = patches - cls_weight * x[:, :1]
    gh, gw = _grid(visual, patches.shape[1])
    return F.normalize(patches, dim=-1).reshape(x.shape[0], gh, gw, -1)


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
