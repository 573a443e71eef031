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
  demo model ships in;
- ``PATH`` alone, a published checkpoint file (RemoteCLIP, GeoRSCLIP, SkyCLIP,
  OpenAI): its architecture is read from its state dict's shapes and its
  activation from its file name (:func:`recognise_checkpoint`).

Published checkpoints load with the architecture they were trained in, even
when the spec names another: RemoteCLIP, GeoRSCLIP B/L and SkyCLIP L-14
continue OpenAI CLIP and need QuickGELU, so ``ViT-B-32:RemoteCLIP-ViT-B-32.pt``
(the spelling of RemoteCLIP's README) loads as ``ViT-B-32-quickgelu`` with a
warning naming both (:class:`CheckpointWarning`); an architecture whose
shapes contradict the file is refused with the right one in the fix.

Hub files download with huggingface_hub (``hf_hub_download``): ``HF_ENDPOINT``
(a mirror), ``HF_HUB_OFFLINE``, resumed partial downloads, proxies and the
shared Hugging Face cache (``$HF_HUB_CACHE``; under ``$MAPCLIP_CACHE/models/hub``
when ``$MAPCLIP_CACHE`` is set). Other files (SkyCLIP's zip from the authors'
bucket) download with :func:`download`, resumed too. A file already at
:func:`hf_cache_path` is used as is, so a file copied there by hand works
offline. A checkpoint file is untrusted input: it loads with
``torch.load(weights_only=True)`` or from safetensors.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ..core.errors import MapClipError, ModelError, UsageError, reason
from ..core.options import DEFAULT_TEMPLATES
from ..core.options import ModelDefaults

CACHE_ENV = "MAPCLIP_CACHE"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
RESOURCES_DIR = Path(__file__).resolve().parents[2] / "resources"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
MODEL_CONFIG_FILE = "open_clip_config.json"
MODEL_WEIGHTS_FILE = "open_clip_model.safetensors"
RANDOM_TAG = "random"  # ARCH:random -> seeded random initialisation
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", DEFAULT_HF_ENDPOINT)  # at import; hf_endpoint() reads it live

DownloadProgress = Callable[[int, int], None]


# --------------------------------------------------------------------------- #
# The registry: data, not code.
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Preset:
    """A named model: an open_clip architecture and where its weights live.

    ``source`` is one of ``hf-file`` (``repo`` + ``filename`` on the HF hub),
    ``url-zip`` (``filename`` inside the zip at ``url``, the authors' own
    bucket), ``open_clip`` (an open_clip pretrained ``tag``), ``folder`` (a
    local model folder, ``path`` relative to mapclip/resources/) or ``random`` (seeded
    random initialisation, for tests). ``templates`` names the prompt
    template ensemble used by default (engine.model.scoring.TEMPLATE_SETS);
    ``reference`` is where the model and its weights are published.
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
    templates: str = DEFAULT_TEMPLATES
    url: str = ""
    reference: str = ""
    #: what this model searches best with (tile size, batch, ...); the rest comes
    #: from ARCH_DEFAULTS and engine.core.options.GENERIC_DEFAULTS
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    #: for the project's tests only: never offered in a picker or listed to users
    dev: bool = False


#: defaults by architecture (a substring of the open_clip name), for presets
#: and for ARCH:... specs alike; the first match wins
ARCH_DEFAULTS: Tuple[Tuple[str, ModelDefaults], ...] = (
    ("L-14", ModelDefaults(tile_px=224, batch_size=16)),
    ("RN50", ModelDefaults(batch_size=32)),
    ("mapclip-tiny", ModelDefaults(tile_px=64, batch_size=16)),
)


SKYSCRIPT_BUCKET = "https://opendatasharing.s3.us-west-2.amazonaws.com/SkyScript/ckpt"

PRESETS: Dict[str, Preset] = {p.name: p for p in (
    # RemoteCLIP: plain open_clip state dicts continued from OpenAI CLIP, so
    # they need the QuickGELU variant of each architecture.
    Preset("remoteclip-rn50", "RN50-quickgelu", "hf-file",
           "RemoteCLIP ResNet-50 (remote-sensing CLIP)",
           repo="chendelong/RemoteCLIP", filename="RemoteCLIP-RN50.pt", family="RemoteCLIP",
           reference="https://github.com/ChenDelong1999/RemoteCLIP"),
    Preset("remoteclip-vit-b-32", "ViT-B-32-quickgelu", "hf-file",
           "RemoteCLIP ViT-B/32 (remote-sensing CLIP); the default",
           repo="chendelong/RemoteCLIP", filename="RemoteCLIP-ViT-B-32.pt", family="RemoteCLIP",
           reference="https://github.com/ChenDelong1999/RemoteCLIP"),
    Preset("remoteclip-vit-l-14", "ViT-L-14-quickgelu", "hf-file",
           "RemoteCLIP ViT-L/14 (remote-sensing CLIP)",
           repo="chendelong/RemoteCLIP", filename="RemoteCLIP-ViT-L-14.pt", family="RemoteCLIP",
           reference="https://github.com/ChenDelong1999/RemoteCLIP"),
    # GeoRSCLIP (RS5M): B-32 and L-14 continue OpenAI CLIP (QuickGELU).
    Preset("georsclip-vit-b-32", "ViT-B-32-quickgelu", "hf-file",
           "GeoRSCLIP ViT-B/32, trained on RS5M",
           repo="Zilun/GeoRSCLIP", filename="ckpt/RS5M_ViT-B-32.pt", family="GeoRSCLIP",
           reference="https://github.com/om-ai-lab/RS5M"),
    Preset("georsclip-vit-l-14", "ViT-L-14-quickgelu", "hf-file",
           "GeoRSCLIP ViT-L/14, trained on RS5M",
           repo="Zilun/GeoRSCLIP", filename="ckpt/RS5M_ViT-L-14.pt", family="GeoRSCLIP",
           reference="https://github.com/om-ai-lab/RS5M"),
    # SkyCLIP (SkyScript): ViT-L-14 initialised from OpenAI CLIP (--pretrained
    # openai, QuickGELU), published by the authors as a zipped training
    # checkpoint (epoch_20.pt: "module."-prefixed state dict + optimizer state).
    Preset("skyclip-vit-l-14", "ViT-L-14-quickgelu", "url-zip",
           "SkyCLIP ViT-L/14, trained on SkyScript (top 30%, filtered by CLIP-laion-RS)",
           url=f"{SKYSCRIPT_BUCKET}/SkyCLIP_ViT_L14_top30pct_filtered_by_CLIP_laion_RS.zip",
           filename="epoch_20.pt", family="SkyCLIP",
           reference="https://github.com/wangzhecheng/SkyScript"),
    Preset("openai-vit-b-32", "ViT-B-32-quickgelu", "open_clip",
           "OpenAI CLIP ViT-B/32 (general-purpose baseline)", tag="openai", family="OpenAI CLIP",
           reference="https://github.com/openai/CLIP"),
    Preset("openai-vit-l-14", "ViT-L-14-quickgelu", "open_clip",
           "OpenAI CLIP ViT-L/14 (general-purpose baseline)", tag="openai", family="OpenAI CLIP",
           reference="https://github.com/openai/CLIP"),
    # open_clip's captioning models: CLIP towers plus a text decoder (engine.caption generates)
    Preset("coca-vit-b-32", "coca_ViT-B-32", "open_clip",
           "CoCa ViT-B/32 (LAION-2B, fine-tuned on MS-COCO captions): writes captions; "
           "general-purpose, not remote sensing", tag="mscoco_finetuned_laion2b_s13b_b90k",
           family="CoCa", reference="https://github.com/mlfoundations/open_clip"),
    Preset("coca-vit-l-14", "coca_ViT-L-14", "open_clip",
           "CoCa ViT-L/14 (LAION-2B, fine-tuned on MS-COCO captions): writes captions; "
           "general-purpose, not remote sensing", tag="mscoco_finetuned_laion2b_s13b_b90k",
           family="CoCa", reference="https://github.com/mlfoundations/open_clip"),
    Preset("demo", "mapclip-demo2", "folder",
           "MapCLIP demo model, trained on synthetic scenes (a demo of the pipeline, "
           "not a remote-sensing model)", path="models/demo", family="MapCLIP",
           templates="raw", reference="mapclip/resources/models/demo/MODEL_CARD.md"),
    Preset("demo-captioner", "mapclip-demo-coca", "folder",
           "MapCLIP demo captioning model (a tiny CoCa), trained on synthetic scenes: writes "
           "captions (a demo of the pipeline, not a remote-sensing model)",
           path="models/demo-captioner", family="MapCLIP", templates="raw",
           reference="mapclip/resources/models/demo-captioner/MODEL_CARD.md"),
    Preset("test-coca-tiny", "mapclip-coca-tiny", "random",
           "tiny randomly initialised CoCa captioning model for tests (seeded)", family="MapCLIP",
           reference="mapclip/engine/model/configs/mapclip-coca-tiny.json", dev=True),
    Preset("test-tiny", "mapclip-tiny", "random",
           "tiny randomly initialised model for tests (seeded)", family="MapCLIP",
           reference="mapclip/engine/model/configs/mapclip-tiny.json", dev=True),
)}

DEFAULT_MODEL = "remoteclip-vit-b-32"


def register_configs() -> None:
    """Make the project's own open_clip configs (mapclip/engine/model/configs) known."""
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
    Unset values fall back to engine.core.options.GENERIC_DEFAULTS when applied.
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


def hf_endpoint() -> str:
    """The hub or mirror to download from: $HF_ENDPOINT, read at call time."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_offline() -> bool:
    """True when $HF_HUB_OFFLINE (or $TRANSFORMERS_OFFLINE) asks for no network."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_hub_cache() -> Optional[Path]:
    """Where hub files are cached: under $MAPCLIP_CACHE when it is set, else
    huggingface_hub's shared cache (None: $HF_HUB_CACHE / ~/.cache/huggingface/hub)."""
    return cache_dir() / "hub" if os.environ.get(CACHE_ENV) else None


def hf_file_url(repo: str, filename: str, revision: str = "main") -> str:
    return f"{hf_endpoint()}/{repo}/resolve/{revision}/{filename}"


def hf_cache_path(repo: str, filename: str) -> Path:
    """A file placed here by hand is used as is (no download, no hub cache)."""
    return cache_dir() / repo / filename


def _progress_tqdm(progress: Optional[DownloadProgress]):
    """A silent tqdm class that reports (done, total) bytes to ``progress``."""
    from tqdm.auto import tqdm

    class _Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            self._total = int(kwargs.get("total") or 0)
            if progress and self._done:
                progress(self._done, self._total)

        def update(self, n=1):
            self._done += int(n or 0)
            if progress:
                progress(self._done, self._total)
            return super().update(n)

    return _Bar


#: seconds a connection to the hub may take before it counts as unreachable
HUB_CONNECT_TIMEOUT = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(endpoint: str, timeout: float = HUB_CONNECT_TIMEOUT) -> Optional[str]:
    """Why ``endpoint`` cannot be reached (one TCP connection, at most ``timeout`` s), or
    None when it can, or when a proxy is set (the proxy decides; huggingface_hub retries)."""
    import socket
    from urllib.parse import urlparse
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urlparse(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({reason(exc)})"


def hf_download(repo: str, filename: str, progress: Optional[DownloadProgress] = None,
                revision: str = "main") -> Path:
    """``filename`` of hub repo ``repo`` as a local file, through huggingface_hub.

    Honours $HF_ENDPOINT (mirrors), $HF_HUB_OFFLINE, proxies and resumes a
    partial download; files land in :func:`hf_hub_cache`. A file already at
    :func:`hf_cache_path` is returned without any network access.
    """
    legacy = hf_cache_path(repo, filename)
    if legacy.is_file():
        return legacy
    from huggingface_hub import hf_hub_download
    cache = hf_hub_cache()
    offline = hf_offline()
    unreachable = None if offline else hub_unreachable(hf_endpoint())
    if unreachable:      # no network: the cached copy if there is one, without 30 s of retries
        offline = True
    try:
        path = hf_hub_download(repo, filename, revision=revision, endpoint=hf_endpoint(),
                               cache_dir=str(cache) if cache else None, local_files_only=offline,
                               tqdm_class=_progress_tqdm(progress), library_name="mapclip")
    except Exception as exc:  # offline, network, hub or disk: one clear line
        why = (f"{unreachable}, and the file is not cached" if unreachable else
               "offline mode ($HF_HUB_OFFLINE) and the file is not cached" if offline else reason(exc))
        raise ModelError(
            f"could not download {repo}/{filename} from {hf_endpoint()} ({why})",
            f"with no network, download that file elsewhere and put it at {legacy} "
            f"(the cache folder is set by ${CACHE_ENV}); behind a firewall, set $HF_ENDPOINT "
            "to a hub mirror") from None
    return Path(path)


def download(url: str, dest: Path, progress: Optional[DownloadProgress] = None,
             timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``dest`` (atomically); a no-op if ``dest`` exists.

    A ``dest.part`` left by an interrupted download is resumed with an HTTP
    Range request (restarted if the server ignores the range).
    """
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    try:
        headers = {"User-Agent": "MapCLIP"}
        if have:
            headers["Range"] = f"bytes={have}-"
        req = urllib.request.Request(url, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code != 416 or not have:
                raise
            os.replace(part, dest)  # 416: the part is already the whole file
            return dest
        with resp:
            resumed = have and resp.status == 206
            done = have if resumed else 0
            total = int(resp.headers.get("Content-Length") or 0) + done
            with open(part, "ab" if resumed else "wb") as out:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
            if total and done < total:  # a closed connection reads as a short file, not an error
                raise OSError(f"the connection closed after {done} of {total} bytes")
        os.replace(part, dest)
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
        if not (part.is_file() and part.stat().st_size > have):
            part.unlink(missing_ok=True)  # keep a part that grew: the next try resumes it
        raise ModelError(
            f"could not download {url} ({getattr(exc, 'reason', exc)})",
            f"with no network, download that file elsewhere and put it at {dest} "
            f"(the cache folder is set by ${CACHE_ENV})") from None
    return dest


def zip_member_path(url: str, member: str) -> Path:
    """Where the ``member`` of the zip at ``url`` is kept once extracted."""
    stem = Path(url.rsplit("/", 1)[-1]).stem
    return cache_dir() / "url" / stem / Path(member).name


def download_zip_member(url: str, member: str, progress: Optional[DownloadProgress] = None) -> Path:
    """The file named ``member`` (its last path part) inside the zip at ``url``.

    The zip is downloaded (resumably) next to the extracted file, the member
    extracted, then the zip removed; an extracted file is reused offline.
    """
    dest = zip_member_path(url, member)
    if dest.is_file():
        return dest
    archive = download(url, dest.parent / url.rsplit("/", 1)[-1], progress)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if Path(n).name == Path(member).name]
            if not names:
                raise ModelError(f"{url} holds no {member}",
                                 f"download it by hand and put the checkpoint at {dest}")
            part = dest.with_name(dest.name + ".part")
            with zf.open(sorted(names, key=len)[0]) as src, open(part, "wb") as out:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
            os.replace(part, dest)
    except zipfile.BadZipFile:
        archive.unlink(missing_ok=True)
        raise ModelError(f"{url} did not download as a zip file",
                         f"download it by hand, unzip it and put {member} at {dest}") from None
    archive.unlink(missing_ok=True)
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
    templates: Optional[str] = None  # the preset's / folder's default template set
    state_dict: Optional[Dict[str, Any]] = None  # already read (recognition), reused by load_model


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


# --------------------------------------------------------------------------- #
# Recognising published checkpoints.
# --------------------------------------------------------------------------- #
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


def _base_arch(arch: str) -> str:
    return arch[:-len(QUICKGELU_SUFFIX)] if arch.endswith(QUICKGELU_SUFFIX) else arch


def _with_activation(base: str, quick_gelu: bool) -> Tuple[str, Dict[str, Any]]:
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
            quick = _with_activation(shape_arch, True)[0]
            plain = _with_activation(shape_arch, False)[0]
            raise UsageError(
                f"checkpoint {path} needs its architecture: its weights are {shape_arch}, "
                "but its file name is not a published checkpoint's, so its activation is unknown",
                f"write {quick}:{path} if it continues OpenAI CLIP (RemoteCLIP, GeoRSCLIP B/L, "
                f"SkyCLIP L), or {plain}:{path} if it was trained with plain GELU (LAION's OpenCLIP)")
        name, cfg = _with_activation(shape_arch, known.quick_gelu)
        return Resolved(name, cfg, {}, path, state_dict=sd)
    cfg = arch_config(arch)
    if not shapes_match(cfg, sd):
        shape_arch = detect_arch(sd)
        if shape_arch is not None and _base_arch(arch) != shape_arch:
            want = _with_activation(shape_arch, known.quick_gelu)[0] if known else shape_arch
            raise ModelError(f"checkpoint {path} holds {shape_arch} weights, not {arch}",
                             f"use --model {want}:{path}, or just the path if it is a published "
                             "checkpoint")
        return Resolved(arch, cfg, {}, path, state_dict=sd)  # load_weights names the mismatch
    if known is not None and bool(cfg.get("quick_gelu")) != known.quick_gelu:
        name, cfg = _with_activation(_base_arch(arch), known.quick_gelu)
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
        quick = _with_activation(shape_arch, True)[0]
        plain = _with_activation(shape_arch, False)[0]
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


def preset_location(preset: Preset) -> str:
    """Where a preset loads from, for listings."""
    if preset.source == "hf-file":
        where = hf_hub_cache() or "the Hugging Face cache"
        return f"{hf_file_url(preset.repo, preset.filename)} -> {where}"
    if preset.source == "url-zip":
        return f"{preset.url} ({preset.filename}) -> {zip_member_path(preset.url, preset.filename)}"
    if preset.source == "open_clip":
        return f"open_clip pretrained {preset.arch}:{preset.tag} -> {cache_dir() / 'open_clip'}"
    if preset.source == "folder":
        return str(RESOURCES_DIR / preset.path)
    return "random initialisation (seeded), nothing to download"


def preset_available(preset: Preset) -> bool:
    """True if loading the preset needs no download."""
    if preset.source == "hf-file":
        if hf_cache_path(preset.repo, preset.filename).is_file():
            return True
        try:
            from huggingface_hub import try_to_load_from_cache
            cache = hf_hub_cache()
            hit = try_to_load_from_cache(preset.repo, preset.filename,
                                         cache_dir=str(cache) if cache else None)
        except Exception:
            return False
        return isinstance(hit, str)
    if preset.source == "url-zip":
        return zip_member_path(preset.url, preset.filename).is_file()
    if preset.source == "folder":
        return (RESOURCES_DIR / preset.path / MODEL_CONFIG_FILE).is_file()
    return preset.source == "random"


# --------------------------------------------------------------------------- #
# Building and loading.
# --------------------------------------------------------------------------- #
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


def build_model(model_cfg: Dict[str, Any]):
    """An open_clip CLIP from a config dict (weights uninitialised or random)."""
    from open_clip.model import CLIP, CustomTextCLIP
    cfg = dict(model_cfg)
    if "multimodal_cfg" in cfg:  # a captioning model (CoCa): CLIP towers plus a text decoder
        from open_clip.coca_model import CoCa
        cfg.pop("custom_text", None)
        cfg.pop("tokenizer_kwargs", None)
        model = CoCa(**cfg)
        # open_clip never initialises the decoder's output layer (torch.empty: whatever the
        # allocator hands back, NaN at times; its init_parameters is broken, open_clip PR #551):
        # the init that method means, from the seeded generator
        import torch
        dec = model.text_decoder
        torch.nn.init.normal_(dec.text_projection, std=dec.width ** -0.5)
        return model
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cfg.pop("tokenizer_kwargs", None)
    pir = cfg.pop("pir_cfg", None)      # a PIR model (engine.model.pir): CLIP plus its prior
    model = (CustomTextCLIP if custom else CLIP)(**cfg)
    if pir is not None:
        from .pir import add_prior
        add_prior(model, pir)
    return model


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


def list_presets(dev: bool = False) -> List[Preset]:
    """The presets users choose from; ``dev`` adds the project's test-only models."""
    return [p for p in PRESETS.values() if dev or not p.dev]
