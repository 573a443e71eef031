"""One fine-tuning run: the options checked, the data read, the model prepared, the
epochs trained and evaluated, the best model kept (see the package's doc)."""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from ..core.errors import UsageError, reason
from ..core.faults import fault_point
from ..core.jobs import CancelFlag, Job, ProgressFn
from ..core.options import PIR_LABELS, RECIPES, FinetuneOptions
from ..data.captions import SkipReport, check_images, read_captions
from .data import PairDataset, _loader, _normalise, epoch_plan, evaluate, split_items
from .rundir import (BEST_DIR, METRICS_FILE, RUN_FILE, STATE_FILE, STATE_FORMAT, RunLock,
                     _check_run_dir, _fingerprint, _recover_best, _rng_state, _save_best,
                     _set_rng_state, _write_json, load_state, save_state)
from .train import load_base_model, lr_at, make_optimizer, resolve_amp, set_trainable, train_step
from . import pir as pir_recipe
from ..data.examples import is_marks_file
from .marks import pairs_from_marks

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
    recipe: str = "clip"
    prior: Optional[Dict[str, Any]] = None   # recipe pir: the scene classifier (classes, accuracy, file)
    marks: Optional[Dict[str, int]] = None   # marks given as data: pairs made (finetune.marks)

    def to_json(self) -> Dict[str, Any]:
        out = asdict(self)
        out["skipped"] = self.skipped.to_json()
        return out


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
    if o.recipe not in RECIPES:
        raise UsageError(f"unknown --recipe {o.recipe!r}", f"use one of {', '.join(RECIPES)}",
                         option="recipe")
    if o.pir_labels not in PIR_LABELS:
        raise UsageError(f"unknown --pir-labels {o.pir_labels!r}", f"use one of {', '.join(PIR_LABELS)}",
                         option="pir_labels")
    if o.recipe == "pir":
        if int(o.pir_prior_epochs) < 1 or not o.pir_prior_lr > 0 or not o.pir_cal_weight >= 0:
            raise UsageError(f"recipe pir needs --pir-prior-epochs >= 1, --pir-prior-lr > 0 and "
                             f"--pir-cal-weight >= 0 (got {o.pir_prior_epochs}, {o.pir_prior_lr}, "
                             f"{o.pir_cal_weight})", "e.g. --pir-prior-epochs 5 --pir-prior-lr 1e-3 "
                             "--pir-cal-weight 1")




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
    marks_made: Optional[Dict[str, int]] = None
    if any(is_marks_file(d) for d in data):         # marks -> pairs in the run folder
        if not o.resume:
            _check_run_dir(run_dir, {}, False)      # never written into another run's folder
        data, marks_made = pairs_from_marks(data, o, run_dir)
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
    pir = o.recipe == "pir"
    classes = pir_recipe.scene_classes(train_items, o.pir_labels) if pir else []
    label_of = {it.path: classes.index(pir_recipe.scene_label(it, o.pir_labels))
                for it in train_items} if pir else {}

    # ---- model
    lm = load_base_model(o.model, o.seed, o.device)
    device = lm.device
    amp = resolve_amp(device, o.precision)
    train_prior = pir and pir_recipe.prepare_model(lm, o)
    model = lm.model.float()
    trainable = set_trainable(model, o.freeze, o.unlock_last)

    def train_mode() -> None:
        model.train()
        if o.freeze == "vision":
            model.visual.eval()  # keeps batch-norm statistics of a frozen ResNet tower
    grad_vision, grad_text = trainable["vision"] > 0, trainable["text"] > 0
    optimizer = make_optimizer(model, o.lr, o.decay)
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
        train_prior = False         # the state holds the prior trained before epoch 1
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

    first = pir_recipe.prior_steps(len(train_items), o) if train_prior else 0
    job.done = step
    job.set_total(first + total_steps)
    prior = {"classes": classes, "file": o.pir_prior} if pir else None
    if train_prior:
        head, accuracy = pir_recipe.train_prior(model, train_items, classes, o, facts, device, amp,
                                                job, emit)
        prior.update(accuracy=accuracy, file=str(pir_recipe.save_prior(
            run_dir / pir_recipe.PRIOR_FILE, model.visual.prior, head, classes,
            lm.model_cfg["pir_cfg"], accuracy)))
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
            images, captions, pos, failed = next(batches)
            for f in failed:
                skipped.add("unreadable_image", f, o.strict)
            if images is not None and len(captions) > 0:
                tokens = lm.tokenizer(captions).to(device)
                micro.append((_normalise(facts, images, device), tokens)
                             + ((torch.tensor([label_of[plan[i][0]] for i in pos], device=device),)
                                if pir else ()))
            if len(micro) == o.accum or k == n_micro - 1:
                n_pairs = sum(m[0].shape[0] for m in micro)
                if n_pairs >= 2:
                    t0 = time.perf_counter()
                    for g in optimizer.param_groups:
                        g["lr"] = lr_at(step, total_steps, o.lr, warmup_steps, o.min_lr_ratio)
                    loss = train_step(model, optimizer, micro, amp, scaler, grad_vision, grad_text,
                                      check=job.check, cal_weight=o.pir_cal_weight if pir else None)
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
            _save_best(run_dir, lm, model, {"finetuned_from": o.model, "recipe": o.recipe,
                                            "epoch": epoch + 1,
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
        fault_point("finetune.epoch")

    result = FinetuneResult(
        run_dir=str(run_dir), best_path=str(run_dir / BEST_DIR) if best["epoch"] else None,
        best_epoch=int(best["epoch"]), best_mean_recall=best["mean_recall"],
        metrics_before=before or {}, metrics_after=after, eval_split=eval_split, epochs=o.epochs,
        epochs_run=o.epochs - start_epoch, resumed_from_epoch=start_epoch, steps=step,
        train_images=len(train_items), train_captions=sum(len(i.captions) for i in train_items),
        eval_images=len(eval_items), eval_texts=sum(len(i.captions) for i in eval_items),
        samples_per_s=train_samples / train_seconds if train_seconds else 0.0,
        seconds=time.perf_counter() - t_start, final_loss=last_loss, skipped=skipped,
        model=o.model, device=str(device), precision=prec_name, recipe=o.recipe, prior=prior,
        marks=marks_made)
    run_record.update(status="finished", result=result.to_json())
    _write_json(run_dir / RUN_FILE, run_record)
    return result
