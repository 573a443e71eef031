"""Checkpoint files: read safely, and recognised by name and shape.

A checkpoint file is untrusted input: it loads with
``torch.load(weights_only=True)`` or from safetensors (:func:`read_state_dict`).
Published checkpoints (RemoteCLIP, GeoRSCLIP, SkyCLIP, OpenAI) are recognised by
their file names (:func:`recognise_checkpoint`, which also says whether they were
trained with QuickGELU); any state dict's architecture is read from its keys and
shapes (:func:`detect_arch`), which cannot tell GELU from QuickGELU.
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..core.errors import ModelError, UsageError, reason
from .architectures import arch_config, build_model, register_configs


class CheckpointWarning(UserWarning):
    """A spec's architecture was corrected to the one a recognised checkpoint needs."""


QUICKGELU_SUFFIX = "-quickgelu"


@dataclass(frozen=True)
class KnownCheckpoint:
    """What a published checkpoint's file name says about it."""

    family: str
    arch: Optional[str]   # base architecture the name states (None: read it from the shapes)
    quick_gelu: bool      # trained with QuickGELU (continued from OpenAI CLIP)
    note: str


_OPENAI_RELEASES = r"(RN50|RN101|RN50x4|RN50x16|RN50x64|ViT-B-32|ViT-B-16|ViT-L-14|ViT-L-14-336px)"

#: (pattern on the file name, family, architecture or None for the match's group 1,
#: QuickGELU, note); first match wins
KNOWN_CHECKPOINTS: Tuple[Tuple[str, str, Optional[str], bool, str], ...] = (
    (r"^RemoteCLIP-(RN50|ViT-B-32|ViT-L-14)\.pt$", "RemoteCLIP", None, True,
     "RemoteCLIP continues OpenAI CLIP"),
    (r"^RS5M_(ViT-B-32|ViT-L-14)\.pt$", "GeoRSCLIP", None, True,
     "GeoRSCLIP B/32 and L/14 continue OpenAI CLIP"),
    (r"^RS5M_(ViT-H-14)\.pt$", "GeoRSCLIP", None, False,
     "GeoRSCLIP H/14 continues LAION's OpenCLIP (GELU)"),
    (r"^SkyCLIP_ViT_L14", "SkyCLIP", "ViT-L-14", True,
     "SkyCLIP L/14 was trained from --pretrained openai"),
    (r"^SkyCLIP_ViT_B32", "SkyCLIP", "ViT-B-32", False,
     "SkyCLIP B/32 was trained from LAION's laion2b_e16 (GELU)"),
    (r"^" + _OPENAI_RELEASES + r"\.pt$", "OpenAI CLIP", None, True, "OpenAI's CLIP release"),
    (r"(^|[-_.])openai([-_.]|$)", "OpenAI CLIP", None, True, "OpenAI CLIP weights"),
)


def recognise_checkpoint(path: Path) -> Optional[KnownCheckpoint]:
    """The published checkpoint ``path`` is, by its file name (or, for a
    training checkpoint such as SkyCLIP's ``epoch_20.pt`` or a hub snapshot
    file, the folder names above it); None if not recognised."""
    path = Path(path)
    names = [path.name]
    if re.match(r"^(epoch_\d+|epoch_latest|open_clip_pytorch_model|open_clip_model)\.", path.name):
        names += [p.name for p in path.parents][:6]
    for name in names:
        for pattern, family, arch, qg, note in KNOWN_CHECKPOINTS:
            m = re.search(pattern, name)
            if m:
                base = arch or (m.group(1) if m.groups() and m.group(1) else None)
                if base == "ViT-L-14-336px":
                    base = "ViT-L-14-336"
                return KnownCheckpoint(family, base, qg, note)
    return None


def base_arch(arch: str) -> str:
    return arch[:-len(QUICKGELU_SUFFIX)] if arch.endswith(QUICKGELU_SUFFIX) else arch


def with_activation(base: str, quick_gelu: bool) -> Tuple[str, Dict[str, Any]]:
    """(architecture name, config) of ``base`` with QuickGELU on or off."""
    import open_clip
    register_configs()
    if quick_gelu:
        if arch_config(base).get("quick_gelu"):
            return base, arch_config(base)
        name = base + QUICKGELU_SUFFIX
        if open_clip.get_model_config(name) is not None:
            return name, arch_config(name)
        return name, dict(arch_config(base), quick_gelu=True)
    return base, {k: v for k, v in arch_config(base).items() if k != "quick_gelu"}


def _shape_of(v) -> Tuple[int, ...]:
    return tuple(getattr(v, "shape", ()))


def shapes_match(model_cfg: Dict[str, Any], state_dict: Dict[str, Any]) -> bool:
    """True if ``state_dict`` has exactly the keys and shapes of ``model_cfg``'s model
    (built on the meta device: no memory, no initialisation cost)."""
    import torch
    try:
        with torch.device("meta"):
            own = build_model(model_cfg).state_dict()
    except Exception:
        return False
    if set(own) != set(state_dict):
        return False
    return all(_shape_of(own[k]) == _shape_of(state_dict[k]) for k in own)


def _cheap_signature_ok(cfg: Dict[str, Any], sd: Dict[str, Any]) -> bool:
    if "multimodal_cfg" in cfg:
        return False
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if v.get("timm_model_name") or t.get("hf_model_name"):
        return False
    tp = sd.get("text_projection")
    if tp is not None and len(_shape_of(tp)) == 2 and _shape_of(tp)[1] != cfg.get("embed_dim"):
        return False
    tok = sd.get("token_embedding.weight")
    if tok is not None and _shape_of(tok) != (t.get("vocab_size", 49408), t.get("width", 512)):
        return False
    pos = sd.get("positional_embedding")
    if pos is not None and _shape_of(pos)[:1] != (t.get("context_length", 77),):
        return False
    layers = v.get("layers")
    conv = sd.get("visual.conv1.weight")
    if isinstance(layers, int):
        if conv is None or "visual.class_embedding" not in sd:
            return False
        size = v.get("image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = v.get("patch_size", 16)
        vpos = sd.get("visual.positional_embedding")
        return (_shape_of(conv)[:1] == (v.get("width"),) and _shape_of(conv)[-1:] == (patch,)
                and vpos is not None and _shape_of(vpos)[0] == (size // patch) ** 2 + 1)
    return "visual.attnpool.positional_embedding" in sd


def detect_arch(state_dict: Dict[str, Any]) -> Optional[str]:
    """The open_clip architecture (without ``-quickgelu``) whose keys and shapes
    ``state_dict`` has exactly, or None. Shapes cannot tell GELU from QuickGELU."""
    import open_clip
    register_configs()
    found = []
    for name in open_clip.list_models():
        if name.endswith(QUICKGELU_SUFFIX):
            continue
        cfg = open_clip.get_model_config(name)
        if cfg and _cheap_signature_ok(cfg, state_dict) and shapes_match(cfg, state_dict):
            found.append(name)
    return min(found, key=lambda n: (len(n), n)) if found else None


def read_state_dict(path: Path) -> Dict[str, Any]:
    """Read a checkpoint as a flat state dict; untrusted input, so no pickles."""
    import torch
    if _is_torchscript(path):  # checked first: torch.load would hand it to torch.jit.load
        raise ModelError(f"checkpoint {path} is a TorchScript archive (OpenAI's original CLIP "
                         "release), not a state dict",
                         "use the openai-vit-b-32 / openai-vit-l-14 presets or ARCH-quickgelu:openai, "
                         "which load the same weights as a plain state dict")
    if path.is_file() and not _looks_like_checkpoint(path):
        raise ModelError(f"{path} is not a checkpoint: it is neither a PyTorch file (a zip "
                         "archive or a pickle) nor safetensors",
                         "give the model's weights (.pt, .pth, .bin or .safetensors) or a "
                         "model folder")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            sd: Any = load_file(str(path), device="cpu")
        else:
            try:  # mmap: a training checkpoint's optimizer state is never read into memory
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                    raise
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path} does not exist", "check the path") from None
    except Exception as exc:
        raise ModelError(
            f"cannot read checkpoint {path}: {reason(exc)}",
            "checkpoints load with weights_only=True; a file that holds more than tensors "
            "(pickled objects) must be converted to a plain state dict or safetensors") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise ModelError(f"{path} holds no state dict", "save the model with model.state_dict()")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _looks_like_checkpoint(path: Path) -> bool:
    """True when ``path`` starts like a PyTorch checkpoint (a zip archive, or the
    pickle of torch's legacy format) or a safetensors file (an 8-byte header size,
    then its JSON header)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"\x80\x02" or zipfile.is_zipfile(path):
        return True
    if len(head) == 9 and head[8:9] == b"{":
        return 0 < int.from_bytes(head[:8], "little") <= max(path.stat().st_size - 8, 0)
    return False


def _is_torchscript(path: Path) -> bool:
    """True for a TorchScript zip (its members hold code/ and constants.pkl)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1].startswith("code/") for n in names) and \
        any(n.endswith("constants.pkl") for n in names)
