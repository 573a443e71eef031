"""The run folder: its identity (the fingerprint compared on resume), the refusal rules,
atomic writes, the training state, best/ and the lock."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from ..archive.format import LOCK
from .marks import MARKS_DIR
from ..archive.writer import WriteLock
from ..core.errors import UsageError, reason
from ..core.options import FinetuneOptions
from ..data.captions import read_captions
from ..model.models import LoadedModel, save_model_folder
from ..data.captions import caption_files_digest, file_digest

RUN_FILE = "run.json"
STATE_FILE = "last.pt"
METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"
STATE_FORMAT = 1
#: options that must match for --resume to continue a run
PIR_FINGERPRINT_FIELDS = ("recipe", "pir_prior", "pir_prior_epochs", "pir_prior_lr", "pir_cal_weight",
                          "pir_labels")
FINGERPRINT_FIELDS = ("model", "data", "image_root", "epochs", "batch_size", "accum", "lr",
                      "weight_decay", "warmup", "min_lr_ratio", "val_split", "freeze",
                      "unlock_last", "seed", "crop_scale")



# --------------------------------------------------------------------------- #
# The run folder: identity, refusal rules, atomic writes, training state.
# --------------------------------------------------------------------------- #
def _images_digest(o: FinetuneOptions, data: List[str]) -> Dict[str, Optional[str]]:
    """Each training image's size and SHA-256 (its first 16 hex digits), by path: a
    run resumed after its images were replaced, its captions unchanged, would
    train on other data. The bytes are hashed, not the modification time, so a
    copied data set (new times, same bytes) still resumes."""
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
    fp["data_sha256"] = caption_files_digest(data)   # a changed caption file is another run
    fp["images"] = _images_digest(o, data)           # and so is a replaced image
    fp["crop_scale"] = list(o.crop_scale)
    fp["weight_decay"] = o.decay                     # the recipe's when none was given
    if o.recipe != "clip":                           # (a clip run's fingerprint is as it was)
        fp.update({k: getattr(o, k) for k in PIR_FINGERPRINT_FIELDS})
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
                 for k in [*fingerprint, *(k for k in run["fingerprint"] if k not in fingerprint)]
                 if run["fingerprint"].get(k) != fingerprint.get(k)
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
    if run_dir.exists() and (not run_dir.is_dir()
                             or any(p.name not in (LOCK, MARKS_DIR) for p in run_dir.iterdir())):
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
