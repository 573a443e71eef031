"""Model presets and the one factory that turns a model spec into a ready model.

A *spec* names a model in one of these forms:

- a preset name from :data:`PRESETS` (``remoteclip-vit-b-32``, ``demo``, ...);
- ``ARCH:TAG``, an open_clip architecture and pretrained tag
  (``ViT-B-32-quickgelu:openai``); ``ARCH:random`` is a seeded random
  initialisation of that architecture (tests, training from scratch);
- ``ARCH:PATH``, an open_clip architecture and a local checkpoint file
  (``.pt``, ``.pth``, ``.bin`` or ``.safetensors``);
- ``hf-hub:org/name``, an open_clip model folder on the Hugging Face hub;
- a local model folder (``open_clip_config.json`` plus
  ``open_clip_model.safetensors``), the layout that fine-tuning writes and the
  demo model ships in.

Weights are downloaded into the cache folder (``$MAPCLIP_CACHE``, default
``~/.cache/mapclip``) with a progress callback. A checkpoint file is untrusted
input: it loads with ``torch.load(weights_only=True)`` or from safetensors.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import ModelError, UsageError
from .options import ModelDefaults

CACHE_ENV = "MAPCLIP_CACHE"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
RESOURCES_DIR = Path(__file__).resolve().parent.parent / "resources"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
MODEL_CONFIG_FILE = "open_clip_config.json"
MODEL_WEIGHTS_FILE = "open_clip_model.safetensors"
RANDOM_TAG = "random"  # ARCH:random -> seeded random initialisation
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")

DownloadProgress = Callable[[int, int], None]


# --------------------------------------------------------------------------- #
# The registry: data, not code.
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Preset:
    """A named model: an open_clip architecture and where its weights live.

    ``source`` is one of ``hf-file`` (``repo`` + ``filename`` on the HF hub),
    ``open_clip`` (an open_clip pretrained ``tag``), ``folder`` (a local model
    folder, ``path`` relative to resources/) or ``random`` (seeded random
    initialisation, for tests).
    """

    name: str
    arch: str
    source: str
    description: str
    repo: str = ""
    filename: str = ""
    tag: str = ""
    path: str = ""
    family: str = ""
    #: what this model searches best with (tile size, batch, ...); the rest comes
    #: from ARCH_DEFAULTS and engine.options.GENERIC_DEFAULTS
    defaults: ModelDefaults = field(default_factory=ModelDefaults)


#: defaults by architecture (a substring of the open_clip name), for presets
#: and for ARCH:... specs alike; the first match wins
ARCH_DEFAULTS: Tuple[Tuple[str, ModelDefaults], ...] = (
    ("L-14", ModelDefaults(tile_px=224, batch_size=16)),
    ("RN50", ModelDefaults(batch_size=32)),
    ("mapclip-tiny", ModelDefaults(tile_px=64, batch_size=16)),
)


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    # RemoteCLIP: plain open_clip state dicts continued from OpenAI CLIP, so
    # they need the QuickGELU variant of each architecture.
    Preset("remoteclip-rn50", "RN50-quickgelu", "hf-file",
           "RemoteCLIP ResNet-50 (remote-sensing CLIP)",
           repo="chendelong/RemoteCLIP", filename="RemoteCLIP-RN50.pt", family="RemoteCLIP"),
    Preset("remoteclip-vit-b-32", "ViT-B-32-quickgelu", "hf-file",
           "RemoteCLIP ViT-B/32 (remote-sensing CLIP); the default",
           repo="chendelong/RemoteCLIP", filename="RemoteCLIP-ViT-B-32.pt", family="RemoteCLIP"),
    Preset("remoteclip-vit-l-14", "ViT-L-14-quickgelu", "hf-file",
           "RemoteCLIP ViT-L/14 (remote-sensing CLIP)",
           repo="chendelong/RemoteCLIP", filename="RemoteCLIP-ViT-L-14.pt", family="RemoteCLIP"),
    # GeoRSCLIP (RS5M): B-32 and L-14 continue OpenAI CLIP (QuickGELU).
    Preset("georsclip-vit-b-32", "ViT-B-32-quickgelu", "hf-file",
           "GeoRSCLIP ViT-B/32, trained on RS5M",
           repo="Zilun/GeoRSCLIP", filename="ckpt/RS5M_ViT-B-32.pt", family="GeoRSCLIP"),
    Preset("georsclip-vit-l-14", "ViT-L-14-quickgelu", "hf-file",
           "GeoRSCLIP ViT-L/14, trained on RS5M",
           repo="Zilun/GeoRSCLIP", filename="ckpt/RS5M_ViT-L-14.pt", family="GeoRSCLIP"),
    # SkyCLIP (SkyScript): continued from LAION CLIP ViT-L/14 (plain GELU).
    Preset("skyclip-vit-l-14", "ViT-L-14", "hf-file",
           "SkyCLIP ViT-L/14, trained on SkyScript (top 30%)",
           repo="furiousteabag/SkyCLIP",
           filename="SkyCLIP_ViT_L14_top30pct_filtered_by_CLIP_laion_RS_epoch_20.pt",
           family="SkyCLIP"),
    Preset("openai-vit-b-32", "ViT-B-32-quickgelu", "open_clip",
           "OpenAI CLIP ViT-B/32 (general-purpose baseline)", tag="openai", family="OpenAI CLIP"),
    Preset("openai-vit-l-14", "ViT-L-14-quickgelu", "open_clip",
           "OpenAI CLIP ViT-L/14 (general-purpose baseline)", tag="openai", family="OpenAI CLIP"),
    Preset("demo", "mapclip-demo", "folder",
           "MapCLIP demo model, trained on synthetic scenes (a demo of the pipeline, "
           "not a remote-sensing model)", path="models/demo", family="MapCLIP"),
    Preset("test-tiny", "mapclip-tiny", "random",
           "tiny randomly initialised model for tests (seeded)", family="MapCLIP"),
)}

DEFAULT_MODEL = "remoteclip-vit-b-32"


def register_configs() -> None:
    """Make the project's own open_clip configs (engine/configs) known."""
    import open_clip
    if "mapclip-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def arch_defaults(arch: str) -> ModelDefaults:
    """The defaults for an open_clip architecture name (see ARCH_DEFAULTS)."""
    for needle, values in ARCH_DEFAULTS:
        if needle in arch:
            return values
    return ModelDefaults()


def model_defaults(spec: str) -> ModelDefaults:
    """What ``spec`` searches best with, without loading it (cheap: no torch).

    A preset's own defaults over its architecture's; a model folder's
    ``mapclip.defaults`` (written by the project's training and by fine-tuning)
    over its architecture's; ``ARCH:...`` specs get their architecture's.
    Unset values fall back to engine.options.GENERIC_DEFAULTS when applied.
    """
    spec = str(spec or "").strip()
    if spec in PRESETS:
        preset = PRESETS[spec]
        base = arch_defaults(preset.arch)
        if preset.source == "folder":
            base = _folder_defaults(RESOURCES_DIR / preset.path).over(base)
        return preset.defaults.over(base)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_defaults(path)
    arch = spec.partition(":")[0] if ":" in spec and not path.exists() else ""
    return arch_defaults(arch) if arch else ModelDefaults()


def _folder_defaults(folder: Path) -> ModelDefaults:
    try:
        meta = json.loads((folder / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ModelDefaults()
    own = meta.get("mapclip", {}) if isinstance(meta, dict) else {}
    own = own if isinstance(own, dict) else {}
    return ModelDefaults.from_json(own.get("defaults")).over(arch_defaults(str(own.get("arch", ""))))


# --------------------------------------------------------------------------- #
# Cache and downloads.
# --------------------------------------------------------------------------- #
def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "mapclip")
    return Path(root) / "models"


def hf_file_url(repo: str, filename: str, revision: str = "main") -> str:
    return f"{HF_ENDPOINT}/{repo}/resolve/{revision}/{filename}"


def hf_cache_path(repo: str, filename: str) -> Path:
    return cache_dir() / repo / filename


def download(url: str, dest: Path, progress: Optional[DownloadProgress] = None,
             timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``dest`` (atomically); a no-op if ``dest`` exists."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "MapCLIP"})
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
        os.replace(part, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        part.unlink(missing_ok=True)
        raise ModelError(
            f"could not download {url} ({getattr(exc, 'reason', exc)})",
            f"with no network, download that file elsewhere and put it at {dest} "
            f"(the cache folder is set by ${CACHE_ENV})") from None
    return dest


# --------------------------------------------------------------------------- #
# The loaded model.
# --------------------------------------------------------------------------- #
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
    defaults: ModelDefaults = field(default_factory=ModelDefaults)

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
                "precision": self.precision}


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


# --------------------------------------------------------------------------- #
# Resolving a spec to (architecture config, preprocessing, weights file).
# --------------------------------------------------------------------------- #
@dataclass
class Resolved:
    arch: str
    model_cfg: Dict[str, Any]
    preprocess_cfg: Dict[str, Any]
    weights: Optional[Path]  # None: random init
    seed: int = 0


def arch_config(arch: str) -> Dict[str, Any]:
    import open_clip
    register_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ModelError(f"unknown open_clip architecture {arch!r}",
                         "run `python -m engine models --archs` for the known names, "
                         "e.g. ViT-B-32-quickgelu")
    return cfg


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
    return Resolved(arch, model_cfg, meta.get("preprocess_cfg", {}), weights)


def resolve(spec: str, progress: Optional[DownloadProgress] = None) -> Resolved:
    """Turn a spec into an architecture config and a local weights file."""
    if not spec or not str(spec).strip():
        raise UsageError("no model given", "pass --model with a preset name (see `python -m engine models`)")
    spec = str(spec).strip()
    if spec in PRESETS:
        return _resolve_preset(PRESETS[spec], progress)
    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:"):]
        folder = cache_dir() / repo
        download(hf_file_url(repo, MODEL_CONFIG_FILE), folder / MODEL_CONFIG_FILE)
        download(hf_file_url(repo, MODEL_WEIGHTS_FILE), folder / MODEL_WEIGHTS_FILE, progress)
        return read_model_folder(folder)
    path = Path(spec).expanduser()
    if path.is_dir():
        return read_model_folder(path)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES and ":" not in spec.split("/")[0].split("\\")[0][2:]:
        if not path.exists():
            raise UsageError(f"checkpoint {path} does not exist", "check the path")
        raise UsageError(f"checkpoint {path} needs its architecture",
                         f"write the spec as ARCH:PATH, e.g. ViT-B-32-quickgelu:{path}")
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
        return Resolved(arch, cfg, {}, ckpt)
    return _resolve_open_clip_tag(arch, cfg, rest)


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
        return Resolved(preset.arch, arch_config(preset.arch), {}, None)
    if preset.source == "folder":
        folder = RESOURCES_DIR / preset.path
        if not (folder / MODEL_CONFIG_FILE).is_file():
            raise ModelError(f"the {preset.name} model is not in {folder}",
                             "build it with `python scripts/train_demo_model.py`")
        return read_model_folder(folder)
    cfg = arch_config(preset.arch)
    if preset.source == "open_clip":
        return _resolve_open_clip_tag(preset.arch, cfg, preset.tag)
    dest = hf_cache_path(preset.repo, preset.filename)
    download(hf_file_url(preset.repo, preset.filename), dest, progress)
    return Resolved(preset.arch, cfg, {}, dest)


def preset_location(preset: Preset) -> str:
    """Where a preset loads from, for listings."""
    if preset.source == "hf-file":
        return f"{hf_file_url(preset.repo, preset.filename)} -> {hf_cache_path(preset.repo, preset.filename)}"
    if preset.source == "open_clip":
        return f"open_clip pretrained {preset.arch}:{preset.tag} -> {cache_dir() / 'open_clip'}"
    if preset.source == "folder":
        return str(RESOURCES_DIR / preset.path)
    return "random initialisation (seeded), nothing to download"


def preset_available(preset: Preset) -> bool:
    """True if loading the preset needs no download."""
    if preset.source == "hf-file":
        return hf_cache_path(preset.repo, preset.filename).is_file()
    if preset.source == "folder":
        return (RESOURCES_DIR / preset.path / MODEL_CONFIG_FILE).is_file()
    return preset.source == "random"


# --------------------------------------------------------------------------- #
# Building and loading.
# --------------------------------------------------------------------------- #
def read_state_dict(path: Path) -> Dict[str, Any]:
    """Read a checkpoint as a flat state dict; untrusted input, so no pickles."""
    import torch
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path} does not exist", "check the path") from None
    except Exception as exc:
        raise ModelError(
            f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:200]}",
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


def build_model(model_cfg: Dict[str, Any]):
    """An open_clip CLIP from a config dict (weights uninitialised or random)."""
    from open_clip.model import CLIP, CustomTextCLIP
    cfg = dict(model_cfg)
    if "multimodal_cfg" in cfg:
        raise ModelError("captioning models (CoCa) are not supported", "use a CLIP model")
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cfg.pop("tokenizer_kwargs", None)
    return (CustomTextCLIP if custom else CLIP)(**cfg)


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
        load_weights(model, read_state_dict(resolved.weights), str(resolved.weights), resolved.arch)
    model.eval().requires_grad_(False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    model = model.to(device=dev, dtype=dtype)
    size, mean, std = _preprocess_facts(model, resolved)
    return LoadedModel(model=model, tokenizer=make_tokenizer(resolved), spec=spec, arch=resolved.arch,
                       image_size=size, mean=mean, std=std,
                       embed_dim=int(resolved.model_cfg.get("embed_dim", 0)),
                       device=dev, precision=prec, model_cfg=resolved.model_cfg,
                       defaults=model_defaults(spec))


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


def list_presets() -> List[Preset]:
    return list(PRESETS.values())
