"""The model side of fine-tuning: the base model (or a random init), what trains, AdamW,
the schedule, autocast, the losses and one optimizer step."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core.errors import MapClipError, ModelError, UsageError
from ..core.options import FREEZE
from ..model.architectures import arch_config, build_model
from ..model.models import OPENAI_MEAN, OPENAI_STD, LoadedModel, load_model, make_tokenizer, resolve_device
from ..model.presets import MODEL_CONFIG_FILE
from ..model.specs import RANDOM_TAG, Resolved

MAX_LOGIT_SCALE = math.log(100.0)
ADAM_BETAS = (0.9, 0.98)
ADAM_EPS = 1e-6
#: head parameters (after the last block) that --unlock-last keeps trainable
HEAD_NAMES = ("ln_post", "proj", "attnpool", "ln_final", "text_projection", "head", "pooler")


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


def affiliation_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """PIR's cluster-wise affiliation loss: each image against the text centres of the batch's
    classes and each text against the image centres (the centre of row i's class is the
    positive of row i), the reference's ``ClipLoss.get_aff_logits`` in matrix form."""
    same = (labels[:, None] == labels[None, :]).to(img.dtype)
    count = same.sum(dim=1, keepdim=True)
    img_centres, txt_centres = (same @ img) / count, (same @ txt) / count
    scale = logit_scale.exp()
    targets = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(scale * img @ txt_centres.t(), targets)
            + F.cross_entropy(scale * txt @ img_centres.t(), targets)) / 2


def recipe_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                labels: Optional[torch.Tensor] = None, cal_weight: Optional[float] = None) -> torch.Tensor:
    """InfoNCE (recipe clip); plus ``cal_weight`` x the affiliation loss (recipe pir, the
    reference sums the two)."""
    loss = contrastive_loss(img, txt, logit_scale)
    if cal_weight is not None:
        loss = loss + cal_weight * affiliation_loss(img, txt, labels, logit_scale)
    return loss


def _features(model, images: torch.Tensor, tokens: torch.Tensor, amp: Optional[torch.dtype],
              grad_vision: bool, grad_text: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    dev_type = images.device.type
    with torch.autocast(dev_type, dtype=amp or torch.float32, enabled=amp is not None):
        with torch.set_grad_enabled(grad_vision and torch.is_grad_enabled()):
            img = model.encode_image(images, normalize=True)
        with torch.set_grad_enabled(grad_text and torch.is_grad_enabled()):
            txt = model.encode_text(tokens, normalize=True)
    return img.float(), txt.float()


def optimizer_step(optimizer, scaler) -> None:
    """One optimizer step (through the fp16 grad scaler where there is one), gradients cleared."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(model, optimizer, micro: Sequence[Tuple[torch.Tensor, ...]],
               amp: Optional[torch.dtype] = None, scaler=None, grad_vision: bool = True,
               grad_text: bool = True, check: Optional[Callable[[], None]] = None,
               cal_weight: Optional[float] = None) -> float:
    """One optimizer step over ``micro`` (list of (images, tokens) or, recipe pir,
    (images, tokens, scene labels)); returns the loss.

    With one micro-batch this is plain InfoNCE (plus ``cal_weight`` x the affiliation
    loss when given); with several, the contrastive batch is all of them (cached
    features, see the package doc). ``check`` is called between micro-batches
    (cancellation).
    """
    labels = torch.cat([m[2] for m in micro]) if cal_weight is not None else None
    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if len(micro) == 1:
        img, txt = _features(model, *micro[0][:2], amp, grad_vision, grad_text)
        loss = recipe_loss(img, txt, model.logit_scale, labels, cal_weight)
        backward(loss)
        value = float(loss.detach())
    else:
        with torch.no_grad():
            cached = [_features(model, m[0], m[1], amp, grad_vision, grad_text) for m in micro]
        value = 0.0
        for j, (x, t, *_) in enumerate(micro):
            if check is not None:
                check()
            img_j, txt_j = _features(model, x, t, amp, grad_vision, grad_text)
            imgs = torch.cat([c[0] for c in cached[:j]] + [img_j] + [c[0] for c in cached[j + 1:]])
            txts = torch.cat([c[1] for c in cached[:j]] + [txt_j] + [c[1] for c in cached[j + 1:]])
            # the temperature's gradient is counted once, not once per micro-batch
            scale = model.logit_scale if j == 0 else model.logit_scale.detach()
            loss = recipe_loss(imgs, txts, scale, labels, cal_weight)
            backward(loss)
            if j == 0:
                value = float(loss.detach())
    optimizer_step(optimizer, scaler)
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return value
