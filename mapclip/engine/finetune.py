"""Contrastive fine-tuning of a CLIP model on image-caption pairs (RemoteCLIP's recipe).

One call, :func:`finetune`, reads a caption dataset (:mod:`engine.data.captions`),
holds out a validation split, evaluates retrieval before training, trains with
symmetric InfoNCE and the model's own learnable temperature, evaluates after
every epoch and keeps the best model by mean recall as a model folder that
:func:`engine.model.models.load_model` reads.

Training details
----------------
- Weights train in fp32; on CUDA the forward runs under autocast (bf16, or
  fp16 with a gradient scaler where bf16 is missing). The CPU trains in fp32.
- Loss: symmetric InfoNCE, ``(CE(s·I·Tᵀ) + CE(s·T·Iᵀ)) / 2`` with
  ``s = exp(logit_scale)``; ``logit_scale`` is clamped to ``[0, ln 100]``
  after every step, as CLIP does.
- One training unit is an *image*; each epoch picks one of its captions at
  random, so an image never meets itself as a negative in a batch.
- Augmentation (RemoteCLIP): random resized crop (area 50-100 %, aspect
  3/4-4/3), horizontal and vertical flips, rotations by multiples of 90°.
  Every sample's augmentation is drawn from its own seed, derived from
  (seed, epoch, position), so results do not depend on the worker count and a
  resumed run sees exactly the batches an uninterrupted run would.
- AdamW (betas 0.9/0.98, eps 1e-6); no weight decay on gains, biases,
  embeddings and the temperature. Learning rate: linear warm-up, then cosine
  decay to ``lr * min_lr_ratio``.
- Gradient accumulation (``accum`` > 1) builds one *contrastive* batch of
  ``batch_size * accum`` pairs: features of all micro-batches are computed
  first without gradients, then each micro-batch is recomputed with gradients
  against the cached features of the others, so the negatives are those of
  the large batch (the open_clip ``accum_freq`` scheme) at the memory of a
  small one.
- ``freeze`` ("text" / "vision") freezes one tower; ``unlock_last`` N trains
  only the last N blocks (plus the final norm and projection) of the towers
  that are not frozen. The temperature always trains.

The run folder
--------------
``RUN_DIR/run.json`` (settings and status), ``metrics.jsonl`` (one JSON object
per step, epoch and evaluation), ``last.pt`` (the training state after the
last completed epoch: model, optimizer, scaler, epoch, step, RNG states and
data order; plain tensors and dicts saved with ``torch.save`` and read back
with ``weights_only=True``) and ``best/`` (a model folder). Files are written
beside their final names and renamed into place.

A model spec ``ARCH:random`` (``ARCH`` an open_clip architecture, a JSON
model config file, or a model folder) trains that architecture from a random
initialisation seeded by ``seed``.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .data.captions import CaptionItem, SkipReport, check_images, read_captions
from .core.errors import MapClipError, ModelError, UsageError, reason
from .core.jobs import CancelFlag, Job, ProgressFn
from .core.options import FREEZE, FinetuneOptions, check  # noqa: F401
from .model.architectures import arch_config, build_model
from .model.models import OPENAI_MEAN, OPENAI_STD, LoadedModel, load_model, make_tokenizer, resolve_device, save_model_folder
from .model.presets import MODEL_CONFIG_FILE
from .model.specs import RANDOM_TAG, Resolved
from .data.metrics import retrieval_metrics
from .archive.format import LOCK
from .archive.writer import WriteLock

RUN_FILE = "run.json"
STATE_FILE = "last.pt"
METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"
STATE_FORMAT = 1
MAX_LOGIT_SCALE = math.log(100.0)
ADAM_BETAS = (0.9, 0.98)
ADAM_EPS = 1e-6
#: head parameters (after the last block) that --unlock-last keeps trainable
HEAD_NAMES = ("ln_post", "proj", "attnpool", "ln_final", "text_projection", "head", "pooler")
#: options that must match for --resume to continue a run
FINGERPRINT_FIELDS = ("model", "data", "image_root", "epochs", "batch_size", "accum", "lr",
                      "weight_decay", "warmup", "min_lr_ratio", "val_split", "freeze",
                      "unlock_last", "seed", "crop_scale")

MetricsFn = Callable[[Dict[str, Any]], None]


@dataclass
class FinetuneResult:
    """What a run produced; ``to_json`` is what ``--json`` prints."""

    run_dir: str
    best_path: Optional[str]
    best_epoch: int
    best_mean_recall: Optional[float]
    metrics_before: Dict[str, float]
    metrics_after: Dict[str, float]
    eval_split: str
    epochs: int
    epochs_run: int
    resumed_from_epoch: int
    steps: int
    train_images: int
    train_captions: int
    eval_images: int
    eval_texts: int
    samples_per_s: float
    seconds: float
    final_loss: Optional[float]
    skipped: SkipReport
    model: str
    device: str
    precision: str

    def to_json(self) -> Dict[str, Any]:
        out = asdict(self)
        out["skipped"] = self.skipped.to_json()
        return out


# --------------------------------------------------------------------------- #
# Model: load (or build at random), choose what trains, optimizer, schedule.
# --------------------------------------------------------------------------- #
def _random_init_config(arch: str) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """(arch name, model_cfg, preprocess_cfg) for ``ARCH:random``."""
    path = Path(arch).expanduser()
    if path.is_dir():
        path = path / MODEL_CONFIG_FILE
    if path.suffix.lower() == ".json" or path.is_file():
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"model config {path} does not exist", "check the path") from None
        except ValueError as exc:
            raise UsageError(f"model config {path} is not valid JSON ({exc})",
                             "give an open_clip model config (embed_dim, vision_cfg, text_cfg)") from None
        if isinstance(meta, dict) and isinstance(meta.get("model_cfg"), dict):  # a model folder's config
            name = meta.get("mapclip", {}).get("arch") or path.parent.name
            return name, meta["model_cfg"], meta.get("preprocess_cfg", {}) or {}
        if not (isinstance(meta, dict) and "vision_cfg" in meta and "text_cfg" in meta):
            raise UsageError(f"{path} is not an open_clip model config",
                             "it needs embed_dim, vision_cfg and text_cfg")
        return path.stem, meta, {}
    return arch, arch_config(arch), {}


def load_base_model(spec: str, seed: int = 0, device: Optional[str] = None) -> LoadedModel:
    """The model to fine-tune, fp32 on ``device``: ``load_model(spec)`` or ``ARCH:random``."""
    arch, sep, tag = str(spec).rpartition(":")
    if not (sep and tag == RANDOM_TAG and arch):
        return load_model(spec, device=device, precision="fp32")
    name, cfg, pre = _random_init_config(arch)
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = build_model(cfg)
        except MapClipError:
            raise
        except Exception as exc:
            raise ModelError(f"cannot build architecture {name} ({exc})",
                             "check the model config") from None
    model = model.to(dev, dtype=torch.float32).eval()
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return LoadedModel(model=model, tokenizer=make_tokenizer(Resolved(name, cfg, pre, None)), spec=spec,
                       arch=name, image_size=size, mean=tuple(pre.get("mean") or OPENAI_MEAN),
                       std=tuple(pre.get("std") or OPENAI_STD), embed_dim=int(cfg.get("embed_dim", 0)),
                       device=dev, precision="fp32", model_cfg=cfg)


def _tower(name: str) -> str:
    if name in ("logit_scale", "logit_bias"):
        return "scale"
    return "vision" if name.startswith("visual.") else "text"


def _block_index(name: str) -> Optional[int]:
    m = re.search(r"(?:resblocks|\.layer)\.(\d+)\.", name)
    if m:
        return int(m.group(1))
    m = re.match(r"visual\.layer(\d+)\.", name)  # ModifiedResNet stages
    return int(m.group(1)) - 1 if m else None


def set_trainable(model, freeze: str = "none", unlock_last: int = 0) -> Dict[str, int]:
    """Set ``requires_grad`` per parameter; returns trainable counts per tower."""
    if freeze not in FREEZE:
        raise UsageError(f"unknown --freeze {freeze!r}", "use none, text or vision")
    if unlock_last < 0:
        raise UsageError("--unlock-last must be 0 (everything) or a positive number of blocks",
                         "e.g. --unlock-last 2")
    named = list(model.named_parameters())
    n_blocks: Dict[str, int] = {}
    for name, _ in named:
        idx = _block_index(name)
        if idx is not None:
            n_blocks[_tower(name)] = max(n_blocks.get(_tower(name), 0), idx + 1)
    counts = {"vision": 0, "text": 0, "scale": 0}
    for name, p in named:
        tower = _tower(name)
        train = tower == "scale" or tower != freeze
        if train and tower != "scale" and unlock_last and unlock_last < n_blocks.get(tower, 0):
            idx = _block_index(name)
            if idx is not None:
                train = idx >= n_blocks[tower] - unlock_last
            else:
                train = any(h in name for h in HEAD_NAMES)
        p.requires_grad_(train)
        if train:
            counts[tower] += p.numel()
    if not counts["vision"] and not counts["text"]:
        raise UsageError("nothing left to train", "freeze at most one tower")
    return counts


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "embedding" in name or "logit_scale" in name or "logit_bias" in name


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no decay on gains, biases, embeddings and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def lr_at(step: int, total: int, base: float, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``base*min_ratio``."""
    if warmup_steps and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    span = max(1, total - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def resolve_amp(device: torch.device, precision: Optional[str]) -> Optional[torch.dtype]:
    """The autocast dtype (None: plain fp32) for a device and a --precision."""
    if precision in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise UsageError("fp16 training needs CUDA", "use --precision fp32 or bf16 on this device")
        return torch.float16
    raise UsageError(f"unknown precision {precision!r}", "use fp32, bf16 or fp16")


# --------------------------------------------------------------------------- #
# The training step (also what bench/bench_finetune.py times).
# --------------------------------------------------------------------------- #
def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over normalised features; pair i is the positive of row i."""
    logits = logit_scale.exp() * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _features(model, images: torch.Tensor, tokens: torch.Tensor, amp: Optional[torch.dtype],
              grad_vision: bool, grad_text: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    dev_type = images.device.type
    with torch.autocast(dev_type, dtype=amp or torch.float32, enabled=amp is not None):
        with torch.set_grad_enabled(grad_vision and torch.is_grad_enabled()):
            img = model.encode_image(images, normalize=True)
        with torch.set_grad_enabled(grad_text and torch.is_grad_enabled()):
            txt = model.encode_text(tokens, normalize=True)
    return img.float(), txt.float()


def train_step(model, optimizer, micro: Sequence[Tuple[torch.Tensor, torch.Tensor]],
               amp: Optional[torch.dtype] = None, scaler=None, grad_vision: bool = True,
               grad_text: bool = True, check: Optional[Callable[[], None]] = None) -> float:
    """One optimizer step over ``micro`` (list of (images, tokens)); returns the loss.

    With one micro-batch this is plain InfoNCE; with several, the contrastive
    batch is all of them (cached features, see the module doc). ``check`` is
    called between micro-batches (cancellation).
    """
    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if len(micro) == 1:
        img, txt = _features(model, *micro[0], amp, grad_vision, grad_text)
        loss = contrastive_loss(img, txt, model.logit_scale)
        backward(loss)
        value = float(loss.detach())
    else:
        with torch.no_grad():
            cached = [_features(model, x, t, amp, grad_vision, grad_text) for x, t in micro]
        value = 0.0
        for j, (x, t) in enumerate(micro):
            if check is not None:
                check()
            img_j, txt_j = _features(model, x, t, amp, grad_vision, grad_text)
            imgs = torch.cat([c[0] for c in cached[:j]] + [img_j] + [c[0] for c in cached[j + 1:]])
            txts = torch.cat([c[1] for c in cached[:j]] + [txt_j] + [c[1] for c in cached[j + 1:]])
            # the temperature's gradient is counted once, not once per micro-batch
            scale = model.logit_scale if j == 0 else model.logit_scale.detach()
            loss = contrastive_loss(imgs, txts, scale)
            backward(loss)
            if j == 0:
                value = float(loss.detach())
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return value


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
    from .model.encode import normalise_pixels
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


# --------------------------------------------------------------------------- #
# The run folder: identity, refusal rules, atomic writes, training state.
# --------------------------------------------------------------------------- #
def _images_digest(o: FinetuneOptions, data: List[str]) -> Dict[str, Optional[str]]:
    """Each training image's size and SHA-256 (its first 16 hex digits), by path: a
    run resumed after its images were replaced, its captions unchanged, would
    train on other data. The bytes are hashed, not the modification time, so a
    copied data set (new times, same bytes) still resumes."""
    from .data.captions import file_digest
    try:
        cs = read_captions(data, image_root=o.image_root, strict=False, check_exists=False)
    except UsageError:
        return {}                     # the caption file itself is refused where it is read
    out: Dict[str, Optional[str]] = {}
    for item in cs.items:
        try:
            out[item.path] = f"{os.path.getsize(item.path)}:{file_digest(item.path)[:16]}"
        except OSError:
            out[item.path] = None
    return out


def _fingerprint(o: FinetuneOptions, data: List[str]) -> Dict[str, Any]:
    fp = {k: getattr(o, k) for k in FINGERPRINT_FIELDS}
    fp["data"] = data
    from .data.captions import caption_files_digest
    fp["data_sha256"] = caption_files_digest(data)   # a changed caption file is another run
    fp["images"] = _images_digest(o, data)           # and so is a replaced image
    fp["crop_scale"] = list(o.crop_scale)
    fp["image_root"] = str(Path(o.image_root).expanduser().resolve()) if o.image_root else None
    return fp


def options_from_run(run_dir: Union[str, os.PathLike], **overrides: Any) -> FinetuneOptions:
    """The options of the run in ``run_dir`` (for resuming it), with ``overrides``."""
    run = _read_run(Path(run_dir).expanduser())
    if run is None:
        raise UsageError(f"{run_dir} holds no run", "give the folder a run was started in")
    fp = dict(run["fingerprint"])
    fp["crop_scale"] = tuple(fp.get("crop_scale") or (0.5, 1.0))
    known = set(FinetuneOptions.__dataclass_fields__)
    values = {k: v for k, v in fp.items() if k in known}
    values.update(out=str(run_dir), resume=True)
    values.update(overrides)
    return FinetuneOptions(**values)


def _write_json(path: Path, obj: Any) -> None:
    part = path.with_name(path.name + ".part")
    try:
        part.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def _read_run(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(run, dict) or "fingerprint" not in run:
            raise ValueError("no fingerprint")
        return run
    except ValueError as exc:
        raise UsageError(f"{path} is damaged ({exc})", "choose a new --out for a new run") from None


def _check_run_dir(run_dir: Path, fingerprint: Dict[str, Any], resume: bool) -> Optional[Dict[str, Any]]:
    """Refuse to mix runs; returns the existing run record when resuming."""
    run = _read_run(run_dir)
    if resume:
        if run is None:
            raise UsageError(f"{run_dir} holds no run to resume", "drop --resume to start a new run there")
        diffs = [f"{k}: {run['fingerprint'].get(k)!r} -> {fingerprint.get(k)!r}"
                 for k in fingerprint if run["fingerprint"].get(k) != fingerprint.get(k)
                 and k not in ("data_sha256", "images")]
        old_sha = run["fingerprint"].get("data_sha256")
        if old_sha is not None and old_sha != fingerprint.get("data_sha256"):
            changed = [d for d, a, b in zip(fingerprint["data"], old_sha,
                                            fingerprint["data_sha256"]) if a != b]
            raise UsageError(f"the caption file {', '.join(changed) or 'list'} changed since the "
                             f"run in {run_dir} started: resuming would train on other data",
                             "restore the caption file as it was, or start a new run with "
                             "another --out")
        old_images, images = run["fingerprint"].get("images"), fingerprint.get("images") or {}
        if old_images is not None and old_images != images:
            changed = sorted(k for k in set(old_images) | set(images)
                             if old_images.get(k) != images.get(k))
            raise UsageError(f"{len(changed)} training image(s) changed since the run in {run_dir} "
                             f"started ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}"
                             "): resuming would train on other data",
                             "restore the images as they were, or start a new run with another "
                             "--out")
        if diffs:
            raise UsageError(f"{run_dir} holds a run with other settings ({'; '.join(diffs)})",
                             "resume with the settings of that run, or choose a new --out")
        if run.get("status") == "finished":
            raise UsageError(f"{run_dir} holds a finished run (best model in {run_dir / BEST_DIR})",
                             "choose a new --out to train again")
        return run
    if run is not None:
        if run.get("status") == "finished":
            raise UsageError(f"{run_dir} already holds a finished run",
                             "choose a new --out (the finished run's model is in "
                             f"{run_dir / BEST_DIR})")
        done = run.get("epochs_done", 0)
        raise UsageError(f"{run_dir} holds an unfinished run ({done} of "
                         f"{run['fingerprint'].get('epochs')} epochs done)",
                         "pass --resume to continue it, or choose a new --out")
    if run_dir.exists() and (not run_dir.is_dir() or any(p.name != LOCK for p in run_dir.iterdir())):
        raise UsageError(f"{run_dir} exists and is not an empty folder",
                         "choose a new or empty folder for --out")
    return None


def _rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:
            pass  # another number of GPUs: nothing random runs on them here


def save_state(path: Path, state: Dict[str, Any]) -> None:
    """torch.save of plain tensors/dicts beside ``path``, then renamed into place."""
    part = path.with_name(path.name + ".part")
    try:
        torch.save(state, str(part))
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def load_state(path: Path) -> Dict[str, Any]:
    """Read a training state; untrusted input, so weights_only and checked keys."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read training state {path} ({reason(exc)})",
                         "the file is damaged or not a MapCLIP training state; start a new run") from None
    need = ("format", "model", "optimizer", "epoch", "step", "rng", "best", "metrics_offset")
    if not isinstance(state, dict) or any(k not in state for k in need) or state["format"] != STATE_FORMAT:
        raise UsageError(f"{path} is not a MapCLIP training state (format {STATE_FORMAT})",
                         "start a new run with a new --out")
    return state


def _save_best(run_dir: Path, lm: LoadedModel, model, extra: Dict[str, Any]) -> Path:
    """Write best/ as a model folder: best.part/ first, then swapped into place."""
    final = run_dir / BEST_DIR
    part = run_dir / (BEST_DIR + ".part")
    old = run_dir / (BEST_DIR + ".old")
    shutil.rmtree(part, ignore_errors=True)
    extra = dict(extra, defaults=lm.defaults.to_json())  # the base model's search defaults carry over
    try:
        save_model_folder(model, lm.model_cfg, part, lm.arch, mean=lm.mean, std=lm.std, extra=extra)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)  # a full disk leaves no half-written folder
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(part, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _recover_best(run_dir: Path) -> None:
    """After a crash between the two renames of _save_best, put best/ back."""
    final, old = run_dir / BEST_DIR, run_dir / (BEST_DIR + ".old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    shutil.rmtree(run_dir / (BEST_DIR + ".part"), ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- #
# The run.
# --------------------------------------------------------------------------- #
def _check_options(o: FinetuneOptions) -> None:
    for name in ("epochs", "batch_size", "accum", "eval_batch_size"):
        if int(getattr(o, name)) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(o, name)}",
                             f"e.g. --{name.replace('_', '-')} 1")
    if o.batch_size * o.accum < 2:
        raise UsageError("a contrastive batch needs at least 2 pairs",
                         "use --batch-size 2 or more (or --accum 2)")
    if not o.lr > 0:
        raise UsageError(f"--lr must be positive, got {o.lr}", "e.g. --lr 1e-5")
    if not 0 <= o.warmup < 1:
        raise UsageError(f"--warmup is a fraction of all steps in [0, 1), got {o.warmup}", "e.g. 0.05")
    lo, hi = o.crop_scale
    if not 0 < lo <= hi <= 1:
        raise UsageError(f"crop scale must satisfy 0 < min <= max <= 1, got {o.crop_scale}",
                         "e.g. (0.5, 1.0)")
    if o.workers < 0:
        raise UsageError("--workers must be 0 or more", "0 decodes in the main process")


class RunLock(WriteLock):
    """The trainer's lock on its run folder (RUN_DIR/.lock holding its pid): a second
    trainer on the same folder (a --resume while the run still trains) is refused instead
    of training the same epochs again. A lock whose process has ended is taken over."""

    def __enter__(self) -> "RunLock":
        try:
            return super().__enter__()
        except UsageError:
            try:
                pid = int(self.path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            who = f"process {pid}" if pid else "another process"
            raise UsageError(f"the run in {self.path.parent} is still training ({who})",
                             "wait for it to finish (or stop it), then continue it with --resume; "
                             "or choose a new --out") from None


def finetune(options: FinetuneOptions, progress: Optional[ProgressFn] = None,
             cancel: Optional[CancelFlag] = None,
             on_metrics: Optional[MetricsFn] = None) -> FinetuneResult:
    """Fine-tune ``options.model`` on ``options.data`` into ``options.out`` (see module doc).

    ``progress(done, total)`` counts optimizer steps over the whole run;
    ``cancel`` stops within one (micro-)batch, leaving the last completed
    epoch's state for ``resume=True``; ``on_metrics`` receives every record
    written to metrics.jsonl (steps, epochs, evaluations). The run folder is
    locked while it trains (:class:`RunLock`).
    """
    run_dir = Path(options.out).expanduser()
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return _finetune(options, progress, cancel, on_metrics)  # the run's own checks say why
    try:
        with RunLock(run_dir):
            return _finetune(options, progress, cancel, on_metrics)
    finally:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()                 # a new run refused before it began leaves no folder


def _finetune(options: FinetuneOptions, progress: Optional[ProgressFn],  # long: one resumable loop
              cancel: Optional[CancelFlag], on_metrics: Optional[MetricsFn]) -> FinetuneResult:
    o = options
    _check_options(o)
    t_start = time.perf_counter()
    job = Job(progress, cancel)
    data = [o.data] if isinstance(o.data, (str, os.PathLike)) else list(o.data)
    data = [str(Path(d).expanduser().resolve()) for d in data]
    run_dir = Path(o.out).expanduser()
    fingerprint = _fingerprint(o, data)
    run = _check_run_dir(run_dir, fingerprint, o.resume)

    # ---- data
    cs = read_captions(data, image_root=o.image_root, strict=o.strict)
    skipped = cs.skipped
    items = check_images(cs.items, skipped, strict=o.strict, job=job)
    if not items:
        raise UsageError(f"no usable image-caption pairs in {', '.join(data)} ({skipped.summary()})",
                         "check the image paths: relative paths resolve against the caption "
                         "file's folder (or --images DIR)")
    train_items, eval_items, eval_split = split_items(items, o.val_split, o.seed)
    if len(train_items) < 2:
        raise UsageError(f"only {len(train_items)} training image(s) left after the split",
                         "add image-caption pairs, or lower --val-split")
    eff = o.batch_size * o.accum
    if len(train_items) >= eff:
        steps_per_epoch, used = len(train_items) // eff, (len(train_items) // eff) * eff
    else:
        steps_per_epoch, used = 1, len(train_items)
    total_steps = steps_per_epoch * o.epochs
    warmup_steps = int(round(o.warmup * total_steps))

    # ---- model
    lm = load_base_model(o.model, o.seed, o.device)
    device = lm.device
    amp = resolve_amp(device, o.precision)
    model = lm.model.float()
    trainable = set_trainable(model, o.freeze, o.unlock_last)

    def train_mode() -> None:
        model.train()
        if o.freeze == "vision":
            model.visual.eval()  # keeps batch-norm statistics of a frozen ResNet tower
    grad_vision, grad_text = trainable["vision"] > 0, trainable["text"] > 0
    optimizer = make_optimizer(model, o.lr, o.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    facts = (lm.image_size, lm.mean, lm.std)
    prec_name = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[amp]

    # ---- state: fresh or resumed
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / METRICS_FILE
    start_epoch, step = 0, 0
    best = {"epoch": 0, "mean_recall": None}
    before: Optional[Dict[str, float]] = None
    after: Dict[str, float] = {}
    if run is not None and (run_dir / STATE_FILE).is_file():
        _recover_best(run_dir)
        state = load_state(run_dir / STATE_FILE)
        try:
            model.load_state_dict(state["model"], strict=True)
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UsageError(f"the training state in {run_dir} does not fit this model "
                             f"({reason(exc)})", "start a new run with a new --out") from None
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best = dict(state["best"])
        before = dict(state.get("before") or {}) or None
        after = dict(state.get("after") or {})
        _set_rng_state(state["rng"])
        with open(metrics_path, "a+b") as fh:  # drop records of the unfinished epoch
            fh.truncate(int(state["metrics_offset"]))
        del state
    else:
        torch.manual_seed(o.seed)
        random.seed(o.seed)
        np.random.seed(o.seed % 2 ** 32)
        metrics_path.write_text("", encoding="utf-8")
    run_record = {"fingerprint": fingerprint, "status": "running", "epochs_done": start_epoch,
                  "model": o.model, "arch": lm.arch, "eval_split": eval_split}
    _write_json(run_dir / RUN_FILE, run_record)

    def emit(record: Dict[str, Any]) -> None:
        with open(metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if on_metrics is not None:
            on_metrics(dict(record))

    job.done = step
    job.set_total(total_steps)
    if before is None:
        before = evaluate(model, lm.tokenizer, eval_items, facts, device, amp,
                          o.eval_batch_size, o.workers, job)
        emit(dict(type="eval", epoch=0, split=eval_split, **before))
    train_seconds, train_samples, last_loss = 0.0, 0, None
    for epoch in range(start_epoch, o.epochs):
        train_mode()
        order, plan = epoch_plan(train_items, o.seed, epoch, used)
        loader = _loader(PairDataset(plan, lm.image_size, o.crop_scale), o.batch_size, o.workers)
        losses, micro = [], []
        t_epoch = time.perf_counter()
        batches = iter(loader)
        n_micro = math.ceil(used / o.batch_size)
        for k in range(n_micro):
            job.check()
            images, captions, _pos, failed = next(batches)
            for f in failed:
                skipped.add("unreadable_image", f, o.strict)
            if images is not None and len(captions) > 0:
                tokens = lm.tokenizer(captions).to(device)
                micro.append((_normalise(facts, images, device), tokens))
            if len(micro) == o.accum or k == n_micro - 1:
                n_pairs = sum(m[0].shape[0] for m in micro)
                if n_pairs >= 2:
                    t0 = time.perf_counter()
                    for g in optimizer.param_groups:
                        g["lr"] = lr_at(step, total_steps, o.lr, warmup_steps, o.min_lr_ratio)
                    loss = train_step(model, optimizer, micro, amp, scaler, grad_vision, grad_text,
                                      check=job.check)
                    dt = time.perf_counter() - t0
                    train_samples += n_pairs
                    losses.append(loss)
                    last_loss = loss
                    emit({"type": "step", "epoch": epoch + 1, "step": step + 1, "loss": loss,
                          "lr": optimizer.param_groups[0]["lr"],
                          "temperature": float(model.logit_scale.detach().exp()),
                          "step_samples_per_s": n_pairs / dt if dt > 0 else None})
                step += 1
                micro = []
                job.step()
        del batches, loader
        epoch_seconds = time.perf_counter() - t_epoch
        train_seconds += epoch_seconds
        emit({"type": "epoch", "epoch": epoch + 1, "step": step,
              "loss": float(np.mean(losses)) if losses else None, "seconds": epoch_seconds})
        after = evaluate(model, lm.tokenizer, eval_items, facts, device, amp,
                         o.eval_batch_size, o.workers, job)
        emit(dict(type="eval", epoch=epoch + 1, split=eval_split, **after))
        if best["mean_recall"] is None or after["mean_recall"] > best["mean_recall"]:
            best = {"epoch": epoch + 1, "mean_recall": after["mean_recall"]}
            _save_best(run_dir, lm, model, {"finetuned_from": o.model, "epoch": epoch + 1,
                                            "eval_split": eval_split, "metrics": after})
        save_state(run_dir / STATE_FILE, {
            "format": STATE_FORMAT, "epoch": epoch + 1, "step": step,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "scheduler": {"step": step, "total": total_steps, "warmup": warmup_steps},
            "rng": _rng_state(), "data_order": torch.from_numpy(order.astype(np.int64)),
            "best": best, "before": before, "after": after,
            "metrics_offset": metrics_path.stat().st_size})
        run_record["epochs_done"] = epoch + 1
        _write_json(run_dir / RUN_FILE, run_record)

    result = FinetuneResult(
        run_dir=str(run_dir), best_path=str(run_dir / BEST_DIR) if best["epoch"] else None,
        best_epoch=int(best["epoch"]), best_mean_recall=best["mean_recall"],
        metrics_before=before or {}, metrics_after=after, eval_split=eval_split, epochs=o.epochs,
        epochs_run=o.epochs - start_epoch, resumed_from_epoch=start_epoch, steps=step,
        train_images=len(train_items), train_captions=sum(len(i.captions) for i in train_items),
        eval_images=len(eval_items), eval_texts=sum(len(i.captions) for i in eval_items),
        samples_per_s=train_samples / train_seconds if train_seconds else 0.0,
        seconds=time.perf_counter() - t_start, final_loss=last_loss, skipped=skipped,
        model=o.model, device=str(device), precision=prec_name)
    run_record.update(status="finished", result=result.to_json())
    _write_json(run_dir / RUN_FILE, run_record)
    return result
