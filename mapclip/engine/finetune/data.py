"""The data side of fine-tuning: decoding, RemoteCLIP's augmentation, the per-epoch plan,
the split, and the retrieval evaluation."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import UsageError
from ..core.jobs import CancelFlag, Job, ProgressFn
from ..data.captions import CaptionItem, check_images, read_captions
from ..data.metrics import retrieval_metrics
from ..model.models import LoadedModel


# --------------------------------------------------------------------------- #
# Data: decoding, augmentation, the per-epoch plan.
# --------------------------------------------------------------------------- #
def augment(im, size: int, rng: np.random.Generator,
            scale: Tuple[float, float] = (0.5, 1.0)) -> np.ndarray:
    """RemoteCLIP augmentation of a PIL RGB image -> uint8 (size, size, 3)."""
    from PIL import Image
    w0, h0 = im.size
    area = w0 * h0
    box = None
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= w0 and 0 < h <= h0:
            x = int(rng.integers(0, w0 - w + 1))
            y = int(rng.integers(0, h0 - h + 1))
            box = (x, y, x + w, y + h)
            break
    if box is None:  # centre crop of the short side
        s = min(w0, h0)
        box = ((w0 - s) // 2, (h0 - s) // 2, (w0 - s) // 2 + s, (h0 - s) // 2 + s)
    arr = np.asarray(im.resize((size, size), Image.BICUBIC, box=box), dtype=np.uint8)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    if rng.random() < 0.5:
        arr = arr[::-1]
    arr = np.rot90(arr, int(rng.integers(0, 4)))
    return np.ascontiguousarray(arr)


def load_image(path: str, size: int, seed: Optional[int] = None,
               scale: Tuple[float, float] = (0.5, 1.0)) -> np.ndarray:
    """Decode with PIL; augmented when ``seed`` is given, else resized whole."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        if seed is None:
            return np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.uint8)
        return augment(im, size, np.random.default_rng(seed), scale)


class PairDataset(torch.utils.data.Dataset):
    """(path, caption, augmentation seed or None) -> (uint8 image, caption) or None."""

    def __init__(self, plan: Sequence[Tuple[str, str, Optional[int]]], size: int,
                 scale: Tuple[float, float]):
        self.plan, self.size, self.scale = list(plan), size, tuple(scale)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int):
        path, caption, seed = self.plan[i]
        try:
            return load_image(path, self.size, seed, self.scale), caption, i
        except Exception as exc:  # a file broken after the up-front check: skip, never crash
            return None, f"{path} ({type(exc).__name__})", i


def collate(batch):
    """Stack the decodable samples; return (uint8 (B,S,S,3), captions, positions, failures)."""
    ok = [b for b in batch if b[0] is not None]
    failed = [b[1] for b in batch if b[0] is None]
    if not ok:
        return None, [], [], failed
    return (torch.from_numpy(np.stack([b[0] for b in ok])), [b[1] for b in ok],
            [b[2] for b in ok], failed)


def epoch_plan(items: Sequence[CaptionItem], seed: int, epoch: int, used: int
               ) -> Tuple[np.ndarray, List[Tuple[str, str, int]]]:
    """The order, captions and augmentation seeds of one epoch: a function of (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch, 7])
    order = rng.permutation(len(items))[:used]
    plan = []
    for i in order:
        item = items[int(i)]
        caption = item.captions[int(rng.integers(len(item.captions)))]
        plan.append((item.path, caption, int(rng.integers(0, 2 ** 62))))
    return order, plan


def worker_count(workers: int) -> int:
    """Decoding processes to use: ``workers``, or 0 where worker processes cannot start.

    Worker processes fork on Linux; elsewhere they spawn a new interpreter from
    ``sys.executable``, which inside QGIS is the QGIS program, not Python. There
    decoding stays in the calling process.
    """
    import multiprocessing
    import sys
    if workers <= 0:
        return 0
    if multiprocessing.get_start_method(allow_none=True) in (None, "fork") and sys.platform.startswith("linux"):
        return int(workers)
    return int(workers) if Path(sys.executable).name.lower().startswith("python") else 0


def _loader(dataset, batch_size: int, workers: int):
    # one batch gains nothing from worker processes, and starting them costs seconds
    n = worker_count(workers) if len(dataset) > batch_size else 0
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       num_workers=n, collate_fn=collate)


def split_items(items: List[CaptionItem], val_split: float, seed: int
                ) -> Tuple[List[CaptionItem], List[CaptionItem], str]:
    """(train, eval, eval split name). A split named in the data wins over ``val_split``.

    Data with splits: train on everything not ``val``/``test``; evaluate on
    ``val`` (``test`` when there is no ``val``). Without splits: a seeded random
    ``val_split`` fraction of the images; ``val_split`` 0 evaluates on the
    training images themselves (split name ``train``).
    """
    splits = {i.split for i in items if i.split}
    if splits & {"val", "test"}:
        name = "val" if "val" in splits else "test"
        train = [i for i in items if i.split not in ("val", "test")]
        return train, [i for i in items if i.split == name], name
    if not 0 <= val_split < 1:
        raise UsageError(f"--val-split must be in [0, 1), got {val_split}", "e.g. --val-split 0.1")
    if val_split == 0:
        return list(items), list(items), "train"
    n = len(items)
    n_val = min(max(1, int(round(n * val_split))), max(0, n - 2))
    if n_val < 1:
        return list(items), list(items), "train"
    perm = np.random.default_rng([seed, 3]).permutation(n)
    val_idx = set(int(i) for i in perm[:n_val])
    return ([it for k, it in enumerate(items) if k not in val_idx],
            [it for k, it in enumerate(items) if k in val_idx], "val")


# --------------------------------------------------------------------------- #
# Evaluation.
# --------------------------------------------------------------------------- #
def _normalise(lm_facts, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    from ..model.encode import normalise_pixels
    size, mean, std = lm_facts
    return normalise_pixels(images.to(device, non_blocking=device.type == "cuda"), mean, std)


@torch.no_grad()
def evaluate(model, tokenizer, items: Sequence[CaptionItem], facts, device: torch.device,
             amp: Optional[torch.dtype] = None, batch_size: int = 128, workers: int = 0,
             job: Optional[Job] = None) -> Dict[str, float]:
    """Retrieval metrics (engine.data.metrics) of ``model`` on ``items``: all captions count."""
    was_training = model.training
    model.eval()
    try:
        plan = [(it.path, "", None) for it in items]
        feats, kept = [], []
        for images, _, pos, _failed in _loader(PairDataset(plan, facts[0], (1.0, 1.0)),
                                               batch_size, workers):
            if job is not None:
                job.check()
            if images is None:
                continue
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                f = model.encode_image(_normalise(facts, images, device), normalize=True)
            feats.append(f.float())
            kept.extend(pos)
        if not feats:
            raise UsageError("no evaluation image could be read", "check the image files")
        img = F.normalize(torch.cat(feats), dim=-1)
        texts, owner = [], []
        for row, k in enumerate(kept):
            for c in items[k].captions:
                texts.append(c)
                owner.append(row)
        tfeats = []
        for i in range(0, len(texts), batch_size):
            if job is not None:
                job.check()
            tokens = tokenizer(texts[i:i + batch_size]).to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                tfeats.append(model.encode_text(tokens, normalize=True).float())
        txt = F.normalize(torch.cat(tfeats), dim=-1)
        return retrieval_metrics((img @ txt.t()).cpu(), owner)
    finally:
        model.train(was_training)


def evaluate_model(lm: LoadedModel, data: Union[str, Sequence[str]], image_root: Optional[str] = None,
                   batch_size: int = 128, workers: int = 0, progress: Optional[ProgressFn] = None,
                   cancel: Optional[CancelFlag] = None) -> Dict[str, float]:
    """Retrieval metrics of a loaded model on every image of a caption dataset."""
    cs = read_captions(data, image_root=image_root)
    items = check_images(cs.items, cs.skipped)
    if not items:
        raise UsageError("no usable image-caption pairs", "check the caption file and image paths")
    amp = None if lm.precision == "fp32" else lm.dtype
    return evaluate(lm.model, lm.tokenizer, items, (lm.image_size, lm.mean, lm.std), lm.device,
                    amp, batch_size, workers, Job(progress, cancel))
