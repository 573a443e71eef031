"""The model presets: data, not code.

Each :class:`Preset` names an open_clip architecture and where its weights live,
with what it searches best with (:class:`~engine.core.options.ModelDefaults`, over
:data:`ARCH_DEFAULTS`) and its prompt templates. :func:`model_defaults` reads a
spec's defaults without loading anything (no torch), for the front ends' fields.
The layout of a model folder (:data:`MODEL_CONFIG_FILE`, :data:`MODEL_WEIGHTS_FILE`)
is named here too: the presets' own folders use it, and so do
:func:`engine.model.specs.read_model_folder` and
:func:`engine.model.models.save_model_folder`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from ..core.options import DEFAULT_TEMPLATES, ModelDefaults

RESOURCES_DIR = Path(__file__).resolve().parents[2] / "resources"
MODEL_CONFIG_FILE = "open_clip_config.json"
MODEL_WEIGHTS_FILE = "open_clip_model.safetensors"


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


def list_presets(dev: bool = False) -> List[Preset]:
    """The presets users choose from; ``dev`` adds the project's test-only models."""
    return [p for p in PRESETS.values() if dev or not p.dev]
