"""open_clip architectures: their configs (the project's own in configs/ included)
and an untrained model built from one."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from ..core.errors import ModelError
from .pir import add_prior

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def register_configs() -> None:
    """Make the project's own open_clip configs (mapclip/engine/model/configs) known."""
    import open_clip
    if "mapclip-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def arch_config(arch: str) -> Dict[str, Any]:
    import open_clip
    register_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ModelError(f"unknown open_clip architecture {arch!r}",
                         "run `python -m engine models --archs` for the known names, "
                         "e.g. ViT-B-32-quickgelu")
    return cfg


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
        add_prior(model, pir)
    return model
