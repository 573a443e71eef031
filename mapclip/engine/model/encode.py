"""Batched encoders: text once, images on the device (resize + normalise there).

Image batches arrive as uint8 arrays ``(B, H, W, 3)`` straight from the reader;
they are copied to the device as uint8 (a quarter of the float bytes), then
resized to the model's input, normalised and encoded in the model's precision.
Embeddings come back L2-normalised in float32.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import UsageError
from .models import LoadedModel
from .accel import TEXT_CACHE


def clean_prompts(prompts: Sequence[str]) -> List[str]:
    """Strip prompts; refuse an empty list or an empty prompt."""
    out = [str(p).strip() for p in (prompts or [])]
    if not out or any(not p for p in out):
        raise UsageError("empty prompt", "give at least one non-empty text prompt, e.g. --prompt \"storage tanks\"")
    return out


@torch.inference_mode()
def encode_text(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 256,
                cache: bool = True, normalize: bool = True) -> torch.Tensor:
    """(N, D) normalised text embeddings, float32 on the model's device (kept in the text
    cache unless ``cache`` is False: a caller that keeps its own rows). ``normalize=False``:
    the text tower's embeddings as they are (never cached)."""
    prompts = clean_prompts(prompts)
    cache = cache and normalize
    hit = TEXT_CACHE.get(lm, prompts) if cache else None  # the same prompt set for the same model: once
    if hit is not None:
        return hit
    chunks = []
    for i in range(0, len(prompts), batch_size):
        tokens = lm.tokenizer(list(prompts[i:i + batch_size])).to(lm.device)
        chunks.append(lm.model.encode_text(tokens).float())
    out = torch.cat(chunks)
    out = F.normalize(out, dim=-1) if normalize else out
    if cache:
        TEXT_CACHE.put(lm, prompts, out)
    return out


#: bytes of float pixels converted at once before resizing (bounds peak memory)
MODEL_INPUT_CHUNK_BYTES = 16 << 20


def normalise_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     size: Optional[int] = None, compute: torch.dtype = torch.float32,
                     out: Optional[torch.dtype] = None) -> torch.Tensor:
    """uint8 (B, H, W, 3), on any device -> (B, 3, S, S) normalised there.

    The one place where pixels become model input (search, dense maps,
    captions and fine-tuning alike): scaled to 0-1 in ``compute`` precision,
    resized to ``size`` (bilinear, antialiased) when given and different,
    normalised with the model's mean and std, cast to ``out``.
    """
    x = x.permute(0, 3, 1, 2).to(compute).div_(255.0)
    if size and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(tuple(mean), device=x.device, dtype=compute).view(1, 3, 1, 1)
    s = torch.tensor(tuple(std), device=x.device, dtype=compute).view(1, 3, 1, 1)
    x = (x - m) / s
    return x if out is None else x.to(out)


def to_model_input(lm: LoadedModel, batch: Union[np.ndarray, torch.Tensor],
                   size: int | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) on the CPU or the device -> the model's input (B, 3, S, S).

    A CPU batch is copied to the device as uint8 (pinned, asynchronously on
    CUDA); large images are converted to float and resized in chunks of about
    :data:`MODEL_INPUT_CHUNK_BYTES`, so a batch of big windows never needs its
    full-size float copy at once (the resized result is small).
    """
    size = int(size or lm.image_size)
    x = torch.as_tensor(batch)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) uint8 batch, got {tuple(x.shape)}")
    compute = torch.float32 if lm.device.type == "cpu" else lm.dtype
    per_image = max(1, x[0].numel() * 4) if len(x) else 1
    chunk = max(1, MODEL_INPUT_CHUNK_BYTES // per_image)
    parts = []
    for i in range(0, max(1, len(x)), chunk):
        part = x[i:i + chunk]
        if part.device != lm.device:
            non_blocking = lm.device.type == "cuda"
            if non_blocking and part.device.type == "cpu" and not part.is_pinned():
                part = part.pin_memory()
            part = part.to(lm.device, non_blocking=non_blocking)
        parts.append(normalise_pixels(part, lm.mean, lm.std, size, compute, lm.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.inference_mode()
def encode_images(lm: LoadedModel, batch: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """(B, D) normalised image embeddings (float32, on the device) for a uint8 batch."""
    from .accel import encode_image  # deferred: a test replaces it at call time
    x = to_model_input(lm, batch)
    return F.normalize(encode_image(lm, x).float(), dim=-1)   # engine.model.accel: the device's fast path


def resize_center_crop(im, size: int):
    """A PIL image resized on its short side to ``size`` (bicubic) and centre-cropped square.

    The preprocessing CLIP and the remote-sensing references (open_clip's
    ``image_transform`` at evaluation: ``Resize(size)`` then
    ``CenterCrop(size)``) apply to an image query, so a non-square image is
    not squashed.
    """
    from PIL import Image
    w, h = im.size
    if (w, h) != (size, size):
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        im = im.resize((nw, nh), Image.BICUBIC)
        left = int(round((nw - size) / 2.0))
        top = int(round((nh - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
    return im


def encode_image_files(lm: LoadedModel, paths: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Embeddings of image files (PNG/JPEG/TIFF), resized on the short side and centre-cropped."""
    from PIL import Image, UnidentifiedImageError
    out = []
    for i in range(0, len(paths), batch_size):
        arrays = []
        for p in paths[i:i + batch_size]:
            try:
                with Image.open(p) as im:
                    im = resize_center_crop(im.convert("RGB"), lm.image_size)
                    arrays.append(np.asarray(im, dtype=np.uint8))
            except FileNotFoundError:
                raise UsageError(f"image {p} does not exist", "check the path") from None
            except (UnidentifiedImageError, OSError) as exc:
                raise UsageError(f"cannot read image {p} ({exc})",
                                 "use a PNG, JPEG or TIFF image") from None
        out.append(encode_images(lm, np.stack(arrays)))
    return torch.cat(out)
