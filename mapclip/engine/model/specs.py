"""A model spec resolved to an architecture config, preprocessing and a weights file.

A *spec* names a model in one of these forms:

- a preset name from :data:`engine.model.presets.PRESETS` (``remoteclip-vit-b-32``,
  ``demo``, ...);
- ``ARCH:TAG``, an open_clip architecture and pretrained tag
  (``ViT-B-32-quickgelu:openai``); ``ARCH:random`` is a seeded random
  initialisation of that architecture (tests, training from scratch);
- ``ARCH:PATH``, an open_clip architecture and a local checkpoint file
  (``.pt``, ``.pth``, ``.bin`` or ``.safetensors``);
- ``hf-hub:org/name``, an open_clip model folder on the Hugging Face hub;
- a local model folder (``open_clip_config.json`` plus
  ``open_clip_model.safetensors``), the layout that fine-tuning writes and the
  demo model ships in;
- ``PATH`` alone, a published checkpoint file (RemoteCLIP, GeoRSCLIP, SkyCLIP,
  OpenAI): its architecture is read from its state dict's shapes and its
  activation from its file name (:func:`engine.model.checkpoints.recognise_checkpoint`).

Published checkpoints load with the architecture they were trained in, even
when the spec names another: RemoteCLIP, GeoRSCLIP B/L and SkyCLIP L-14
continue OpenAI CLIP and need QuickGELU, so ``ViT-B-32:RemoteCLIP-ViT-B-32.pt``
(the spelling of RemoteCLIP's README) loads as ``ViT-B-32-quickgelu`` with a
warning naming both (:class:`~engine.model.checkpoints.CheckpointWarning`); an
architecture whose shapes contradict the file is refused with the right one in the fix.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..core.errors import MapClipError, ModelError, UsageError
from .architectures import arch_config
from .checkpoints import (CheckpointWarning, base_arch, detect_arch, read_state_dict,
                          recognise_checkpoint, shapes_match, with_activation)
from .hub import DownloadProgress, cache_dir, download_zip_member, hf_download
from .presets import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, PRESETS, RESOURCES_DIR, Preset

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
RANDOM_TAG = "random"  # ARCH:random -> seeded random initialisation


@dataclass
class Resolved:
    arch: str
    model_cfg: Dict[str, Any]
    preprocess_cfg: Dict[str, Any]
    weights: Optional[Path]  # None: random init
    seed: int = 0
    templates: Optional[str] = None  # the preset's / folder's default template set
    state_dict: Optional[Dict[str, Any]] = None  # already read (recognition), reused by load_model


def read_model_folder(folder: Path) -> Resolved:
    cfg_path = folder / MODEL_CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelError(f"{folder} is not a model folder: {MODEL_CONFIG_FILE} is missing",
                         "a model folder holds open_clip_config.json and open_clip_model.safetensors")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        model_cfg = meta["model_cfg"]
    except (ValueError, KeyError) as exc:
        raise ModelError(f"{cfg_path} is not a valid model config ({exc})",
                         "re-export the model folder") from None
    weights = None
    for name in (MODEL_WEIGHTS_FILE, "open_clip_pytorch_model.bin", "model.safetensors"):
        if (folder / name).is_file():
            weights = folder / name
            break
    if weights is None:
        raise ModelError(f"no weights in model folder {folder}",
                         f"expected {MODEL_WEIGHTS_FILE} beside {MODEL_CONFIG_FILE}")
    arch = meta.get("mapclip", {}).get("arch") or folder.name
    return Resolved(arch, model_cfg, meta.get("preprocess_cfg", {}), weights,
                    templates=meta.get("mapclip", {}).get("templates"))


def resolve(spec: str, progress: Optional[DownloadProgress] = None) -> Resolved:
    """Turn a spec into an architecture config and a local weights file."""
    if not spec or not str(spec).strip():
        raise UsageError("no model given", "pass --model with a preset name (see `python -m engine models`)")
    spec = str(spec).strip()
    if spec in PRESETS:
        return _resolve_preset(PRESETS[spec], progress)
    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:"):]
        cfg_file = hf_download(repo, MODEL_CONFIG_FILE)
        hf_download(repo, MODEL_WEIGHTS_FILE, progress)
        return read_model_folder(cfg_file.parent)
    path = Path(spec).expanduser()
    if path.is_dir():
        return read_model_folder(path)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES and ":" not in spec.split("/")[0].split("\\")[0][2:]:
        if not path.exists():
            raise UsageError(f"checkpoint {path} does not exist", "check the path")
        return _resolve_checkpoint(None, path)
    arch, sep, rest = spec.partition(":")
    if not sep:
        raise UsageError(f"unknown model {spec!r}",
                         "use a preset from `python -m engine models`, ARCH:TAG, ARCH:CHECKPOINT, "
                         "hf-hub:ORG/NAME or a model folder")
    cfg = arch_config(arch)
    if rest == RANDOM_TAG:
        return Resolved(arch, cfg, {}, None)
    ckpt = Path(rest).expanduser()
    if ckpt.suffix.lower() in CHECKPOINT_SUFFIXES or ckpt.exists():
        if not ckpt.is_file():
            raise UsageError(f"checkpoint {ckpt} does not exist", "check the path")
        return _resolve_checkpoint(arch, ckpt)
    return _resolve_open_clip_tag(arch, cfg, rest)


def _resolve_checkpoint(arch: Optional[str], path: Path) -> Resolved:
    """A checkpoint file, with ``arch`` as given (or None: from the file itself),
    corrected to what a recognised published checkpoint needs."""
    known = recognise_checkpoint(path)
    sd = read_state_dict(path)
    if arch is None:
        shape_arch = detect_arch(sd)
        if shape_arch is None:
            raise UsageError(f"checkpoint {path} needs its architecture: its weights match no "
                             "known open_clip architecture",
                             f"write the spec as ARCH:PATH, e.g. ViT-B-32-quickgelu:{path}")
        if known is None:
            quick = with_activation(shape_arch, True)[0]
            plain = with_activation(shape_arch, False)[0]
            raise UsageError(
                f"checkpoint {path} needs its architecture: its weights are {shape_arch}, "
                "but its file name is not a published checkpoint's, so its activation is unknown",
                f"write {quick}:{path} if it continues OpenAI CLIP (RemoteCLIP, GeoRSCLIP B/L, "
                f"SkyCLIP L), or {plain}:{path} if it was trained with plain GELU (LAION's OpenCLIP)")
        name, cfg = with_activation(shape_arch, known.quick_gelu)
        return Resolved(name, cfg, {}, path, state_dict=sd)
    cfg = arch_config(arch)
    if not shapes_match(cfg, sd):
        shape_arch = detect_arch(sd)
        if shape_arch is not None and base_arch(arch) != shape_arch:
            want = with_activation(shape_arch, known.quick_gelu)[0] if known else shape_arch
            raise ModelError(f"checkpoint {path} holds {shape_arch} weights, not {arch}",
                             f"use --model {want}:{path}, or just the path if it is a published "
                             "checkpoint")
        return Resolved(arch, cfg, {}, path, state_dict=sd)  # load_weights names the mismatch
    if known is not None and bool(cfg.get("quick_gelu")) != known.quick_gelu:
        name, cfg = with_activation(base_arch(arch), known.quick_gelu)
        act = "QuickGELU" if known.quick_gelu else "GELU"
        warnings.warn(f"{path.name} is a {known.family} checkpoint trained with {act} "
                      f"({known.note}); loading it as {name}, not {arch}",
                      CheckpointWarning, stacklevel=3)
        return Resolved(name, cfg, {}, path, state_dict=sd)
    return Resolved(arch, cfg, {}, path, state_dict=sd)


@dataclass
class CheckpointChoice:
    """What a front end offers for a checkpoint file (the dock's and the model
    manager's *Add checkpoint...*): ``spec`` when the file is a recognised
    published checkpoint (added as is, nothing to ask); otherwise ``choices``,
    the specs of the architecture its shapes show with either activation,
    or none when the shapes match no architecture (``note`` says why)."""

    spec: Optional[str]
    label: str
    choices: List[str]
    note: str


def checkpoint_choice(path: str) -> CheckpointChoice:
    """How to add checkpoint ``path`` without letting a wrong architecture through."""
    p = Path(path)
    try:
        res = _resolve_checkpoint(None, p)
        known = recognise_checkpoint(p)
        return CheckpointChoice(str(p), f"{p.name} ({known.family if known else 'checkpoint'}, {res.arch})",
                                [], f"recognised: {res.arch}")
    except UsageError as exc:
        shape_arch = None
        try:
            shape_arch = detect_arch(read_state_dict(p))
        except Exception:
            pass
        if shape_arch is None:
            return CheckpointChoice(None, p.name, [], exc.message)
        quick = with_activation(shape_arch, True)[0]
        plain = with_activation(shape_arch, False)[0]
        choices = [f"{quick}:{p}"] + ([f"{plain}:{p}"] if plain != quick else [])
        return CheckpointChoice(None, p.name, choices,
                                f"{p.name} holds {shape_arch} weights; pick the activation it was "
                                f"trained with: {quick} if it continues OpenAI CLIP (RemoteCLIP, "
                                f"GeoRSCLIP B/L, SkyCLIP L), {plain} if LAION's OpenCLIP")
    except MapClipError as exc:
        return CheckpointChoice(None, p.name, [], exc.message)


def _resolve_open_clip_tag(arch: str, cfg: Dict[str, Any], tag: str) -> Resolved:
    import open_clip
    pcfg = open_clip.get_pretrained_cfg(arch, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelError(f"open_clip has no pretrained tag {tag!r} for {arch}",
                         f"known tags: {', '.join(tags) or 'none'}")
    if pcfg.get("quick_gelu") and not cfg.get("quick_gelu"):
        cfg = dict(cfg, quick_gelu=True)  # OpenAI weights were trained with QuickGELU
    target = cache_dir() / "open_clip"
    try:
        weights = Path(open_clip.download_pretrained(pcfg, cache_dir=str(target)))
    except Exception as exc:  # network, hub or disk: one clear line
        raise ModelError(f"could not download open_clip weights {arch}:{tag} ({exc})",
                         f"put the file in {target} or use a local checkpoint (ARCH:PATH)") from None
    pre = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg}
    return Resolved(arch, cfg, pre, weights)


def _resolve_preset(preset: Preset, progress: Optional[DownloadProgress]) -> Resolved:
    if preset.source == "random":
        return Resolved(preset.arch, arch_config(preset.arch), {}, None, templates=preset.templates)
    if preset.source == "folder":
        folder = RESOURCES_DIR / preset.path
        if not (folder / MODEL_CONFIG_FILE).is_file():
            script = "train_demo_captioner.py" if preset.arch == "mapclip-demo-coca" \
                else "train_demo_model.py"
            raise ModelError(f"the {preset.name} model is not in {folder}",
                             f"build it with `python scripts/{script}`")
        res = read_model_folder(folder)
        res.templates = res.templates or preset.templates
        return res
    cfg = arch_config(preset.arch)
    if preset.source == "open_clip":
        res = _resolve_open_clip_tag(preset.arch, cfg, preset.tag)
        res.templates = preset.templates
        return res
    if preset.source == "url-zip":
        dest = download_zip_member(preset.url, preset.filename, progress)
    else:
        dest = hf_download(preset.repo, preset.filename, progress)
    return Resolved(preset.arch, cfg, {}, dest, templates=preset.templates)
