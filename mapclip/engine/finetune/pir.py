"""PIR's recipe (``--recipe pir``): scene labels, the prior scene classifier, its checkpoint.

PIR-CLIP (engine.model.pir) instructs the image tower with a remote-sensing scene classifier's
output. The recipe:

1. reads each training image's scene class from the caption file (a ``label`` or ``class``
   column; JSON/JSONL: a ``label``/``class`` key) and refuses data without them;
2. turns the base CLIP into PIR-CLIP (the prior and its projection added, seeded);
3. trains the prior as a scene classifier (its pooled output through a linear head,
   cross-entropy on the scene classes) on the same training images, or loads it from
   ``--pir-prior FILE``; the classifier is kept as ``RUN_DIR/prior.safetensors``;
4. trains the whole model with InfoNCE plus the cluster-wise affiliation loss
   (engine.finetune.train.affiliation_loss), as the reference code does.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import UsageError, reason
from ..core.jobs import Job
from ..core.options import FinetuneOptions
from ..data.captions import CaptionItem
from ..model.models import LoadedModel
from ..model.specs import RANDOM_TAG
from ..model.pir import add_prior, has_prior, pir_config
from .data import PairDataset, _loader, _normalise, epoch_plan
from .train import lr_at, make_optimizer, optimizer_step

PRIOR_FILE = "prior.safetensors"
PRIOR_FORMAT = "mapclip-pir-prior-1"
#: key prefixes of a prior's weights: MapCLIP's prior file, a PIR model folder, PIR-CLIP's code
PRIOR_PREFIXES = ("prior.", "visual.prior.", "module.res_visual.", "res_visual.")
#: the first stage's epoch plans are drawn apart from the main training's
_PRIOR_SALT = 1_000_003


def scene_label(item: CaptionItem, source: str = "column") -> Optional[str]:
    """An image's scene class: its label/class column, or (``source`` "filename") its file
    name's part before the first "_", as PIR-CLIP's code derives it (``airport_12.tif``)."""
    if source == "filename":
        name = Path(item.path).name
        return name.split("_")[0] if "_" in name else None
    return str(item.label) if item.label else None


def scene_classes(items: Sequence[CaptionItem], source: str = "column") -> List[str]:
    """The sorted scene classes of ``items``; a clear error when some image has none."""
    missing = [it for it in items if not scene_label(it, source)]
    if missing and source == "filename":
        raise UsageError(f"--pir-labels filename takes the scene class from the file name's part "
                         f"before the first \"_\"; {len(missing)} of {len(items)} file names have "
                         f"none (e.g. {Path(missing[0].path).name})",
                         "name the images CLASS_N.ext (as RSITMD's airport_12.tif), or give a "
                         "`label` column and --pir-labels column")
    if missing:
        raise UsageError(f"--recipe pir needs each training image's scene class; {len(missing)} of "
                         f"{len(items)} images have none (e.g. {missing[0].path})",
                         "add a `label` (or `class`) column to the caption file naming each "
                         "image's scene class (JSON/JSONL: a \"label\" key), or pass --pir-labels "
                         "filename when the file names start with it (airport_12.tif), or use "
                         "--recipe clip")
    classes = sorted({scene_label(it, source) for it in items})
    if len(classes) < 2:
        raise UsageError(f"--recipe pir needs at least two scene classes, the data names "
                         f"{len(classes)} ({', '.join(classes)})",
                         "label the images with their scene classes, or use --recipe clip")
    return classes


def prepare_model(lm: LoadedModel, o: FinetuneOptions) -> bool:
    """Make ``lm`` a PIR model (in place); returns whether its prior still needs training.

    A base model that is already PIR keeps its prior unless it is a random initialisation;
    ``--pir-prior`` replaces the prior with the file's.
    """
    random_init = str(o.model).rpartition(":")[2] == RANDOM_TAG
    fresh = not has_prior(lm.model)
    if fresh:
        cfg = pir_config(lm.model_cfg)
        if o.pir_prior:
            cfg = dict(cfg, **(prior_metadata(o.pir_prior).get("pir_cfg") or {}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(o.seed) + 1)
            add_prior(lm.model, cfg)
        lm.model = lm.model.to(lm.device, dtype=torch.float32)
        lm.model_cfg = dict(lm.model_cfg, pir_cfg=cfg)
    if o.pir_prior:
        load_prior(o.pir_prior, lm.model.visual.prior)
        return False
    return fresh or random_init


# --------------------------------------------------------------------------- #
# The prior's file.
# --------------------------------------------------------------------------- #
def _prior_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (PRIOR_FILE, "open_clip_model.safetensors"):
            if (p / name).is_file():
                return p / name
        raise UsageError(f"{p} holds no prior ({PRIOR_FILE}) and no model weights",
                         f"give --pir-prior a {PRIOR_FILE} written by a --recipe pir run, or a PIR "
                         "model folder")
    if not p.is_file():
        raise UsageError(f"the prior checkpoint {p} does not exist", "check the --pir-prior path")
    return p


def prior_metadata(path: str) -> Dict[str, Any]:
    """What a MapCLIP prior file says about itself (pir_cfg, classes); {} for other files."""
    p = _prior_path(path)
    if p.suffix != ".safetensors":
        return {}
    from safetensors import safe_open
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - a damaged file: said where it is read
        raise UsageError(f"cannot read the prior checkpoint {p} ({reason(exc)})",
                         "give a prior written by a --recipe pir run (RUN_DIR/prior.safetensors)") from None
    if meta.get("format") != PRIOR_FORMAT:
        return {}
    return {k: json.loads(v) for k, v in meta.items() if k in ("pir_cfg", "classes", "accuracy")}


def _read_weights(p: Path) -> Dict[str, torch.Tensor]:
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - an untrusted file: one clear error
        raise UsageError(f"cannot read the prior checkpoint {p} ({reason(exc)})",
                         "give a .safetensors prior or a checkpoint torch.load reads with "
                         "weights_only=True") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise UsageError(f"{p} is not a state dict", "give a prior checkpoint (a dict of tensors)")
    return sd


def load_prior(path: str, prior: torch.nn.Module) -> None:
    """Load a prior's weights into ``prior`` (shapes checked, nothing else read)."""
    p = _prior_path(path)
    sd = _read_weights(p)
    own = prior.state_dict()
    for prefix in PRIOR_PREFIXES:
        found = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if found:
            break
    else:
        raise UsageError(f"{p} holds no scene-classifier weights (no keys starting with "
                         f"{', '.join(PRIOR_PREFIXES)})",
                         f"give a {PRIOR_FILE} written by a --recipe pir run, a PIR model folder, or "
                         "a PIR-CLIP checkpoint")
    missing = sorted(set(own) - set(found))
    wrong = sorted(k for k in set(own) & set(found) if tuple(own[k].shape) != tuple(found[k].shape))
    if missing or wrong:
        what = (f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else
                f"{wrong[0]} is {tuple(found[wrong[0]].shape)}, the model's prior needs "
                f"{tuple(own[wrong[0]].shape)}")
        raise UsageError(f"the prior in {p} does not fit this model ({what})",
                         "give a prior trained for this model's size, or leave out --pir-prior to "
                         "train one first")
    prior.load_state_dict({k: found[k] for k in own}, strict=True)


def save_prior(path: Path, prior: torch.nn.Module, head: torch.nn.Module, classes: List[str],
               pir_cfg: Dict[str, Any], accuracy: Optional[float]) -> Path:
    """The scene classifier (prior + head) as safetensors with its config; renamed into place."""
    from safetensors.torch import save_file
    sd = {f"prior.{k}": v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}
    sd.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    meta = {"format": PRIOR_FORMAT, "pir_cfg": json.dumps(pir_cfg), "classes": json.dumps(classes),
            "accuracy": json.dumps(accuracy)}
    part = path.with_name(path.name + ".part")
    try:
        save_file(sd, str(part), metadata=meta)
        os.chmod(part, 0o644)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- #
# The first stage: the prior as a scene classifier.
# --------------------------------------------------------------------------- #
def prior_steps(n_items: int, o: FinetuneOptions) -> int:
    """Optimizer steps of the first stage."""
    return int(o.pir_prior_epochs) * max(1, math.ceil(n_items / int(o.batch_size)))


def train_prior(model, items: Sequence[CaptionItem], classes: List[str], o: FinetuneOptions,
                facts: Tuple[Any, ...], device: torch.device, amp: Optional[torch.dtype], job: Job,
                emit: Callable[[Dict[str, Any]], None]) -> Tuple[torch.nn.Module, Optional[float]]:
    """Train ``model.visual.prior`` with a linear head on the scene classes; returns the head
    and the last epoch's training accuracy (percent)."""
    prior = model.visual.prior
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(o.seed) + 2)
        head = torch.nn.Linear(int(prior.output_dim), len(classes)).to(device)
    pair = torch.nn.ModuleDict({"prior": prior, "head": head})
    optimizer = make_optimizer(pair, o.pir_prior_lr, o.decay)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    index = {name: i for i, name in enumerate(classes)}
    label_of = {it.path: scene_label(it, o.pir_labels) for it in items}
    per_epoch = max(1, math.ceil(len(items) / int(o.batch_size)))
    total, step, accuracy = per_epoch * int(o.pir_prior_epochs), 0, None
    warmup = int(round(o.warmup * total))
    was_training = pair.training
    needs_grad = [q.requires_grad for q in prior.parameters()]
    pair.train().requires_grad_(True)        # the first stage trains the prior even if frozen later
    try:
        for epoch in range(int(o.pir_prior_epochs)):
            _, plan = epoch_plan(items, o.seed + _PRIOR_SALT, epoch, len(items))
            plan = [(path, label_of[path], seed) for path, _caption, seed in plan]
            losses, right, seen = [], 0, 0
            for images, names, _pos, _failed in _loader(PairDataset(plan, facts[0], o.crop_scale),
                                                        int(o.batch_size), o.workers):
                job.check()
                if images is not None and len(names) > 1:   # batch norm needs two samples
                    for g in optimizer.param_groups:
                        g["lr"] = lr_at(step, total, o.pir_prior_lr, warmup, o.min_lr_ratio)
                    target = torch.tensor([index[n] for n in names], device=device)
                    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        logits = head(prior(_normalise(facts, images, device))).float()
                    loss = F.cross_entropy(logits, target)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    optimizer_step(optimizer, scaler)
                    losses.append(float(loss.detach()))
                    right += int((logits.argmax(1) == target).sum())
                    seen += len(names)
                step += 1
                job.step()
            accuracy = 100.0 * right / seen if seen else None
            emit({"type": "prior", "epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                  "accuracy": accuracy, "classes": len(classes)})
    finally:
        pair.train(was_training)
        for q, flag in zip(prior.parameters(), needs_grad):
            q.requires_grad_(flag)
    return head, accuracy
