"""The one factory that turns a model spec into a ready model, and its way back to disk.

:func:`load_model` resolves a spec (:mod:`engine.model.specs`: presets, hub
downloads, checkpoints recognised by name and shape), builds the open_clip model
(:mod:`engine.model.architectures`), loads its weights strictly and puts it on
the device in the precision asked (bf16 on CUDA by default), in eval mode, as a
:class:`LoadedModel`; :func:`save_model_folder` writes a model folder that it reads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ..core.errors import ModelError, UsageError
from ..core.options import DEFAULT_TEMPLATES, ModelDefaults
from .architectures import build_model
from .checkpoints import read_state_dict
from .hub import DownloadProgress
from .presets import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, model_defaults
from .specs import Resolved, resolve

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedModel:
    """A model ready for inference with the facts the engine needs about it."""

    model: Any  # open_clip CLIP
    tokenizer: Callable[[List[str]], Any]
    spec: str
    arch: str
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    embed_dim: int
    device: Any  # torch.device
    precision: str  # "fp32", "bf16" or "fp16"
    model_cfg: Dict[str, Any] = field(default_factory=dict)
    templates: str = DEFAULT_TEMPLATES  # the prompt template ensemble used by default
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    auto_precision: bool = False     # loaded without an asked precision (engine.model.accel's CPU path)

    @property
    def dtype(self):
        import torch
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def is_vit(self) -> bool:
        vision = self.model_cfg.get("vision_cfg", {})
        return not isinstance(vision.get("layers"), (list, tuple)) and not vision.get("timm_model_name")

    @property
    def patch_size(self) -> int:
        return int(self.model_cfg.get("vision_cfg", {}).get("patch_size", 0) or 0)

    def describe(self) -> Dict[str, Any]:
        return {"model": self.spec, "arch": self.arch, "embed_dim": self.embed_dim,
                "image_size": self.image_size, "device": str(self.device),
                "precision": self.precision, "templates": self.templates,
                "quick_gelu": bool(self.model_cfg.get("quick_gelu"))}


def resolve_device(device: Optional[str] = None):
    """cuda > mps > cpu unless ``device`` names one; a clear error if absent."""
    import torch
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but CUDA is not available",
                         "use --device cpu, or install a CUDA build of torch")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"device {device!r} asked for, but MPS is not available", "use --device cpu")
    return dev


def resolve_precision(device, precision: Optional[str] = None) -> str:
    """bf16 (fp16 where bf16 is missing) on CUDA, fp32 elsewhere, unless asked."""
    import torch
    if precision in (None, "", "auto"):
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"unknown precision {precision!r}", "use fp32, bf16 or fp16")
    if device.type == "cpu" and precision == "fp16":
        raise UsageError("fp16 is not supported on the CPU", "use fp32 or bf16 on the CPU")
    return precision


def load_weights(model, state_dict: Dict[str, Any], source: str, arch: str) -> None:
    """Load ``state_dict`` strictly; name missing/unexpected keys on mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict)
                    if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: checkpoint "
                         f"{tuple(state_dict[k].shape)}, {arch} {tuple(own[k].shape)})")
        raise ModelError(f"checkpoint {source} does not match architecture {arch}: " + "; ".join(parts),
                         "name the architecture the checkpoint was trained with, as ARCH:PATH")
    model.load_state_dict(state_dict, strict=True)


def _preprocess_facts(model, resolved: Resolved) -> Tuple[int, tuple, tuple]:
    size = resolved.model_cfg.get("vision_cfg", {}).get("image_size", 224)
    if isinstance(size, (list, tuple)):
        size = size[0]
    pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    pre.update(resolved.preprocess_cfg or {})
    mean = tuple(pre.get("mean") or OPENAI_MEAN)
    std = tuple(pre.get("std") or OPENAI_STD)
    return int(size), mean, std


def make_tokenizer(resolved: Resolved):
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
    text_cfg = resolved.model_cfg.get("text_cfg", {})
    ctx = int(text_cfg.get("context_length", 77))
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=ctx)
    return SimpleTokenizer(context_length=ctx)


def load_model(spec: str, device: Optional[str] = None, precision: Optional[str] = None,
               progress: Optional[DownloadProgress] = None) -> LoadedModel:
    """Load ``spec`` (see module doc) onto ``device`` in ``precision``, eval mode."""
    import torch
    resolved = resolve(spec, progress)
    dev = resolve_device(device)
    prec = resolve_precision(dev, precision)
    if resolved.weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(resolved.seed)
            model = build_model(resolved.model_cfg)
    else:
        model = build_model(resolved.model_cfg)
        sd = resolved.state_dict if resolved.state_dict is not None else read_state_dict(resolved.weights)
        load_weights(model, sd, str(resolved.weights), resolved.arch)
        resolved.state_dict = sd = None
    model.eval().requires_grad_(False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    model = model.to(device=dev, dtype=dtype)
    size, mean, std = _preprocess_facts(model, resolved)
    return LoadedModel(model=model, tokenizer=make_tokenizer(resolved), spec=spec, arch=resolved.arch,
                       image_size=size, mean=mean, std=std,
                       embed_dim=int(resolved.model_cfg.get("embed_dim", 0)),
                       device=dev, precision=prec, model_cfg=resolved.model_cfg,
                       templates=resolved.templates or DEFAULT_TEMPLATES,
                       defaults=model_defaults(spec), auto_precision=precision in (None, "", "auto"))


def as_loaded(model: Union[str, LoadedModel], device: Optional[str] = None,
              precision: Optional[str] = None) -> LoadedModel:
    """A LoadedModel as given, or the spec ``model`` loaded (:func:`load_model`): what every
    job accepts as its model."""
    return model if isinstance(model, LoadedModel) else load_model(model, device=device,
                                                                   precision=precision)


def save_model_folder(model, model_cfg: Dict[str, Any], folder: Path, arch: str,
                      mean=OPENAI_MEAN, std=OPENAI_STD, extra: Optional[Dict[str, Any]] = None,
                      half: bool = False) -> Path:
    """Write ``model`` as a self-describing model folder that load_model reads.

    Both files are written beside their final names and renamed into place,
    the weights last, so a folder is never half-written.
    """
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    meta = {"model_cfg": model_cfg,
            "preprocess_cfg": {"mean": list(mean), "std": list(std), "image_size": size},
            "mapclip": dict({"arch": arch}, **(extra or {}))}
    tmp_cfg = folder / (MODEL_CONFIG_FILE + ".part")
    tmp_cfg.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    sd = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in model.state_dict().items()}
    tmp_w = folder / (MODEL_WEIGHTS_FILE + ".part")
    save_file(sd, str(tmp_w))
    for tmp in (tmp_cfg, tmp_w):
        os.chmod(tmp, 0o644)  # safetensors writes owner-only files; a model folder is shared
    os.replace(tmp_cfg, folder / MODEL_CONFIG_FILE)
    os.replace(tmp_w, folder / MODEL_WEIGHTS_FILE)
    return folder
